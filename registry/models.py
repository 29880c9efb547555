"""The registry's tables as SQLAlchemy 2 typed declarative classes.

These classes stay inside the registry: the store converts rows to frozen entities
(``quantmill.registry.entities``) before anything leaves it. Migration scripts never import this
module (they describe the schema as it was when they were written); ``alembic/env.py`` does, so
the drift test can compare the migrated database with these models.

Column types are spelled out wherever the Python annotation alone is ambiguous (``Float`` for
measurements, ``BigInteger`` for sizes, ``JSON`` for documents, timezone-aware ``DateTime``), so
SQLite and PostgreSQL get the same schema as the hand-written migration.
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Deterministic constraint names: migrations can refer to them, and SQLite batch migrations can
#: recreate them. Keep in step with the names written out in ``alembic/versions``.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_STATUSES = ("running", "succeeded", "failed")
EDGE_DIRECTIONS = ("input", "output")


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (the only zone the registry stores)."""
    return datetime.now(UTC)


def _in_list(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    """The one declarative base; its metadata is alembic's ``target_metadata``."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ArtifactRow(Base):
    """A content-addressed file or directory: a model, data set, checkpoint, report, ..."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    uri: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(64))
    # ``metadata`` is reserved by declarative classes, hence the attribute name.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunRow(Base):
    """One execution (calibration, quantization, evaluation, ...) belonging to a job."""

    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(_in_list("status", RUN_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    recipe_sha256: Mapped[str] = mapped_column(String(64), index=True)
    plugins: Mapped[dict[str, str]] = mapped_column(JSON)
    versions: Mapped[dict[str, str]] = mapped_column(JSON)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    started_by: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)


class RunEdgeRow(Base):
    """An artifact consumed (``input``) or produced (``output``) by a run, in a named role."""

    __tablename__ = "run_edges"
    __table_args__ = (
        UniqueConstraint("run_id", "artifact_id", "direction", "role"),
        CheckConstraint(_in_list("direction", EDGE_DIRECTIONS), name="direction"),
        # Lineage walks from an artifact to the runs that made or used it.
        Index("ix_run_edges_artifact_id_direction", "artifact_id", "direction"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("runs.id"))
    artifact_id: Mapped[int] = mapped_column(Integer, ForeignKey("artifacts.id"))
    direction: Mapped[str] = mapped_column(String(8))
    role: Mapped[str] = mapped_column(String(64))


class MetricRow(Base):
    """One measured number of an artifact, by an evaluator under a protocol."""

    __tablename__ = "metrics"
    __table_args__ = (
        # find_metrics: reuse an identical earlier measurement.
        Index("ix_metrics_artifact_id_evaluator", "artifact_id", "evaluator", "protocol_sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("runs.id"), index=True)
    artifact_id: Mapped[int] = mapped_column(Integer, ForeignKey("artifacts.id"))
    evaluator: Mapped[str] = mapped_column(String(64))
    dataset_artifact_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("artifacts.id"))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str | None] = mapped_column(String(32))
    protocol: Mapped[dict[str, Any]] = mapped_column(JSON)
    protocol_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
