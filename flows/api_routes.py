"""The HTTP API's routes: thin translations between HTTP and the registry's Python API.

Every query parameter is bounded here (page sizes, depths, ids, string lengths) so that bad input
is a 422 naming the parameter before it reaches SQL; everything else the registry refuses comes
back as its own one-line message (see ``quantmill.flows.api`` for the status codes). Filters are
passed to ``quantmill.registry.queries`` as values, never spliced into SQL.
"""

import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, status
from fastapi.responses import JSONResponse

from quantmill.flows.api_auth import Auditor, Reader, RegistryDep, Writer
from quantmill.flows.api_models import (
    ArtifactDetailOut,
    ArtifactPageOut,
    ErrorOut,
    HealthOut,
    LineageOut,
    ReapOut,
    RunDetailOut,
    RunIn,
    RunListOut,
    VerifyOut,
)
from quantmill.registry import ArtifactNotFound, Registry
from quantmill.registry.models import RunRow
from quantmill.registry.queries import (
    MAX_PAGE_SIZE,
    ArtifactQuery,
    compare_artifacts,
    parse_metric_filter,
    search_artifacts,
)
from quantmill.registry.remote import MAX_ID, InvalidRun, max_length, record_run

#: The deepest lineage walk one request may ask for.
MAX_DEPTH = 100
#: Longest free-text filter accepted (artifact names are at most 255 characters).
MAX_FILTER_CHARS = 255
_ID_RE = re.compile(r"[0-9]{1,9}")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in (
        (401, "No, malformed, unknown or revoked bearer token."),
        (403, "The token's role may not use this route."),
        (422, "A parameter or the body is invalid; `detail` names it."),
    )
}
_NOT_FOUND = {404: {"model": ErrorOut, "description": "No such artifact or run."},
              409: {"model": ErrorOut, "description": "An ambiguous sha256 prefix."}}

public = APIRouter(tags=["service"])
reader = APIRouter(tags=["read (auditor and writer tokens)"], responses=_ERRORS)
auditor = APIRouter(tags=["audit (auditor tokens only)"], responses=_ERRORS)
writer = APIRouter(tags=["write (writer tokens only)"], responses=_ERRORS)

Ref = Annotated[str, Path(description="Artifact id, or sha256 prefix of 6 to 64 hex characters.",
                          max_length=64)]
Direction = Annotated[Literal["upstream", "downstream"],
                      Query(description="upstream: what it was made from; downstream: what was "
                            "made from it.")]
