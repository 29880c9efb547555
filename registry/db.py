"""Where the registry database is, and how to connect to it.

Why one module: the store, the migrations and the CLI must agree on the URL (explicit argument,
then ``QUANTMILL_DATABASE_URL``, then an embedded SQLite file under ``QUANTMILL_HOME``) and on the
connection settings (SQLite foreign keys and busy timeout, PostgreSQL through psycopg 3).
"""

import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool

from quantmill.registry.errors import RegistryError

ENV_DATABASE_URL = "QUANTMILL_DATABASE_URL"
ENV_HOME = "QUANTMILL_HOME"
DEFAULT_HOME = Path("~/.quantmill")
#: How long an SQLite writer waits for another writer before giving up (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 30_000

_POSTGRES_ALIASES = ("postgresql", "postgres")


def quantmill_home() -> Path:
    """The directory holding quantmill's local state (created if missing)."""
    raw = os.environ.get(ENV_HOME)
    home = Path(raw).expanduser() if raw else DEFAULT_HOME.expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def normalize_url(url: str) -> str:
    """Rewrite ``postgresql://`` (and ``postgres://``) to the psycopg 3 driver.

    Why: SQLAlchemy's default PostgreSQL driver is psycopg2, which quantmill does not install.
    Other URLs are returned unchanged.
    """
    parsed = make_url(url)
    if parsed.drivername in _POSTGRES_ALIASES:
        parsed = parsed.set(drivername="postgresql+psycopg")
        return parsed.render_as_string(hide_password=False)
    return url


def resolve_database_url(url: str | None = None) -> str:
    """The registry URL: ``url`` if given, else ``$QUANTMILL_DATABASE_URL``, else the default.

    The default is ``sqlite:///<home>/registry.db`` with home = ``$QUANTMILL_HOME`` or
    ``~/.quantmill``, so a fresh install works with no configuration.
    """
    chosen = url or os.environ.get(ENV_DATABASE_URL)
    if not chosen:
        chosen = f"sqlite:///{quantmill_home() / 'registry.db'}"
    try:
        normalized = normalize_url(chosen)
        make_url(normalized).get_dialect()  # an unknown database driver fails here, clearly
    except (ArgumentError, NoSuchModuleError) as exc:
        raise RegistryError(f"invalid registry database URL: {exc}") from None
    return normalized


def redact_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``, safe to print in messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def is_sqlite(url: str | URL) -> bool:
    """True for any ``sqlite`` URL (with or without an explicit driver)."""
    return make_url(url).get_backend_name() == "sqlite"


def is_sqlite_memory(url: str | URL) -> bool:
    """True for an in-memory SQLite URL (``sqlite://``, ``sqlite:///:memory:``)."""
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def _sqlite_pragmas(foreign_keys: bool, wal: bool) -> Any:
    """A connect listener that applies quantmill's per-connection SQLite settings.

    Why per connection: SQLite forgets PRAGMAs when a connection closes, and foreign keys are off
    by default, which would silently accept edges to missing runs or artifacts. ``wal``: a file
    database runs in write-ahead-log mode, so a long reader (``verify`` over a large chain, the
    API's queries) never blocks a writer and a writer's commit is one append, not a journal
    rewrite (the mode is stored in the file; setting it again is a no-op).
    """

    def on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # The driver's own transaction handling starts transactions lazily, at the first write,
        # after the reads: two writers then deadlock on the lock upgrade. quantmill emits BEGIN
        # itself (``_sqlite_begin``).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()

    return on_connect


#: Execution option marking a connection whose transaction will write (SQLite: BEGIN IMMEDIATE).
WRITE_OPTION = "quantmill_write"


def _sqlite_begin(connection: Any) -> None:
    """Start SQLite transactions explicitly: ``BEGIN IMMEDIATE`` for writers, so a writer holds
    the database's write lock from its first statement (its reads, such as the ledger's tail,
    stay valid until it commits), and a plain deferred ``BEGIN`` for readers."""
    write = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def create_registry_engine(
    url: str | None = None, *, sqlite_foreign_keys: bool = True, pooled: bool = True
) -> Engine:
    """An engine for the registry at ``url`` (resolved with ``resolve_database_url``).

    ``sqlite_foreign_keys=False`` exists for migrations only: batch migrations on SQLite copy and
    drop tables, which foreign-key enforcement would block. ``pooled=False`` gives an engine that
    keeps no connection open between uses (short-lived tools, migrations); it is ignored for an
    in-memory database, which lives exactly as long as its one shared connection.
    """
    resolved = resolve_database_url(url)
    kwargs: dict[str, Any] = {}
    if not pooled:
        kwargs["poolclass"] = NullPool
    if is_sqlite_memory(resolved):
        # Every connection to ":memory:" is a new, empty database: share one connection.
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"check_same_thread": False}
    elif is_sqlite(resolved):
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(resolved, **kwargs)
    if is_sqlite(resolved):
        wal = not is_sqlite_memory(resolved)
        event.listen(engine, "connect", _sqlite_pragmas(sqlite_foreign_keys, wal))
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit.

    Why ``expire_on_commit=False``: reading an attribute of an expired row after the commit would
    issue a fresh query, on a session that is already closed.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)
