"""Row -> entity conversion, shared by the store and the lineage queries.

Why a module of its own: it is the single place that knows both the ORM classes and the
entities, and it normalises what the two databases return differently (SQLite hands back naive
datetimes, PostgreSQL aware ones in the session's time zone): entities always carry UTC.
"""

from datetime import UTC, datetime

from quantmill.registry.entities import Artifact, MetricRecord, Run, RunEdge
from quantmill.registry.models import ArtifactRow, MetricRow, RunEdgeRow, RunRow


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime; naive values are UTC by the registry's convention."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def artifact_entity(row: ArtifactRow) -> Artifact:
    return Artifact(
        id=row.id,
        kind=row.kind,
        name=row.name,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        uri=row.uri,
        format=row.format,
        metadata=dict(row.metadata_ or {}),
        created_at=as_utc(row.created_at),
    )


def run_entity(row: RunRow) -> Run:
    return Run(
        id=row.id,
        job_id=row.job_id,
        kind=row.kind,
        name=row.name,
        status=row.status,
        recipe=dict(row.recipe or {}),
        recipe_sha256=row.recipe_sha256,
        plugins=dict(row.plugins or {}),
        versions=dict(row.versions or {}),
        details=dict(row.details or {}),
        flow_run_id=row.flow_run_id,
        host=row.host,
        started_by=row.started_by,
        started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at) if row.finished_at is not None else None,
        error=row.error,
    )


def edge_entity(row: RunEdgeRow) -> RunEdge:
    return RunEdge(
        run_id=row.run_id, artifact_id=row.artifact_id, direction=row.direction, role=row.role
    )


def metric_entity(row: MetricRow) -> MetricRecord:
    return MetricRecord(
        id=row.id,
        run_id=row.run_id,
        artifact_id=row.artifact_id,
        evaluator=row.evaluator,
        dataset_artifact_id=row.dataset_artifact_id,
        name=row.name,
        value=float(row.value),
        unit=row.unit,
        protocol=dict(row.protocol or {}),
        protocol_sha256=row.protocol_sha256,
        created_at=as_utc(row.created_at),
    )
