"""Auditable registry: append-only records, run completions, corrections, API tokens and the
tamper-evident ledger.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

- ``runs`` keeps only what is known when a run starts; how it ended moves to ``run_completions``
  (existing finished runs get theirs), so no record is ever updated.
- ``metrics.supersedes_id``: a corrected measurement points at the one it replaces;
  ``corrections`` records why, and who said so.
- ``api_tokens`` / ``api_token_revocations``: hashed bearer tokens of the HTTP API.
- ``ledger``: every record chained by sha256; existing records are chained here, in table
  order, so ``quantmill registry verify`` holds on a migrated database.
- Triggers refuse UPDATE and DELETE (and, on PostgreSQL, TRUNCATE) on all of these tables.
  SQLite drops a table's triggers with the table: a later batch migration of one of these tables
  must create its triggers again (``_create_triggers`` shows how).

Self-contained like every revision: the canonical JSON and hashes are written out here as this
revision defines them (they must match registry/chain.py; the migration tests check).
"""

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS = "0" * 64
CHAINED = (
    "artifacts",
    "runs",
    "run_edges",
    "run_completions",
    "metrics",
    "corrections",
    "api_tokens",
    "api_token_revocations",
)
APPEND_ONLY = (*CHAINED, "ledger")


def _aware() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _normalize(value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return aware.replace(tzinfo=None).isoformat(timespec="microseconds")
    return value


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _create_triggers(bind: sa.Connection) -> None:
    if bind.dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION quantmill_append_only() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'quantmill registry: % is append-only (% refused)', "
            "TG_TABLE_NAME, TG_OP; END $$ LANGUAGE plpgsql"
        )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION quantmill_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION quantmill_append_only()"
            )
    else:
        for table in APPEND_ONLY:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'quantmill registry: {table} is append-only "
                    f"({action} refused)'); END"
                )


def _drop_triggers(bind: sa.Connection) -> None:
    if bind.dialect.name == "postgresql":
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS quantmill_append_only()")
    else:
        for table in APPEND_ONLY:
            for action in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")


