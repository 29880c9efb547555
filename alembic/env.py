"""alembic environment for the quantmill registry.

Run programmatically by ``quantmill.registry.migrate`` (no ``alembic.ini``). The URL comes from
the ``sqlalchemy.url`` option of the config, else from ``QUANTMILL_DATABASE_URL`` / the default
embedded SQLite file. A caller may also hand over an open connection in
``config.attributes["connection"]``.

This file may import the live models (their metadata is the autogenerate and drift-check
target); the scripts under ``versions/`` must not.
"""

from alembic import context
from sqlalchemy import Connection

from quantmill.registry.db import create_registry_engine, resolve_database_url
from quantmill.registry.models import Base

config = context.config
target_metadata = Base.metadata

#: Options shared by online and offline runs. ``render_as_batch``: SQLite cannot ALTER most
#: things, so alembic copies the table instead; ``compare_type``: autogenerate sees type changes.
CONFIGURE_OPTIONS = {"render_as_batch": True, "compare_type": True}


def database_url() -> str:
    """The URL set on the config, else ``$QUANTMILL_DATABASE_URL``, else the default file.

    alembic >= 1.16's ``get_alembic_option`` reads the main section and ``[tool.alembic]`` and,
    unlike ``get_main_option``, does not fail when there is no ``alembic.ini`` (the ``alembic``
    command run next to pyproject.toml).
    """
    getter = getattr(config, "get_alembic_option", None)
    if getter is not None:
        url = getter("sqlalchemy.url")
    else:
        url = config.get_main_option("sqlalchemy.url")
    return resolve_database_url(url if isinstance(url, str) and url else None)


def run_migrations_offline() -> None:
    """Emit the SQL as text (``alembic upgrade --sql``) instead of running it."""
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **CONFIGURE_OPTIONS,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, **CONFIGURE_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate over the given connection, or over a fresh engine for the configured URL.

    The engine keeps SQLite foreign keys off: a batch migration copies and drops tables, which
    enforcement would block mid-way.
    """
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    engine = create_registry_engine(database_url(), sqlite_foreign_keys=False, pooled=False)
    try:
        with engine.connect() as connection:
            run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
