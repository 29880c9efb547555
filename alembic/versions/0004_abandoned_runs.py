"""Abandoned runs: a run whose process died is closed as ``abandoned``, found by heartbeats.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

- ``run_completions.status`` may also be ``abandoned``: a completion appended (and chained)
  for a run whose process is gone, with the evidence in its ``details``. Like any completion it
  closes the run for good: an abandoned run never gains outputs.
- ``run_heartbeats``: one row per running run, with the host, process id, boot id and process
  start time that identify its process, and the time it last said it was alive. This is
  liveness, not evidence: the row is updated in place and not chained (an auditor reads the
  completion, which copies what the heartbeat said). The table is not append-only.

On SQLite the check constraint can only change by recreating ``run_completions``; its
append-only triggers go with the old table and are created again (0002's docstring).

Self-contained like every revision: no import of the live models.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COMPLETIONS = "run_completions"
CHECK = "ck_run_completions_status"


def _sqlite_triggers(create: bool) -> None:
    for action in ("UPDATE", "DELETE"):
        name = f"{COMPLETIONS}_no_{action.lower()}"
        if create:
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {action} ON {COMPLETIONS} "
                f"BEGIN SELECT RAISE(ABORT, 'quantmill registry: {COMPLETIONS} is append-only "
                f"({action} refused)'); END"
            )
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")


def _statuses(statuses: str) -> None:
    bind = op.get_bind()
    condition = f"status IN ({statuses})"
    if bind.dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {COMPLETIONS} DROP CONSTRAINT {CHECK}")
        op.execute(f"ALTER TABLE {COMPLETIONS} ADD CONSTRAINT {CHECK} CHECK ({condition})")
        return
    _sqlite_triggers(create=False)
    with op.batch_alter_table(COMPLETIONS, recreate="always") as batch:
        batch.drop_constraint(op.f(CHECK), type_="check")
        batch.create_check_constraint(op.f(CHECK), condition)
    _sqlite_triggers(create=True)


def upgrade() -> None:
    _statuses("'succeeded', 'failed', 'abandoned'")
    op.create_table(
        "run_heartbeats",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("boot_id", sa.String(length=64), nullable=False),
        sa.Column("process_start", sa.String(length=32), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_run_heartbeats")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"],
                                name=op.f("fk_run_heartbeats_run_id_runs")),
    )


def downgrade() -> None:
    # 0003 cannot hold an abandoned completion: refuse rather than drop audit records.
    bind = op.get_bind()
    abandoned = bind.execute(
        sa.text(f"SELECT COUNT(*) FROM {COMPLETIONS} WHERE status = 'abandoned'")).scalar()
    if abandoned:
        raise RuntimeError(f"{abandoned} run(s) are recorded as abandoned; revision 0003 "
                           "cannot represent them, so the downgrade is refused")
    op.drop_table("run_heartbeats")
    _statuses("'succeeded', 'failed'")
