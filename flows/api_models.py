"""The HTTP API's request and response bodies (pydantic), which make its OpenAPI schema useful.

Requests are strict (``extra="forbid"``, no type coercion): a worker that misspells a field or
sends ``"4"`` for a number gets a 422 naming the field, instead of a run recorded without it.
Field limits come from the registry's own columns (``quantmill.registry.remote.max_length``), so
the schema cannot drift from what the database accepts. Responses mirror the registry entities'
``to_json()``.
"""

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from quantmill.registry.models import ArtifactRow, MetricRow, RunEdgeRow, RunRow
from quantmill.registry.remote import MAX_ID, MAX_SIZE_BYTES, max_length

SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
HEX_PREFIX_PATTERN = r"^[0-9a-fA-F]{6,64}$"


def _text(table: Any, column: str, min_length: int = 1) -> Any:
    """A string type as long as the column allows (and not empty, unless ``min_length=0``)."""
    limit = max_length(table.__table__, column)
    return Annotated[str, StringConstraints(min_length=min_length, max_length=limit)]


Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
ArtifactRef = Id | Annotated[str, StringConstraints(pattern=HEX_PREFIX_PATTERN)]
Document = dict[str, Any]
Role = _text(RunEdgeRow, "role")
ArtifactKind = _text(ArtifactRow, "kind")
ArtifactName = _text(ArtifactRow, "name")
ArtifactFormat = _text(ArtifactRow, "format")
Evaluator = _text(MetricRow, "evaluator")
MetricName = _text(MetricRow, "name")
Unit = _text(MetricRow, "unit", min_length=0)
JobId = _text(RunRow, "job_id")
RunKind = _text(RunRow, "kind")
RunName = _text(RunRow, "name")
FlowRunId = _text(RunRow, "flow_run_id", min_length=0)
Host = _text(RunRow, "host")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InputIn(_Request):
    """An already registered artifact the run consumed."""

    artifact: ArtifactRef = Field(description="Artifact id, or sha256 (prefix of >= 6 hex).")
    role: Role = Field(description="What the run used it as, e.g. 'model', 'calibration'.")


class OutputIn(_Request):
    """An artifact the run produced (registered by its sha256; known content is reused)."""

    kind: ArtifactKind
    name: ArtifactName
    sha256: Sha256
    size_bytes: Annotated[int, Field(ge=0, le=MAX_SIZE_BYTES)]
    uri: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    format: ArtifactFormat
    role: Role
    metadata: Document = Field(default_factory=dict)


class MetricIn(_Request):
    """A measurement; name the artifact by ``artifact_sha256`` (e.g. an output of this run) or
    by ``artifact_id``, exactly one of them."""

    evaluator: Evaluator
    name: MetricName
    value: Annotated[float, Field(allow_inf_nan=False)]
    unit: Unit | None = None
    protocol: Document = Field(default_factory=dict)
    artifact_sha256: Sha256 | None = None
    artifact_id: Id | None = None
    dataset_artifact_id: Id | None = None

    @model_validator(mode="after")
    def _one_artifact(self) -> Self:
        if (self.artifact_sha256 is None) == (self.artifact_id is None):
            raise ValueError("give exactly one of artifact_sha256 or artifact_id")
        return self


class CompletionIn(_Request):
    """How the run ended; ``error`` is required for, and only for, a failed run."""

    status: Literal["succeeded", "failed"]
    details: Document = Field(default_factory=dict)
    error: Annotated[str, StringConstraints(min_length=1)] | None = None

    @model_validator(mode="after")
    def _error_iff_failed(self) -> Self:
        if (self.status == "failed") != (self.error is not None):
            raise ValueError("a failed run needs an error message; a succeeded run has none")
        return self


class RunIn(_Request):
    """A complete, finished run as a remote worker reports it (stored in one transaction)."""

    job_id: JobId
    kind: RunKind
    name: RunName
    recipe: Document
    plugins: dict[str, str]
    versions: dict[str, str]
    completion: CompletionIn
    inputs: list[InputIn] = Field(default_factory=list, max_length=1000)
    outputs: list[OutputIn] = Field(default_factory=list, max_length=1000)
    metrics: list[MetricIn] = Field(default_factory=list, max_length=10_000)
    details: Document = Field(default_factory=dict)
    flow_run_id: FlowRunId | None = None
    host: Host | None = Field(default=None, description="Where the run ran (as the worker says).")


# --- responses ---------------------------------------------------------------------------------


class HealthOut(BaseModel):
    status: Literal["ok"]
    schema_revision: str


class ArtifactOut(BaseModel):
    id: int
    kind: str
    name: str
    sha256: str
    size_bytes: int
    uri: str
    format: str
    metadata: Document
    created_at: datetime


class MetricOut(BaseModel):
    id: int
    run_id: int
    artifact_id: int
    evaluator: str
    dataset_artifact_id: int | None
    name: str
    value: float
    unit: str | None
    protocol: Document
    protocol_sha256: str
    created_at: datetime
    supersedes_id: int | None


class CorrectionOut(BaseModel):
    id: int
    target_type: str
    target_id: int
    changes: Document
    reason: str
    author: str
    created_at: datetime


class EdgeOut(BaseModel):
    run_id: int
    artifact_id: int
    direction: str
    role: str


class RunOut(BaseModel):
    id: int
    job_id: str
    kind: str
    name: str
    status: str
    recipe: Document
    recipe_sha256: str
    plugins: dict[str, str]
    versions: dict[str, str]
    details: Document
    flow_run_id: str | None
    host: str
    started_by: str
    started_at: datetime
    finished_at: datetime | None
    error: str | None


class LocationOut(BaseModel):
    """A place the artifact's bytes can be read; ``id``, ``created_by`` and ``created_at`` are
    None for the artifact's primary ``uri`` when no location record names it."""

    id: int | None
    artifact_id: int
    uri: str
    role: str
    details: Document
    created_by: str | None
    created_at: datetime | None


class ArtifactDetailOut(BaseModel):
    artifact: ArtifactOut
    locations: list[LocationOut]
    metrics: list[MetricOut]
    corrections: list[CorrectionOut]


class ArtifactPageOut(BaseModel):
    items: list[ArtifactOut]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class RunDetailOut(BaseModel):
    run: RunOut
    edges: list[EdgeOut]
    metrics: list[MetricOut]
    corrections: list[CorrectionOut]


class RunListOut(BaseModel):
    items: list[RunOut]
    limit: int
    offset: int


class ReapedRunOut(BaseModel):
    run: RunOut
    reason: str


class ReapOut(BaseModel):
    items: list[ReapedRunOut]


class LineageArtifactOut(ArtifactOut):
    depth: int


class LineageOut(BaseModel):
    root_id: int
    direction: Literal["upstream", "downstream"]
    max_depth: int
    artifacts: list[LineageArtifactOut]
    runs: list[RunOut]
    edges: list[EdgeOut]
    metrics: list[MetricOut]


class LedgerHeadOut(BaseModel):
    entries: int
    hash: str


class ProblemOut(BaseModel):
    kind: str
    record: str
    detail: str


class VerifyOut(BaseModel):
    ok: bool
    entries: int
    head_hash: str
    files_checked: int
    runs: dict[str, int]
    problems: list[ProblemOut]
    head: LedgerHeadOut


class ErrorOut(BaseModel):
    """Every error answer: one line saying what was wrong."""

    detail: str
