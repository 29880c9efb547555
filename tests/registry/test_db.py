"""URL resolution and connection settings."""

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from quantmill.registry.db import (
    create_registry_engine,
    normalize_url,
    redact_url,
    resolve_database_url,
)
from quantmill.registry.store import upgrade_command


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUANTMILL_DATABASE_URL", raising=False)
    monkeypatch.delenv("QUANTMILL_HOME", raising=False)


def test_explicit_url_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTMILL_DATABASE_URL", "sqlite:////env.db")
    assert resolve_database_url("sqlite:////explicit.db") == "sqlite:////explicit.db"
    assert resolve_database_url() == "sqlite:////env.db"


def test_default_is_sqlite_under_quantmill_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "nested" / "home"
    monkeypatch.setenv("QUANTMILL_HOME", str(home))
    assert resolve_database_url() == f"sqlite:///{home}/registry.db"
    assert home.is_dir()


def test_default_home_is_dot_quantmill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_database_url() == f"sqlite:///{tmp_path}/.quantmill/registry.db"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
    ],
)
def test_postgresql_urls_use_psycopg(given: str, expected: str) -> None:
    assert normalize_url(given) == expected
    assert resolve_database_url(given) == expected


def test_passwords_are_hidden_in_messages() -> None:
    url = "postgresql+psycopg://alice:hunter2@db.example:5432/registry"
    assert "hunter2" not in redact_url(url)
    command = upgrade_command(url)
    assert command.startswith("quantmill registry upgrade --database-url ")
    assert "hunter2" not in command and "alice:***@db.example" in command


def test_sqlite_enforces_foreign_keys(tmp_path: Path) -> None:
    engine = create_registry_engine(f"sqlite:///{tmp_path / 'fk.db'}")
    try:
        with engine.begin() as connection:
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
            connection.execute(text("CREATE TABLE parent (id INTEGER PRIMARY KEY)"))
            connection.execute(
                text("CREATE TABLE child (id INTEGER PRIMARY KEY, p INTEGER REFERENCES parent(id))")
            )
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(text("INSERT INTO child (id, p) VALUES (1, 42)"))
    finally:
        engine.dispose()


def test_sqlite_file_runs_in_wal_mode_so_a_long_reader_never_blocks_a_writer(
    tmp_path: Path,
) -> None:
    """A verify or API read holding its snapshot must not make writers time out."""
    from quantmill.registry import Registry

    url = f"sqlite:///{tmp_path / 'wal.db'}"
    with Registry.open(url) as registry:
        registry.upsert_artifact(kind="model", name="a", sha256="a" * 64, size_bytes=1,
                                 uri="file:///a", format="raw")
        reader = create_registry_engine(url)
        try:
            with reader.begin() as connection:  # a reader's open snapshot
                assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
                assert connection.execute(text("SELECT COUNT(*) FROM artifacts")).scalar() == 1
                registry.upsert_artifact(kind="model", name="b", sha256="b" * 64,
                                         size_bytes=1, uri="file:///b", format="raw")
                # the snapshot still sees one; the writer committed meanwhile
                assert connection.execute(text("SELECT COUNT(*) FROM artifacts")).scalar() == 1
        finally:
            reader.dispose()
        assert len(registry.list_artifacts()) == 2
        assert registry.verify().ok
