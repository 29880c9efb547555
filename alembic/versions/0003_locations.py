"""Artifact locations: one artifact, several places its bytes live.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

- ``artifact_locations``: append-only, chained records of further places an artifact is stored
  (local and S3 copies, a published copy), one per (artifact, uri), with the non-secret facts
  a reader needs (``details``) and who recorded it.
- No backfill: an artifact's own ``uri`` stays its primary location, which the registry reads
  as a location when no record names it; existing history and its ledger stay as they are.
- Triggers refuse UPDATE and DELETE (and, on PostgreSQL, TRUNCATE), as 0002's do for the other
  records; on PostgreSQL they call 0002's ``quantmill_append_only()``.

Self-contained like every revision: no import of the live models.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "artifact_locations"


def _create_triggers(bind: sa.Connection) -> None:
    if bind.dialect.name == "postgresql":
        op.execute(
            f"CREATE TRIGGER {TABLE}_append_only BEFORE UPDATE OR DELETE ON {TABLE} "
            f"FOR EACH ROW EXECUTE FUNCTION quantmill_append_only()"
        )
        op.execute(
            f"CREATE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION quantmill_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {TABLE}_no_{action.lower()} BEFORE {action} ON {TABLE} "
                f"BEGIN SELECT RAISE(ABORT, 'quantmill registry: {TABLE} is append-only "
                f"({action} refused)'); END"
            )


def _drop_triggers(bind: sa.Connection) -> None:
    if bind.dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {TABLE}_append_only ON {TABLE}")
        op.execute(f"DROP TRIGGER IF EXISTS {TABLE}_no_truncate ON {TABLE}")
    else:
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {TABLE}_no_{action}")


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("artifact_id", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifact_locations")),
        sa.ForeignKeyConstraint(
            ["artifact_id"], ["artifacts.id"],
            name=op.f("fk_artifact_locations_artifact_id_artifacts"),
        ),
        sa.UniqueConstraint(
            "artifact_id", "uri", name=op.f("uq_artifact_locations_artifact_id_uri")
        ),
        sa.CheckConstraint(
            "role IN ('stored', 'copy', 'published')", name=op.f("ck_artifact_locations_role")
        ),
    )
    _create_triggers(op.get_bind())


def downgrade() -> None:
    # Recorded locations go with the table: 0002 has nowhere to keep them (the primary uri of
    # each artifact stays). Their ledger links stay too, so verify at 0002 reports them.
    _drop_triggers(op.get_bind())
    op.drop_table(TABLE)
