"""Initial registry schema: artifacts, runs, run_edges, metrics.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Hand-written and self-contained (no import of the live models): this is the schema as of this
revision, with every constraint and index named as the models' naming convention would name it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _aware() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=64), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", _aware(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
        sa.UniqueConstraint("sha256", name=op.f("uq_artifacts_sha256")),
    )
    op.create_index(op.f("ix_artifacts_kind"), "artifacts", ["kind"])

    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=False),
        sa.Column("recipe_sha256", sa.String(length=64), nullable=False),
        sa.Column("plugins", sa.JSON(), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("started_by", sa.String(length=255), nullable=False),
        sa.Column("started_at", _aware(), nullable=False),
        sa.Column("finished_at", _aware(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'failed')", name=op.f("ck_runs_status")
        ),
    )
    op.create_index(op.f("ix_runs_job_id"), "runs", ["job_id"])
    op.create_index(op.f("ix_runs_recipe_sha256"), "runs", ["recipe_sha256"])

    op.create_table(
        "run_edges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("artifact_id", sa.Integer(), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("role", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_edges")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_run_edges_run_id_runs")),
        sa.ForeignKeyConstraint(
            ["artifact_id"], ["artifacts.id"], name=op.f("fk_run_edges_artifact_id_artifacts")
        ),
        sa.UniqueConstraint(
            "run_id",
            "artifact_id",
            "direction",
            "role",
            name=op.f("uq_run_edges_run_id_artifact_id_direction_role"),
        ),
        sa.CheckConstraint("direction IN ('input', 'output')", name=op.f("ck_run_edges_direction")),
    )
    op.create_index("ix_run_edges_artifact_id_direction", "run_edges", ["artifact_id", "direction"])

    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("artifact_id", sa.Integer(), nullable=False),
        sa.Column("evaluator", sa.String(length=64), nullable=False),
        sa.Column("dataset_artifact_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("unit", sa.String(length=32), nullable=True),
        sa.Column("protocol", sa.JSON(), nullable=False),
        sa.Column("protocol_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", _aware(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_metrics_run_id_runs")),
        sa.ForeignKeyConstraint(
            ["artifact_id"], ["artifacts.id"], name=op.f("fk_metrics_artifact_id_artifacts")
        ),
        sa.ForeignKeyConstraint(
            ["dataset_artifact_id"],
            ["artifacts.id"],
            name=op.f("fk_metrics_dataset_artifact_id_artifacts"),
        ),
    )
    op.create_index(op.f("ix_metrics_run_id"), "metrics", ["run_id"])
    op.create_index(
        "ix_metrics_artifact_id_evaluator",
        "metrics",
        ["artifact_id", "evaluator", "protocol_sha256"],
    )


def downgrade() -> None:
    # Reverse order of creation: referencing tables first.
    op.drop_index("ix_metrics_artifact_id_evaluator", table_name="metrics")
    op.drop_index(op.f("ix_metrics_run_id"), table_name="metrics")
    op.drop_table("metrics")
    op.drop_index("ix_run_edges_artifact_id_direction", table_name="run_edges")
    op.drop_table("run_edges")
    op.drop_index(op.f("ix_runs_recipe_sha256"), table_name="runs")
    op.drop_index(op.f("ix_runs_job_id"), table_name="runs")
    op.drop_table("runs")
    op.drop_index(op.f("ix_artifacts_kind"), table_name="artifacts")
    op.drop_table("artifacts")
