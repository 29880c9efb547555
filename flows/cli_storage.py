"""``quantmill storage copy|fetch``: artifacts in more than one place.

Imported at the end of ``quantmill.flows.cli``, which owns the ``storage`` command group.
"""

from __future__ import annotations

import typer

from quantmill.flows.cli import (
    DatabaseOption,
    _ref,
    console,
    err_console,
    storage_app,
    user_errors,
)


@storage_app.command("copy")
@user_errors
def storage_copy(
    artifact: str = typer.Argument(..., help="Artifact id or sha256 prefix."),
    to: str = typer.Option(..., "--to", help="s3://BUCKET[/PREFIX] or a local storage root."),
    endpoint_url: str | None = typer.Option(None, "--endpoint-url",
                                            help="S3-compatible server (default: boto3's)."),
    region: str | None = typer.Option(None, "--region"),
    database_url: str | None = DatabaseOption,
) -> None:
    """Copy an artifact into another store (content-addressed there too), check the copy and
    record the new location: one artifact id, one more place."""
    from quantmill.flows.artifacts import Backends, copy_artifact
    from quantmill.registry import Registry

    options = {"endpoint_url": endpoint_url, "region": region} if to.startswith("s3://") else {}
    with Registry.open(database_url) as reg:
        location, stored = copy_artifact(reg, _ref(artifact), to, Backends(), **options)
        count = len(reg.locations(location.artifact_id))
    console.print(f"artifact {location.artifact_id} copied to {stored.uri} "
                  f"(sha256 {stored.sha256[:12]}, {stored.size_bytes / 1e6:,.1f} MB); "
                  f"{count} location(s) recorded", highlight=False)


@storage_app.command("fetch")
@user_errors
def storage_fetch(
    artifact: str = typer.Argument(..., help="Artifact id or sha256 prefix."),
    database_url: str | None = DatabaseOption,
) -> None:
    """Make an artifact's content available on this machine (from its first reachable,
    intact location; S3 content goes to the cache under $QUANTMILL_HOME/cache) and print the
    local path."""
    from quantmill.flows.artifacts import Backends, fetch_artifact
    from quantmill.registry import Registry

    with Registry.open(database_url) as reg:
        fetched = fetch_artifact(reg, reg.get_artifact(_ref(artifact)), Backends())
    for problem in fetched.skipped:
        err_console.print(f"skipped {problem}", highlight=False, soft_wrap=True)
    err_console.print(f"from {fetched.location.uri}", highlight=False, soft_wrap=True)
    typer.echo(str(fetched.path))
