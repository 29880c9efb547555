"""``quantmill registry serve`` and ``quantmill registry token create|revoke|list``: the HTTP API
and its bearer tokens.

Imported at the end of ``quantmill.flows.cli``, which owns the ``registry`` command group.
FastAPI and uvicorn are imported inside ``serve`` only, so the other commands start fast.
"""

from __future__ import annotations

from enum import StrEnum

import typer
from rich.table import Table

from quantmill.flows.cli import DatabaseOption, console, err_console, registry_app, user_errors

token_app = typer.Typer(help="Bearer tokens of the HTTP API (stored hashed).",
                        no_args_is_help=True)
registry_app.add_typer(token_app, name="token")


class TokenRole(StrEnum):
    """What a token may do: auditors read and audit; writers read and register runs."""

    auditor = "auditor"
    writer = "writer"


@registry_app.command("serve")
@user_errors
def registry_serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8765, min=1, max=65535, help="TCP port."),
    storage: list[str] = typer.Option(
        [], "--storage", help="Storage whose objects writers may register (s3://bucket/prefix "
                              "or a local storage root); repeatable. Default: the default "
                              "storage ($QUANTMILL_STORAGE_URL, else local)."),
    database_url: str | None = DatabaseOption,
) -> None:
    """Serve the registry's HTTP API (OpenAPI schema at /docs and /openapi.json)."""
    import uvicorn

    from quantmill.flows.api import create_app
    from quantmill.flows.artifacts import Backends, as_uri

    storages = [Backends().for_destination(as_uri(url)) for url in storage] or None
    # Opens the registry: an outdated schema stops here, before any port is bound.
    app = create_app(database_url, storages)
    registry = app.state.registry
    console.print(f"serving the registry {registry.url} on http://{host}:{port} "
                  f"(API docs: http://{host}:{port}/docs)", highlight=False, soft_wrap=True)
    uvicorn.run(app, host=host, port=port)


@token_app.command("create")
@user_errors
def token_create(
    name: str = typer.Argument(..., help="Unique name: a-z, 0-9, '_', '.', '-' (max 64)."),
    role: TokenRole = typer.Option(..., "--role", help="auditor (read, audit) or writer "
                                   "(read, register runs)."),
    database_url: str | None = DatabaseOption,
) -> None:
    """Create a token and print it ONCE on stdout (only its sha256 is stored)."""
    from quantmill.registry import Registry
    from quantmill.registry.tokens import create_token

    with Registry.open(database_url) as registry:
        secret, token = create_token(registry, name, role.value)
    err_console.print(f"created {token.role} token [bold]{token.name}[/] (id {token.id}). "
                      f"[bold yellow]Copy it now: it cannot be shown again[/] (only its sha256 "
                      f"is stored; if lost, revoke it and create another).", soft_wrap=True)
    # Alone on stdout, unwrapped, so scripts can capture it: TOKEN=$(quantmill registry ...)
    console.print(secret, highlight=False, soft_wrap=True, markup=False)


@token_app.command("revoke")
@user_errors
def token_revoke(
    name: str = typer.Argument(..., help="The token's name."),
    reason: str = typer.Option("", "--reason", help="Why (kept in the audit record)."),
    database_url: str | None = DatabaseOption,
) -> None:
    """Revoke a token for good (recorded; the name cannot be reused)."""
    from quantmill.registry import Registry
    from quantmill.registry.tokens import revoke_token

    with Registry.open(database_url) as registry:
        token = revoke_token(registry, name, reason=reason)
    console.print(f"revoked {token.role} token {token.name} at {token.revoked_at:%Y-%m-%d %H:%M:%S}"
                  f" UTC", highlight=False)


@token_app.command("list")
@user_errors
def token_list(database_url: str | None = DatabaseOption) -> None:
    """List every token (never the token or its hash)."""
    from quantmill.registry import Registry
    from quantmill.registry.tokens import list_tokens

    with Registry.open(database_url) as registry:
        tokens = list_tokens(registry)
    table = Table()
    for column in ("id", "name", "role", "created by", "created", "status"):
        table.add_column(column)
    for token in tokens:
        state = (f"revoked {token.revoked_at:%Y-%m-%d %H:%M}" if token.revoked_at else "active")
        table.add_row(str(token.id), token.name, token.role, token.created_by,
                      token.created_at.strftime("%Y-%m-%d %H:%M"), state)
    console.print(table)
