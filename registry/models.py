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

from quantmill.registry.entities import LOCATION_ROLES

#: Deterministic constraint names: migrations can refer to them, and SQLite batch migrations can
#: recreate them. Keep in step with the names written out in ``alembic/versions``.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_STATUSES = ("running", "succeeded", "failed", "abandoned")
#: A completion closes a run: the statuses a ``run_completions`` row may carry (``abandoned``:
#: its process died, found by ``Registry.reap``).
FINAL_STATUSES = ("succeeded", "failed", "abandoned")
EDGE_DIRECTIONS = ("input", "output")
TOKEN_ROLES = ("auditor", "writer")
#: What a correction may point at.
CORRECTION_TARGETS = ("artifact", "run", "metric")


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


class ArtifactLocationRow(Base):
    """One more place where an artifact's bytes live (a local file, an S3 copy, the published
    copy), appended like every record: a moved or deleted copy is a new record, never an edit.

    The artifact's own ``uri`` stays its primary location; these rows add to it. One row per
    (artifact, uri): recording a known place again is a no-op.
    """

    __tablename__ = "artifact_locations"
    __table_args__ = (
        UniqueConstraint("artifact_id", "uri"),
        CheckConstraint(_in_list("role", LOCATION_ROLES), name="role"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    artifact_id: Mapped[int] = mapped_column(Integer, ForeignKey("artifacts.id"))
    uri: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(32))
    #: Non-secret facts a reader needs besides the URI (backend, endpoint, region, ...).
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunRow(Base):
    """The start of one execution (calibration, quantization, evaluation, ...) of a job.

    Written once and never updated: how the run ended is a ``RunCompletionRow`` appended later.
    """

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(255))
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    recipe_sha256: Mapped[str] = mapped_column(String(64), index=True)
    plugins: Mapped[dict[str, str]] = mapped_column(JSON)
    versions: Mapped[dict[str, str]] = mapped_column(JSON)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    started_by: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunCompletionRow(Base):
    """How a run ended: at most one per run (the unique key makes a second finish fail, even
    when two workers race), with the details known only at the end."""

    __tablename__ = "run_completions"
    __table_args__ = (
        UniqueConstraint("run_id"),
        CheckConstraint(_in_list("status", FINAL_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("runs.id"))
    status: Mapped[str] = mapped_column(String(16))
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunHeartbeatRow(Base):
    """A running run's process and when it last said it was alive (``Registry.reap``).

    Liveness, not evidence: updated in place and not chained. An abandoned run's completion
    copies what its heartbeat said."""

    __tablename__ = "run_heartbeats"

    run_id: Mapped[int] = mapped_column(Integer, ForeignKey("runs.id"), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    boot_id: Mapped[str] = mapped_column(String(64))
    process_start: Mapped[str] = mapped_column(String(32))
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


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
    #: A corrected measurement points at the one it replaces; queries use the newest only.
    supersedes_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("metrics.id"), unique=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CorrectionRow(Base):
    """A correction of an artifact's, run's or metric's recorded facts: the old record stays as
    it was, and this one says what should be read instead, why, and who said so."""

    __tablename__ = "corrections"
    __table_args__ = (
        CheckConstraint(_in_list("target_type", CORRECTION_TARGETS), name="target_type"),
        Index("ix_corrections_target", "target_type", "target_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_type: Mapped[str] = mapped_column(String(16))
    target_id: Mapped[int] = mapped_column(Integer)
    changes: Mapped[dict[str, Any]] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiTokenRow(Base):
    """A bearer token of the HTTP API: only its sha256 is stored, never the token itself."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        UniqueConstraint("name"),
        UniqueConstraint("token_sha256"),
        CheckConstraint(_in_list("role", TOKEN_ROLES), name="role"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiTokenRevocationRow(Base):
    """The revocation of a token (appended; the token row itself never changes)."""

    __tablename__ = "api_token_revocations"
    __table_args__ = (UniqueConstraint("token_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_id: Mapped[int] = mapped_column(Integer, ForeignKey("api_tokens.id"))
    revoked_by: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LedgerRow(Base):
    """One link of the tamper-evident chain: a copy of one record's content, its hash, and the
    hash of the previous link, so editing or deleting any record (or link) breaks the chain.

    ``seq`` is assigned by the writer (previous + 1, never by the database) and is the primary
    key, so two writers that raced for the same position cannot both commit: the chain cannot fork.
    """

    __tablename__ = "ledger"
    __table_args__ = (
        UniqueConstraint("entry_hash"),
        Index("ix_ledger_record", "record_type", "record_id"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    record_type: Mapped[str] = mapped_column(String(32))
    record_id: Mapped[int] = mapped_column(Integer)
    #: The record's canonical JSON, exactly as hashed (lets ``verify`` name changed fields).
    payload: Mapped[str] = mapped_column(Text)
    record_sha256: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


#: The tables whose rows are chained and protected from UPDATE and DELETE, by record type.
CHAINED_TABLES: dict[str, type[Base]] = {
    "artifacts": ArtifactRow,
    "artifact_locations": ArtifactLocationRow,
    "runs": RunRow,
    "run_edges": RunEdgeRow,
    "run_completions": RunCompletionRow,
    "metrics": MetricRow,
    "corrections": CorrectionRow,
    "api_tokens": ApiTokenRow,
    "api_token_revocations": ApiTokenRevocationRow,
}
#: Append-only at the database level too: these refuse UPDATE and DELETE (triggers).
APPEND_ONLY_TABLES = (*CHAINED_TABLES, "ledger")
