"""Row -> entity conversion, shared by the store and the lineage queries.

Why a module of its own: it is the single place that knows both the ORM classes and the
entities, and it normalises what the two databases return differently (SQLite hands back naive
datetimes, PostgreSQL aware ones in the session's time zone): entities always carry UTC.
"""

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import Select, select

from quantmill.registry.entities import (
    Artifact,
    ArtifactLocation,
    Correction,
    MetricRecord,
    Run,
    RunEdge,
)
from quantmill.registry.models import (
    ArtifactLocationRow,
    ArtifactRow,
    CorrectionRow,
    MetricRow,
    RunCompletionRow,
    RunEdgeRow,
    RunRow,
)


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


def location_entity(row: ArtifactLocationRow) -> ArtifactLocation:
    return ArtifactLocation(
        id=row.id,
        artifact_id=row.artifact_id,
        uri=row.uri,
        role=row.role,
        details=dict(row.details or {}),
        created_by=row.created_by,
        created_at=as_utc(row.created_at),
    )


def artifact_locations(
    artifact_id: int, primary_uri: str, rows: Iterable[ArtifactLocationRow]
) -> list[ArtifactLocation]:
    """Every place of one artifact: its primary ``uri`` first (the record naming it, else a
    synthesized one, since artifacts registered without location records still live there),
    then the other records in id order."""
    ordered = sorted(rows, key=lambda row: row.id)
    primary = next((row for row in ordered if row.uri == primary_uri), None)
    first = location_entity(primary) if primary is not None else ArtifactLocation(
        id=None, artifact_id=artifact_id, uri=primary_uri, role="stored", details={},
        created_by=None, created_at=None,
    )
    return [first, *(location_entity(row) for row in ordered if row is not primary)]


def run_entity(row: RunRow, completion: RunCompletionRow | None) -> Run:
    """A run as its start record plus, once it ended, its completion (status, end, error, and
    the details known only at the end, merged over the start's)."""
    return Run(
        id=row.id,
        job_id=row.job_id,
        kind=row.kind,
        name=row.name,
        status=completion.status if completion is not None else "running",
        recipe=dict(row.recipe or {}),
        recipe_sha256=row.recipe_sha256,
        plugins=dict(row.plugins or {}),
        versions=dict(row.versions or {}),
        details={**(row.details or {}), **((completion.details or {}) if completion else {})},
        flow_run_id=row.flow_run_id,
        host=row.host,
        started_by=row.started_by,
        started_at=as_utc(row.started_at),
        finished_at=as_utc(completion.finished_at) if completion is not None else None,
        error=completion.error if completion is not None else None,
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
        supersedes_id=row.supersedes_id,
    )


def correction_entity(row: CorrectionRow) -> Correction:
    return Correction(
        id=row.id,
        target_type=row.target_type,
        target_id=row.target_id,
        changes=dict(row.changes or {}),
        reason=row.reason,
        author=row.author,
        created_at=as_utc(row.created_at),
    )


def runs_query() -> Select[tuple[RunRow, RunCompletionRow | None]]:
    """Runs with their completion (``None`` while running): feed rows to ``run_entity``."""
    return select(RunRow, RunCompletionRow).outerjoin(
        RunCompletionRow, RunCompletionRow.run_id == RunRow.id
    )