Depth = Annotated[int, Query(ge=1, le=MAX_DEPTH, description="Maximum number of runs walked.")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
Offset = Annotated[int, Query(ge=0, le=MAX_ID)]
#: Text filters are plain values; NUL alone is refused up front (PostgreSQL cannot store or
#: compare it, so it would otherwise fail as a driver error on one database only).
NO_NUL = r"^[^\x00]*$"
Filter = Annotated[str | None, Query(min_length=1, max_length=MAX_FILTER_CHARS, pattern=NO_NUL)]


def parse_ref(text: str) -> int | str:
    """An artifact id (up to 9 digits) or a sha256 prefix; the store rejects malformed ones."""
    return int(text) if _ID_RE.fullmatch(text) else text


def _artifact_id(registry: Registry, ref: str) -> int:
    return registry.get_artifact(parse_ref(ref)).id


def _lineage(registry: Registry, ref: str, direction: str, depth: int) -> Any:
    artifact_id = _artifact_id(registry, ref)
    walk = registry.upstream if direction == "upstream" else registry.downstream
    return walk(artifact_id, max_depth=depth)


def _run_detail(registry: Registry, run_id: int) -> dict[str, Any]:
    run = registry.get_run(run_id)
    return {
        "run": run.to_json(),
        "edges": [edge.to_json() for edge in registry.run_edges(run_id)],
        "metrics": [metric.to_json() for metric in registry.metrics_for_run(run_id)],
        "corrections": [c.to_json() for c in registry.corrections_for("run", run_id)],
    }


# --- no token ----------------------------------------------------------------------------------


@public.get("/health", response_model=HealthOut,
            responses={503: {"model": ErrorOut, "description": "The database is unavailable."}})
def health(request: Request, registry: RegistryDep) -> dict[str, Any]:
    """Liveness: the database answers, and the schema revision the service runs on. No data."""
    registry.head()  # a cheap query: raises (503) when the database is gone
    return {"status": "ok", "schema_revision": request.app.state.schema_revision}


# --- readers -----------------------------------------------------------------------------------


@reader.get("/artifacts", response_model=ArtifactPageOut)
def list_artifacts(
    registry: RegistryDep,
    _token: Reader,
    kind: Filter = None,
    format: Filter = None,
    method: Filter = None,
    bits: Annotated[int | None, Query(ge=1, le=32)] = None,
    base_model: Annotated[str | None, Query(
        max_length=64, description="The base model's artifact id or sha256 prefix.")] = None,
    metric: Annotated[list[str], Query(
        max_length=20, description="Metric filter, repeatable: e.g. `perplexity<=30.5`.")] = [],  # noqa: B006
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    name: Filter = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Search artifacts; every filter is optional and they combine with AND."""
    query = ArtifactQuery(
        kind=kind,
        format=format,
        method=method,
        bits=bits,
        base_model=parse_ref(base_model) if base_model is not None else None,
        metrics=tuple(parse_metric_filter(text) for text in metric),
        created_after=created_after,
        created_before=created_before,
        name_contains=name,
    )
    page = search_artifacts(registry, query, limit=limit, offset=offset)
    return {
        "items": [artifact.to_json() for artifact in page.items],
        "total": page.total,
        "limit": page.limit,
        "offset": page.offset,
        "next_offset": page.next_offset,
    }


@reader.get("/artifacts/{ref}", response_model=ArtifactDetailOut, responses=_NOT_FOUND)
def get_artifact(registry: RegistryDep, _token: Reader, ref: Ref) -> dict[str, Any]:
    """One artifact with the places it is stored (primary first), its metrics and the
    corrections made to it."""
    artifact = registry.get_artifact(parse_ref(ref))
    return {
        "artifact": artifact.to_json(),
        "locations": [place.to_json() for place in registry.locations(artifact.id)],
        "metrics": [m.to_json() for m in registry.metrics_for_artifact(artifact.id)],
        "corrections": [c.to_json() for c in registry.corrections_for("artifact", artifact.id)],
    }


@reader.get("/artifacts/{ref}/lineage", response_model=LineageOut, responses=_NOT_FOUND)
def get_lineage(
    registry: RegistryDep, _token: Reader, ref: Ref, direction: Direction = "upstream",
    depth: Depth = 50,
) -> dict[str, Any]:
    """The artifact's lineage graph: artifacts (with their depth), runs, edges and metrics."""
    return _lineage(registry, ref, direction, depth).to_json()


@reader.get("/runs/{run_id}", response_model=RunDetailOut, responses=_NOT_FOUND)
def get_run(
    registry: RegistryDep, _token: Reader, run_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> dict[str, Any]:
    """One run with its input/output edges, its metrics and its corrections."""
    return _run_detail(registry, run_id)


@reader.get("/runs", response_model=RunListOut)
def list_runs(
    registry: RegistryDep,
    _token: Reader,
    job_id: Annotated[str | None, Query(
        min_length=1, max_length=max_length(RunRow.__table__, "job_id"), pattern=NO_NUL)] = None,
    kind: Annotated[str | None, Query(
        min_length=1, max_length=max_length(RunRow.__table__, "kind"), pattern=NO_NUL)] = None,
    status: Literal["running", "succeeded", "failed", "abandoned"] | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Runs, newest first, optionally of one job, kind or status."""
    runs = registry.list_runs(job_id=job_id, kind=kind, status=status, limit=limit,
                              offset=offset)
    return {"items": [run.to_json() for run in runs], "limit": limit, "offset": offset}


@reader.get("/compare", responses=_NOT_FOUND)
def compare(
    registry: RegistryDep,
    _token: Reader,
    a: Annotated[str, Query(max_length=64, description="Artifact id or sha256 prefix.")],
    b: Annotated[str, Query(max_length=64, description="Artifact id or sha256 prefix.")],
) -> dict[str, Any]:
    """Two artifacts side by side: their facts, metrics and lineage differences."""
    return compare_artifacts(registry, parse_ref(a), parse_ref(b))


# --- auditors ----------------------------------------------------------------------------------


@auditor.get("/artifacts/{ref}/export", responses=_NOT_FOUND)
def export_lineage(
    registry: RegistryDep,
    _token: Auditor,
    ref: Ref,
    format: Annotated[Literal["json", "prov"], Query(
        description="json: quantmill's lineage document; prov: W3C PROV-JSON.")] = "json",
    direction: Direction = "upstream",
    depth: Depth = 50,
) -> JSONResponse:
    """The lineage graph as a self-contained document for an audit file."""
    # Imported here: the PROV library is heavy, and only this route needs it.
    from quantmill.registry.export import lineage_json, lineage_prov

    graph = _lineage(registry, ref, direction, depth)
    export = lineage_prov if format == "prov" else lineage_json
    return JSONResponse(export(registry, graph))


@auditor.get("/verify", response_model=VerifyOut)
def verify(
    registry: RegistryDep,
    _token: Auditor,
    expected_head: Annotated[str | None, Query(
        pattern=r"^[0-9a-fA-F]{64}$",
        description="A head hash written down earlier, which must still be in the chain.")] = None,
) -> dict[str, Any]:
    """Check the ledger: every link, and every record against its chained copy (the stored
    files are not re-hashed here: use `quantmill registry verify --files` next to the store)."""
    report = registry.verify(expected_head=expected_head)
    # the head the check itself reached (a second query could see a newer one)
    return {**report.to_json(), "head": {"entries": report.entries, "hash": report.head_hash}}


# --- writers -----------------------------------------------------------------------------------


@writer.post("/runs", response_model=RunDetailOut, status_code=status.HTTP_201_CREATED,
             responses={409: {"model": ErrorOut, "description": "Conflicts with stored content "
                              "(e.g. a sha256 registered with another size)."}})
def post_run(request: Request, registry: RegistryDep, token: Writer,
             body: RunIn) -> dict[str, Any]:
    """Register a finished run (inputs, outputs, metrics, end) in one transaction; recorded as
    started by ``token:<name>``. Inputs must be registered already; every output must be an
    object of a storage this service was started with, holding the claimed sha256 and size
    (422 otherwise); an artifact another run produced cannot be claimed (409); metrics may be
    about the run's own inputs and outputs only (422)."""
    try:
        run = record_run(registry, body.model_dump(), started_by=f"token:{token.name}",
                         claims=request.app.state.claims)
    except ArtifactNotFound as exc:  # in a body, an unknown reference is invalid input
        raise InvalidRun(str(exc)) from None
    return _run_detail(registry, run.id)


@writer.post("/runs/reap", response_model=ReapOut)
def reap_runs(
    registry: RegistryDep,
    _token: Writer,
    stale_after_s: Annotated[int, Query(
        ge=60, le=7 * 24 * 3600,
        description="A run whose heartbeat is older than this (seconds) counts as dead when "
                    "its host is not this server's.")] = 600,
) -> dict[str, Any]:
    """Close every running run whose process is dead as ``abandoned`` (see ``quantmill
    registry reap``), and list them with the reason."""
    reaped = registry.reap(stale_after=timedelta(seconds=stale_after_s))
    return {"items": [{"run": run.to_json(), "reason": reason} for run, reason in reaped]}
