"""Migrations on both databases: round trip, drift against the models, schema checks on open."""

import shutil
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from quantmill.registry import (
    Registry,
    RegistryUnavailable,
    SchemaOutdated,
    SchemaTooNew,
    current_revision,
    downgrade,
    head_revision,
    is_up_to_date,
    upgrade,
)
from quantmill.registry import migrate as migrate_module
from quantmill.registry.db import create_registry_engine
from quantmill.registry.models import Base

REGISTRY_TABLES = {"artifacts", "artifact_locations", "runs", "run_edges", "metrics"}


def _tables(url: str) -> set[str]:
    engine = create_registry_engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def _drift(url: str) -> list[object]:
    """What autogenerate would change to make the database match the live models."""
    engine = create_registry_engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _execute(url: str, sql: str) -> None:
    engine = create_registry_engine(url, pooled=False)
    try:
        with engine.begin() as connection:
            connection.execute(text(sql))
    finally:
        engine.dispose()


def test_scripts_are_found_and_have_one_head() -> None:
    location = Path(migrate_module.script_location())
    assert (location / "env.py").is_file()
    assert (location / "script.py.mako").is_file()
    assert head_revision() == "0004"


def test_migration_scripts_do_not_import_live_models() -> None:
    versions = Path(migrate_module.script_location()) / "versions"
    scripts = sorted(versions.glob("[0-9]*.py"))
    assert scripts, "no migration scripts found"
    for script in scripts:
        source = script.read_text()
        assert "quantmill.registry" not in source, f"{script.name} imports live code"


def test_upgrade_downgrade_upgrade_and_no_drift(db_url: str) -> None:
    assert current_revision(db_url) is None
    assert not is_up_to_date(db_url)

    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    assert is_up_to_date(db_url)
    assert REGISTRY_TABLES <= _tables(db_url)
    assert _drift(db_url) == []

    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    assert not (REGISTRY_TABLES & _tables(db_url))

    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    assert _drift(db_url) == []


def test_drift_check_detects_a_missing_column(db_url: str) -> None:
    """The drift check is not vacuous: a schema that differs from the models is reported."""
    upgrade(db_url)
    _execute(db_url, "ALTER TABLE metrics DROP COLUMN unit")
    diff = _drift(db_url)
    assert any(item[0] == "add_column" and item[3].name == "unit" for item in diff), diff


def test_open_creates_a_fresh_database(db_url: str) -> None:
    with Registry.open(db_url) as registry:
        assert registry.list_artifacts() == []
    assert current_revision(db_url) == head_revision()
    assert REGISTRY_TABLES <= _tables(db_url)


def test_open_without_auto_create_refuses_an_empty_database(db_url: str) -> None:
    with pytest.raises(SchemaOutdated, match="quantmill registry upgrade --database-url"):
        Registry.open(db_url, auto_create=False)
    assert not (REGISTRY_TABLES & _tables(db_url))


def test_open_after_downgrade_to_base_recreates_the_schema(db_url: str) -> None:
    """alembic leaves an empty alembic_version table at base: that still counts as fresh."""
    upgrade(db_url)
    downgrade(db_url, "base")
    with Registry.open(db_url) as registry:
        assert registry.list_runs() == []
    assert is_up_to_date(db_url)


@pytest.fixture
def scripts_with_a_newer_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A copy of the shipped migrations plus a revision 9000 on top of the shipped head, as a
    newer quantmill would ship."""
    shipped_head = head_revision()
    source = Path(migrate_module.script_location())
    target = tmp_path / "migrations"
    (target / "versions").mkdir(parents=True)
    shutil.copy(source / "env.py", target / "env.py")
    shutil.copy(source / "script.py.mako", target / "script.py.mako")
    for script in (source / "versions").glob("[0-9]*.py"):
        shutil.copy(script, target / "versions" / script.name)
    (target / "versions" / "9000_extra.py").write_text(
        f'''"""Test-only revision: one more table."""
import sqlalchemy as sa
from alembic import op

revision = "9000"
down_revision = "{shipped_head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("qm_extra", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("qm_extra")
'''
    )
    monkeypatch.setattr(migrate_module, "script_location", lambda: str(target))
    return str(target)


def test_open_refuses_an_outdated_schema_and_upgrade_fixes_it(
    db_url: str, backend: str, scripts_with_a_newer_head: str
) -> None:
    assert head_revision() == "9000"
    upgrade(db_url, "0002")
    # Show that the message hides a password (trust auth on the test server ignores it).
    shown_url = db_url
    if backend == "postgresql":
        shown_url = make_url(db_url).set(password="s3cret").render_as_string(hide_password=False)

    with pytest.raises(SchemaOutdated) as caught:
        Registry.open(shown_url)
    message = str(caught.value)
    assert "quantmill registry upgrade --database-url" in message
    assert "'0002'" in message and "'9000'" in message
    assert "s3cret" not in message
    if backend == "postgresql":
        assert "***" in message
    assert current_revision(db_url) == "0002", "open must not migrate an existing schema"

    upgrade(db_url)
    assert "qm_extra" in _tables(db_url)
    with Registry.open(db_url) as registry:
        assert registry.list_artifacts() == []


def test_open_refuses_a_schema_from_a_newer_quantmill(db_url: str) -> None:
    upgrade(db_url)
    _execute(db_url, "UPDATE alembic_version SET version_num = '9999_future'")
    with pytest.raises(SchemaTooNew, match="newer quantmill"):
        Registry.open(db_url)


def test_open_refuses_tables_without_a_revision(db_url: str) -> None:
    upgrade(db_url)
    _execute(db_url, "DELETE FROM alembic_version")
    with pytest.raises(SchemaOutdated, match="no migration revision"):
        Registry.open(db_url)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////nonexistent-quantmill-dir/registry.db",
        pytest.param(
            "postgresql://postgres:pw@127.0.0.1:5432/qm_test_does_not_exist",
            marks=pytest.mark.postgres,
        ),
    ],
)
def test_open_reports_an_unusable_database(url: str) -> None:
    with pytest.raises(RegistryUnavailable) as caught:
        Registry.open(url)
    assert "cannot use the registry database" in str(caught.value)
    assert ":pw@" not in str(caught.value)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_migrated_on_its_own_connection(url: str) -> None:
    """An in-memory database exists only inside its connection: open() must migrate on it."""
    with Registry.open(url) as registry:
        artifact = registry.upsert_artifact(
            kind="model", name="m", sha256="c" * 64, size_bytes=1, uri="u", format="gguf"
        )
        assert registry.get_artifact("cccccc") == artifact