def _chain_existing(bind: sa.Connection) -> None:
    """Append every existing record to the (empty) ledger, table by table, by id."""
    metadata = sa.MetaData()
    ledger = sa.Table("ledger", metadata, autoload_with=bind)
    seq, prev = 0, GENESIS
    now = datetime.now(UTC)
    for name in CHAINED:
        table = sa.Table(name, metadata, autoload_with=bind)
        for row in bind.execute(sa.select(table).order_by(table.c.id)):
            payload = {c.name: _normalize(row._mapping[c.name]) for c in table.columns}
            text = json.dumps(
                payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                allow_nan=False,
            )
            record_sha = _sha(text)
            seq += 1
            entry = _sha(f"{prev}\n{seq}\n{name}\n{row.id}\n{record_sha}")
            bind.execute(
                ledger.insert().values(
                    seq=seq, record_type=name, record_id=row.id, payload=text,
                    record_sha256=record_sha, prev_hash=prev, entry_hash=entry, created_at=now,
                )
            )
            prev = entry


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        "run_completions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("finished_at", _aware(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_completions")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_run_completions_run_id_runs")
        ),
        sa.UniqueConstraint("run_id", name=op.f("uq_run_completions_run_id")),
        sa.CheckConstraint(
            "status IN ('succeeded', 'failed')", name=op.f("ck_run_completions_status")
        ),
    )
    runs = sa.table(
        "runs",
        sa.column("id", sa.Integer()),
        sa.column("status", sa.String()),
        sa.column("error", sa.Text()),
        sa.column("started_at", _aware()),
        sa.column("finished_at", _aware()),
    )
    completions = sa.table(
        "run_completions",
        sa.column("run_id", sa.Integer()),
        sa.column("status", sa.String()),
        sa.column("details", sa.JSON()),
        sa.column("error", sa.Text()),
        sa.column("finished_at", _aware()),
    )
    ended = bind.execute(
        sa.select(runs.c.id, runs.c.status, runs.c.error, runs.c.started_at, runs.c.finished_at)
        .where(runs.c.status != "running")
        .order_by(runs.c.id)
    ).all()
    for run_id, status, error, started_at, finished_at in ended:
        bind.execute(
            completions.insert().values(
                run_id=run_id, status=status, details={}, error=error,
                finished_at=finished_at or started_at,
            )
        )
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_status"), type_="check")
        batch.drop_column("status")
        batch.drop_column("finished_at")
        batch.drop_column("error")

    with op.batch_alter_table("metrics") as batch:
        batch.add_column(sa.Column("supersedes_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_metrics_supersedes_id_metrics"), "metrics", ["supersedes_id"], ["id"]
        )
        batch.create_unique_constraint(op.f("uq_metrics_supersedes_id"), ["supersedes_id"])

    op.create_table(
        "corrections",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("target_type", sa.String(length=16), nullable=False),
        sa.Column("target_id", sa.Integer(), nullable=False),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("author", sa.String(length=255), nullable=False),
        sa.Column("created_at", _aware(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corrections")),
        sa.CheckConstraint(
            "target_type IN ('artifact', 'run', 'metric')",
            name=op.f("ck_corrections_target_type"),
        ),
    )
    op.create_index("ix_corrections_target", "corrections", ["target_type", "target_id"])

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", _aware(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_tokens_token_sha256")),
        sa.CheckConstraint("role IN ('auditor', 'writer')", name=op.f("ck_api_tokens_role")),
    )
    op.create_table(
        "api_token_revocations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("revoked_by", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revoked_at", _aware(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_token_revocations")),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"],
            name=op.f("fk_api_token_revocations_token_id_api_tokens"),
        ),
        sa.UniqueConstraint("token_id", name=op.f("uq_api_token_revocations_token_id")),
    )
    op.create_table(
        "ledger",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("record_type", sa.String(length=32), nullable=False),
        sa.Column("record_id", sa.Integer(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("record_sha256", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("entry_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", _aware(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_ledger")),
        sa.UniqueConstraint("entry_hash", name=op.f("uq_ledger_entry_hash")),
    )
    op.create_index("ix_ledger_record", "ledger", ["record_type", "record_id"])
    _chain_existing(bind)
    _create_triggers(bind)


def downgrade() -> None:
    bind = op.get_bind()
    _drop_triggers(bind)
    op.drop_index("ix_ledger_record", table_name="ledger")
    op.drop_table("ledger")
    op.drop_table("api_token_revocations")
    op.drop_table("api_tokens")
    op.drop_index("ix_corrections_target", table_name="corrections")
    op.drop_table("corrections")
    # Corrected measurements go: 0001 had no way to say which of two values is current.
    metrics = sa.table("metrics", sa.column("id", sa.Integer()),
                       sa.column("supersedes_id", sa.Integer()))
    op.execute(metrics.delete().where(metrics.c.supersedes_id.is_not(None)))
    with op.batch_alter_table("metrics") as batch:
        batch.drop_constraint(op.f("uq_metrics_supersedes_id"), type_="unique")
        batch.drop_constraint(op.f("fk_metrics_supersedes_id_metrics"), type_="foreignkey")
        batch.drop_column("supersedes_id")

    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("status", sa.String(length=16), nullable=False, server_default="running")
        )
        batch.add_column(sa.Column("finished_at", _aware(), nullable=True))
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))
    runs = sa.table(
        "runs",
        sa.column("id", sa.Integer()),
        sa.column("status", sa.String()),
        sa.column("details", sa.JSON()),
        sa.column("finished_at", _aware()),
        sa.column("error", sa.Text()),
    )
    completions = sa.table(
        "run_completions",
        sa.column("run_id", sa.Integer()),
        sa.column("status", sa.String()),
        sa.column("details", sa.JSON()),
        sa.column("error", sa.Text()),
        sa.column("finished_at", _aware()),
    )
    ended = bind.execute(
        sa.select(completions, runs.c.details.label("start_details")).join(
            runs, runs.c.id == completions.c.run_id
        )
    ).all()
    for row in ended:
        # 0001 kept one details document, updated at the end: merge the two back.
        details = {**(row.start_details or {}), **(row.details or {})}
        bind.execute(
            runs.update().where(runs.c.id == row.run_id).values(
                status=row.status, error=row.error, finished_at=row.finished_at, details=details
            )
        )
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("status", server_default=None)
        batch.create_check_constraint(
            op.f("ck_runs_status"), "status IN ('running', 'succeeded', 'failed')"
        )
    op.drop_table("run_completions")
