"""Fixtures giving each registry test a fresh, empty database on SQLite and on PostgreSQL.

PostgreSQL tests create a uniquely named database on the local server (127.0.0.1:5432, user
``postgres``, trust auth) and drop it afterwards. A stopped server is a failure, not a skip: the
registry must be tested on both databases.
"""

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from quantmill.registry import Registry
from quantmill.registry.db import create_registry_engine
from quantmill.registry.models import APPEND_ONLY_TABLES

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
PG_URL_TEMPLATE = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
PG_START_HINT = (
    "PostgreSQL is not reachable on 127.0.0.1:5432; start it with: "
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
)

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


class Databases:
    """Creates empty databases for one test and drops the PostgreSQL ones at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._pg_names: list[str] = []
        self._admin: psycopg.Connection | None = None

    def create(self, backend: str) -> str:
        """The URL of a new, empty database on ``backend`` ("sqlite" or "postgresql")."""
        name = f"qm_test_{uuid.uuid4().hex[:12]}"
        if backend == "sqlite":
            return f"sqlite:///{self._tmp_path / (name + '.db')}"
        if backend != "postgresql":
            raise ValueError(backend)
        self._admin_connection().execute(f'CREATE DATABASE "{name}"')
        self._pg_names.append(name)
        return PG_URL_TEMPLATE.format(name=name)

    def _admin_connection(self) -> psycopg.Connection:
        if self._admin is None:
            try:
                self._admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True)
            except psycopg.OperationalError as exc:
                pytest.fail(f"{PG_START_HINT}\n({exc})", pytrace=False)
        return self._admin

    def drop_all(self) -> None:
        """Drop every database this object created, ending any connection a test leaked."""
        if self._admin is None:
            return
        try:
            for name in self._pg_names:
                self._admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            self._admin.close()


@pytest.fixture
def databases(tmp_path: Path) -> Iterator[Databases]:
    """A factory of empty databases, cleaned up after the test."""
    factory = Databases(tmp_path)
    try:
        yield factory
    finally:
        factory.drop_all()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The database kind under test: every test using it runs once per backend."""
    return request.param


@pytest.fixture
def db_url(backend: str, databases: Databases) -> str:
    """The URL of a fresh, empty database of the current backend."""
    return databases.create(backend)


@pytest.fixture
def registry(db_url: str) -> Iterator[Registry]:
    """A registry on a fresh database, migrated to head by ``Registry.open``."""
    with Registry.open(db_url) as opened:
        yield opened


@pytest.fixture
def open_registry(databases: Databases) -> Iterator[Callable[[str], Registry]]:
    """Open extra registries in a test; all are closed (engines disposed) at teardown.

    Depends on ``databases`` so the engines are gone before the databases are dropped.
    """
    opened: list[Registry] = []

    def _open(url: str) -> Registry:
        registry = Registry.open(url)
        opened.append(registry)
        return registry

    yield _open
    for registry in opened:
        registry.close()


class Tamper:
    """What someone with direct access to the database could do: raw SQL, and first of all
    dropping the append-only triggers (for the tests of tamper evidence)."""

    def __init__(self, url: str, backend: str) -> None:
        self.url, self.backend = url, backend

    def sql(self, statement: str) -> None:
        """Run one statement in its own transaction, around quantmill's registry."""
        engine = create_registry_engine(self.url, pooled=False)
        try:
            with engine.begin() as connection:
                connection.execute(text(statement))
        finally:
            engine.dispose()

    def drop_guards(self) -> None:
        for table in APPEND_ONLY_TABLES:
            if self.backend == "postgresql":
                self.sql(f"DROP TRIGGER {table}_append_only ON {table}")
            else:
                self.sql(f"DROP TRIGGER {table}_no_update")
                self.sql(f"DROP TRIGGER {table}_no_delete")


@pytest.fixture
def tamper(db_url: str, backend: str) -> Tamper:
    """Raw access to the current test's database."""
    return Tamper(db_url, backend)
