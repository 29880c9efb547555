"""Schema migrations driven from code: upgrade, downgrade and revision checks.

Why no ``alembic.ini``: the migration scripts ship inside the package (``quantmill.migrations``),
so an installed quantmill can migrate any database it is pointed at. The script directory is found
through the import system, which works for wheels and for editable installs alike
(``importlib.resources.files()`` does not, on Python 3.11, for this mapped layout).
"""

import importlib.util
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection

from quantmill.registry.db import create_registry_engine, resolve_database_url
from quantmill.registry.errors import RegistryError

MIGRATIONS_PACKAGE = "quantmill.migrations"


def script_location() -> str:
    """The directory holding ``env.py`` and ``versions/`` of the installed migrations."""
    spec = importlib.util.find_spec(MIGRATIONS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    # Editable installs add a path-hook placeholder entry next to the real folder: skip it.
    for location in locations:
        if (Path(location) / "env.py").is_file():
            return str(Path(location).resolve())
    raise RegistryError(
        f"cannot find the migration scripts: no env.py in {MIGRATIONS_PACKAGE} ({locations})"
    )


def scripts_config() -> Config:
    """A config that only knows where the scripts are (for questions about the scripts)."""
    config = Config()
    config.set_main_option("script_location", script_location())
    return config


def alembic_config(url: str | None = None) -> Config:
    """An alembic ``Config`` built in code for the registry at ``url`` (resolved as usual).

    ``env.py`` reads the URL back from the ``sqlalchemy.url`` main option.
    """
    config = scripts_config()
    # Config options go through ConfigParser interpolation: a literal % must be doubled
    # (URL-encoded passwords contain them).
    config.set_main_option("sqlalchemy.url", resolve_database_url(url).replace("%", "%%"))
    return config


def head_revision() -> str:
    """The single head revision of the shipped migrations."""
    script = ScriptDirectory.from_config(scripts_config())
    heads = script.get_heads()
    if len(heads) != 1:
        raise RegistryError(f"the migrations must have exactly one head, found {heads}")
    return heads[0]


def known_revisions() -> set[str]:
    """Every revision id in the shipped migration history."""
    script = ScriptDirectory.from_config(scripts_config())
    return {revision.revision for revision in script.walk_revisions()}


def connection_revision(connection: Connection) -> str | None:
    """The revision of the database behind an open connection (``None``: never migrated)."""
    return MigrationContext.configure(connection).get_current_revision()


def current_revision(url: str | None = None) -> str | None:
    """The revision the database is at, or ``None`` for a database never migrated (or at base)."""
    engine = create_registry_engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            return connection_revision(connection)
    finally:
        engine.dispose()


def is_up_to_date(url: str | None = None) -> bool:
    """True when the database is at the head revision."""
    return current_revision(url) == head_revision()


def upgrade(
    url: str | None = None, revision: str = "head", *, connection: Connection | None = None
) -> None:
    """Migrate the database at ``url`` up to ``revision`` (default: the head).

    ``connection``: migrate over this open connection instead of a new engine (needed for an
    in-memory SQLite database, which exists only inside its connection).
    """
    _run(command.upgrade, url, revision, connection)


def downgrade(
    url: str | None = None, revision: str = "base", *, connection: Connection | None = None
) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` drops every table)."""
    _run(command.downgrade, url, revision, connection)


def _run(
    operation: Callable[[Config, str], None],
    url: str | None,
    revision: str,
    connection: Connection | None,
) -> None:
    """Run an alembic command, turning its errors (e.g. an unknown revision) into ours."""
    config = alembic_config(url)
    if connection is not None:
        config.attributes["connection"] = connection
    try:
        operation(config, revision)
    except CommandError as exc:
        raise RegistryError(f"migration to {revision!r} failed: {exc}") from exc
