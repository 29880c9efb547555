"""Auditor's queries over the registry: search artifacts, compare two, describe one.

Why a module apart from the store: the store records history and answers the questions the flows
ask; auditors ask broader ones (every 4-bit RTN checkpoint derived from this base model with
perplexity under 30, made last week) that combine lineage, metadata and measurements. Every
query here is plain SQLAlchemy Core/ORM with bound parameters, so SQLite and PostgreSQL give the
same answers, and no user text ever becomes SQL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar, get_args

from sqlalchemy import ColumnElement, Integer, String, cast, exists, func, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.functions import FunctionElement

from quantmill.registry.convert import (
    artifact_entity,
    correction_entity,
    edge_entity,
    metric_entity,
    run_entity,
    runs_query,
)
from quantmill.registry.entities import Artifact, MetricRecord, Run
from quantmill.registry.errors import InvalidQuery
from quantmill.registry.lookup import HEX_RE, MIN_PREFIX, find_artifact_row
from quantmill.registry.models import ArtifactRow, CorrectionRow, MetricRow, RunEdgeRow, RunRow
from quantmill.registry.store import Registry, metric_superseded

#: The largest page a search returns: bigger answers are paged, never one unbounded read.
MAX_PAGE_SIZE = 500
#: Longest accepted text filter; longer values cannot match any stored field.
MAX_TEXT = 1000

Operator = Literal["<", "<=", ">", ">=", "="]
OPERATORS: tuple[str, ...] = get_args(Operator)
METRIC_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_FILTER_RE = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(<=|>=|<|>|=)\s*(\S+)\s*$")
#: Longer metric filters are refused before any matching (and never echoed back whole).
MAX_FILTER_LENGTH = 200

T = TypeVar("T")


# --- filters -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricFilter:
    """``name op value``: the artifact has a current measurement ``name`` satisfying it."""

    name: str
    op: Operator
    value: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not METRIC_NAME_RE.match(self.name):
            raise InvalidQuery(
                f"invalid metric name {self.name!r}: use letters, digits, '_', '.' and '-'"
            )
        if self.op not in OPERATORS:
            raise InvalidQuery(
                f"invalid metric operator {self.op!r}: use one of {', '.join(OPERATORS)}"
            )
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            raise InvalidQuery(f"metric filter value must be a number, got {self.value!r}")
        if not math.isfinite(self.value):
            raise InvalidQuery(f"metric filter value must be finite, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value:g}"


def parse_metric_filter(text: str) -> MetricFilter:
    """``"perplexity<=30.5"`` -> ``MetricFilter("perplexity", "<=", 30.5)``."""
    if isinstance(text, str) and len(text) > MAX_FILTER_LENGTH:
        raise InvalidQuery(f"invalid metric filter: longer than {MAX_FILTER_LENGTH} characters "
                           f"(starts {text[:40]!r})")
    found = _FILTER_RE.match(text) if isinstance(text, str) else None
    if found is None:
        raise InvalidQuery(
            f"invalid metric filter {text!r}: expected NAME OP NUMBER, e.g. 'perplexity<=30.5', "
            f"with OP one of {', '.join(OPERATORS)}"
        )
    name, op, raw = found.groups()
    try:
        value = float(raw)
    except ValueError:
        raise InvalidQuery(f"invalid metric filter {text!r}: {raw!r} is not a number") from None
    if "_" in raw or not math.isfinite(value):  # float() takes "1_0", "nan", "inf"
        raise InvalidQuery(f"invalid metric filter {text!r}: {raw!r} is not a finite number")
    return MetricFilter(name=name, op=op, value=value)  # type: ignore[arg-type]


def _check_text(label: str, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidQuery(f"{label} must be text, got {value!r}")
    if not value:
        raise InvalidQuery(f"{label} must not be empty")
    if "\x00" in value:
        # PostgreSQL cannot hold NUL in text at all; refuse it the same way on SQLite.
        raise InvalidQuery(f"{label} contains a NUL character")
    if len(value) > MAX_TEXT:
        raise InvalidQuery(f"{label} is longer than {MAX_TEXT} characters")


def _utc(label: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidQuery(f"{label} must be a datetime, got {value!r}")
    # The registry stores UTC; SQLite compares the stored text, so compare in UTC wall time.
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise InvalidQuery(f"{label} is out of range: {value.isoformat()}") from None


def check_reference(label: str, ref: int | str) -> int | str:
    """An artifact reference in canonical form (id, or lower-case hex prefix), else
    ``InvalidQuery``: the shape is checked before any SQL, whether it exists is not."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        if ref < 1:
            raise InvalidQuery(f"{label}: an artifact id is a positive integer, got {ref}")
        return ref
    if isinstance(ref, str):
        prefix = ref.strip().lower()
        if MIN_PREFIX <= len(prefix) <= 64 and HEX_RE.match(prefix):
            return prefix
    raise InvalidQuery(
        f"{label}: {ref!r} is not an artifact id or a sha256 prefix of {MIN_PREFIX} to 64 hex "
        f"characters"
    )


@dataclass(frozen=True)
class ArtifactQuery:
    """What to look for; every field is optional and the given ones must all hold.

    ``name_contains`` is a case-sensitive substring (``%`` and ``_`` are plain characters).
    ``created_after`` is inclusive, ``created_before`` exclusive; naive datetimes are UTC.
    ``base_model`` (id or sha256 prefix) keeps artifacts made from it at any depth, not itself.
    """

    kind: str | None = None
    format: str | None = None
    method: str | None = None
    bits: int | None = None
    base_model: int | str | None = None
    metrics: tuple[MetricFilter, ...] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    name_contains: str | None = None

    def __post_init__(self) -> None:
        for label in ("kind", "format", "method", "name_contains"):
            _check_text(label, getattr(self, label))
        if self.bits is not None and (
            isinstance(self.bits, bool) or not isinstance(self.bits, int)
            or not 1 <= self.bits <= 32
        ):
            raise InvalidQuery(f"bits must be an integer from 1 to 32, got {self.bits!r}")
        if self.base_model is not None:
            object.__setattr__(self, "base_model", check_reference("base_model", self.base_model))
        metrics = tuple(self.metrics)
        for metric in metrics:
            if not isinstance(metric, MetricFilter):
                raise InvalidQuery(f"metrics must be MetricFilter values, got {metric!r}")
        object.__setattr__(self, "metrics", metrics)
        after = _utc("created_after", self.created_after)
        before = _utc("created_before", self.created_before)
        if after is not None and before is not None and after >= before:
            raise InvalidQuery(
                f"created_after ({after.isoformat()}) must be earlier than created_before "
                f"({before.isoformat()})"
            )
        object.__setattr__(self, "created_after", after)
        object.__setattr__(self, "created_before", before)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a longer answer; ``total`` counts every match, not just this page."""

    items: list[T]
    total: int
    limit: int
    offset: int

    @property
    def next_offset(self) -> int | None:
        """The ``offset`` of the next page, or None when this is the last one."""
        following = self.offset + len(self.items)
        return following if self.items and following < self.total else None

    def to_json(self) -> dict[str, Any]:
        return {
            "items": [_to_json(item) for item in self.items],
            "total": self.total,
            "limit": self.limit,
            "offset": self.offset,
            "next_offset": self.next_offset,
        }


def _to_json(item: Any) -> Any:
    return item.to_json() if hasattr(item, "to_json") else item


def check_page(limit: int, offset: int) -> None:
    """Refuse pages that are empty, unbounded or start before the first item."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidQuery(f"limit must be from 1 to {MAX_PAGE_SIZE}, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidQuery(f"offset must be 0 or more, got {offset!r}")


# --- SQL building blocks ---------------------------------------------------------------------


class _position(FunctionElement[int]):
    """1-based position of a substring (0 when absent): a case-sensitive, wildcard-free
    ``contains`` that both databases evaluate identically (SQLite's LIKE ignores ASCII case,
    PostgreSQL's does not)."""

    type = Integer()
    inherit_cache = True
    name = "position"


@compiles(_position)
def _position_sqlite(element: _position, compiler: Any, **kw: Any) -> str:
    return f"instr({compiler.process(element.clauses, **kw)})"


@compiles(_position, "postgresql")
def _position_postgresql(element: _position, compiler: Any, **kw: Any) -> str:
    return f"strpos({compiler.process(element.clauses, **kw)})"


def reach(root_id: int, direction: Literal["upstream", "downstream"], include_root: bool) -> Any:
    """A SELECT of the ids of every artifact upstream or downstream of ``root_id`` (one
    recursive CTE, no depth limit: UNION drops rows already found, so a cycle ends)."""
    near_dir, far_dir = ("output", "input") if direction == "upstream" else ("input", "output")
    if include_root:
        seed = select(ArtifactRow.id.label("artifact_id")).where(ArtifactRow.id == root_id)
    else:
        first_near = aliased(RunEdgeRow, name="first_near")
        first_far = aliased(RunEdgeRow, name="first_far")
        seed = (
            select(first_far.artifact_id.label("artifact_id"))
            .join(first_near, first_near.run_id == first_far.run_id)
            .where(first_near.artifact_id == root_id, first_near.direction == near_dir,
                   first_far.direction == far_dir)
        )
    found = seed.cte(f"{direction}_reach", recursive=True)
    near = aliased(RunEdgeRow, name="near_edge")
    far = aliased(RunEdgeRow, name="far_edge")
    step = (
        select(far.artifact_id)
        .select_from(found)
        .join(near, (near.artifact_id == found.c.artifact_id) & (near.direction == near_dir))
        .join(far, (far.run_id == near.run_id) & (far.direction == far_dir))
    )
    found = found.union(step)
    return select(found.c.artifact_id)


_COMPARE = {
    "<": lambda column, value: column < value,
    "<=": lambda column, value: column <= value,
    ">": lambda column, value: column > value,
    ">=": lambda column, value: column >= value,
    "=": lambda column, value: column == value,
}


def _conditions(
    registry: Registry, session: Session, query: ArtifactQuery
) -> list[ColumnElement[bool]]:
    """The WHERE conditions for ``query``: every value is a bound parameter."""
    conditions: list[ColumnElement[bool]] = []
    if query.kind is not None:
        conditions.append(ArtifactRow.kind == query.kind)
    if query.format is not None:
        conditions.append(ArtifactRow.format == query.format)
    if query.method is not None:
        conditions.append(ArtifactRow.metadata_["method"].as_string() == query.method)
    if query.bits is not None:
        # Compared as text, not with as_integer(): PostgreSQL's cast to integer raises on a
        # value like "4.5" or "four" in ANY row's metadata, and one odd artifact must not break
        # every search. JSON 4 reads as "4" on both databases.
        bits = cast(ArtifactRow.metadata_["bits"].as_string(), String)
        conditions.append(bits == str(query.bits))
    if query.base_model is not None:
        root = find_artifact_row(session, query.base_model)
        conditions.append(ArtifactRow.id.in_(reach(root.id, "downstream", include_root=False)))
    for metric in query.metrics:
        conditions.append(exists(
            select(MetricRow.id).where(
                MetricRow.artifact_id == ArtifactRow.id,
                MetricRow.name == metric.name,
                _COMPARE[metric.op](MetricRow.value, metric.value),
                ~metric_superseded(),
                _by_producer(),
            )
        ))
    if query.created_after is not None:
        conditions.append(ArtifactRow.created_at >= query.created_after)
    if query.created_before is not None:
        conditions.append(ArtifactRow.created_at < query.created_before)
    if query.name_contains is not None:
        conditions.append(_position(ArtifactRow.name, query.name_contains) > 0)
    return conditions


# --- search ------------------------------------------------------------------------------------


def _by_producer() -> Any:
    """SQL condition on a ``MetricRow`` of ``ArtifactRow``: recorded by the run that produced
    the artifact, or by any run when nothing produced it (a registered input). A search by
    metric reads what the audited job measured, never a later claim by another run."""
    produced = select(RunEdgeRow.run_id).where(RunEdgeRow.artifact_id == ArtifactRow.id,
                                               RunEdgeRow.direction == "output")
    return or_(MetricRow.run_id.in_(produced), ~exists(produced))


def search_artifacts(
    registry: Registry, query: ArtifactQuery, limit: int = 50, offset: int = 0
) -> Page[Artifact]:
    """Artifacts matching every field of ``query``, newest first (created_at, then id).

    Raises ``InvalidQuery`` for a bad page, ``ArtifactNotFound``/``AmbiguousReference`` for a
    ``base_model`` that names no single artifact.
    """
    check_page(limit, offset)
    if not isinstance(query, ArtifactQuery):
        raise InvalidQuery(f"expected an ArtifactQuery, got {type(query).__name__}")
    with registry.session() as session:
        conditions = _conditions(registry, session, query)
        total = session.scalar(select(func.count(ArtifactRow.id)).where(*conditions)) or 0
        rows = session.scalars(
            select(ArtifactRow)
            .where(*conditions)
            .order_by(ArtifactRow.created_at.desc(), ArtifactRow.id.desc())
            .limit(limit)
            .offset(offset)
        )
        items = [artifact_entity(row) for row in rows]
    return Page(items=items, total=int(total), limit=limit, offset=offset)


# --- one artifact, in detail -------------------------------------------------------------------


@dataclass
class _Side:
    """What ``compare_artifacts`` reads about one artifact."""

    artifact: Artifact
    metrics: list[MetricRecord]
    producers: list[Run]
    roots: list[Artifact]
    current: dict[tuple[str, str, str], MetricRecord] = field(default_factory=dict)


def _producers(session: Session, artifact_id: int) -> list[Run]:
    """Runs with an output edge to the artifact, oldest first (the first one registered it)."""
    run_ids = select(RunEdgeRow.run_id).where(
        RunEdgeRow.artifact_id == artifact_id, RunEdgeRow.direction == "output"
    )
    rows = session.execute(runs_query().where(RunRow.id.in_(run_ids)).order_by(RunRow.id))
    return [run_entity(row, done) for row, done in rows]


def _roots(session: Session, artifact_id: int) -> list[Artifact]:
    """Upstream artifacts that no run produced (base models, data sets); an artifact without
    a producer is its own root."""
    produced = exists(select(RunEdgeRow.id).where(
        RunEdgeRow.artifact_id == ArtifactRow.id, RunEdgeRow.direction == "output"))
    rows = session.scalars(
        select(ArtifactRow)
        .where(ArtifactRow.id.in_(reach(artifact_id, "upstream", include_root=True)), ~produced)
        .order_by(ArtifactRow.id)
    )
    return [artifact_entity(row) for row in rows]


def _side(registry: Registry, session: Session, ref: int | str) -> _Side:
    row = find_artifact_row(session, ref)
    metrics = [metric_entity(m) for m in session.scalars(
        select(MetricRow).where(MetricRow.artifact_id == row.id, ~metric_superseded())
        .order_by(MetricRow.id))]
    side = _Side(artifact_entity(row), metrics, _producers(session, row.id),
                 _roots(session, row.id))
    for metric in metrics:  # ascending ids: the newest measurement of a key wins
        side.current[(metric.evaluator, metric.name, metric.protocol_sha256)] = metric
    return side


def flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``);
    lists and other values are leaves."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        dotted = f"{prefix}{key}"
        if isinstance(item, Mapping) and item:
            flat.update(flatten(item, f"{dotted}."))
        else:
            flat[dotted] = item
    return flat


def diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{"key", "a", "b"}`` for the dotted keys whose values differ; a side that lacks
    the key has no ``"a"``/``"b"`` entry (JSON cannot tell a missing value from null)."""
    flat_a, flat_b = flatten(a), flatten(b)
    rows = []
    for key in sorted(set(flat_a) | set(flat_b)):
        if key in flat_a and key in flat_b and flat_a[key] == flat_b[key]:
            continue
        row: dict[str, Any] = {"key": key}
        if key in flat_a:
            row["a"] = flat_a[key]
        if key in flat_b:
            row["b"] = flat_b[key]
        rows.append(row)
    return rows


def _metric_rows(a: _Side, b: _Side) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(set(a.current) | set(b.current)):
        ma, mb = a.current.get(key), b.current.get(key)
        evaluator, name, protocol = key
        rows.append({
            "evaluator": evaluator,
            "name": name,
            "protocol_sha256": protocol,
            "unit": (ma or mb).unit if (ma or mb) else None,
            "a": ma.value if ma else None,
            "b": mb.value if mb else None,
            "difference": mb.value - ma.value if ma and mb else None,
            "a_metric_id": ma.id if ma else None,
            "b_metric_id": mb.id if mb else None,
        })
    return rows


def _side_json(side: _Side) -> dict[str, Any]:
    producer = side.producers[0] if side.producers else None
    return {
        "artifact": side.artifact.to_json(),
        "run": producer.to_json() if producer else None,
        "other_producer_run_ids": [run.id for run in side.producers[1:]],
        "roots": [root.to_json() for root in side.roots],
    }


def compare_artifacts(registry: Registry, a: int | str, b: int | str) -> dict[str, Any]:
    """Two artifacts side by side, JSON-ready: their current metrics matched by (evaluator,
    name, protocol_sha256) with ``difference = b - a``, the runs that produced them with the
    differences of their recipes, plugins and software versions, and their upstream roots.

    Diffs are ``None`` when either artifact has no producing run (e.g. a base model).
    """
    with registry.session() as session:
        side_a, side_b = _side(registry, session, a), _side(registry, session, b)
    roots_a = {root.id for root in side_a.roots}
    roots_b = {root.id for root in side_b.roots}
    result: dict[str, Any] = {
        "a": _side_json(side_a),
        "b": _side_json(side_b),
        "metrics": _metric_rows(side_a, side_b),
        "recipe": None,
        "plugins": None,
        "versions": None,
        "roots": {
            "common": sorted(roots_a & roots_b),
            "only_a": sorted(roots_a - roots_b),
            "only_b": sorted(roots_b - roots_a),
        },
    }
    if side_a.producers and side_b.producers:
        run_a, run_b = side_a.producers[0], side_b.producers[0]
        result["recipe"] = {"same": run_a.recipe_sha256 == run_b.recipe_sha256,
                            "differences": diff(run_a.recipe, run_b.recipe)}
        result["plugins"] = diff(run_a.plugins, run_b.plugins)
        result["versions"] = diff(run_a.versions, run_b.versions)
    return result


def _corrections(session: Session, target_type: str, ids: list[int]) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = {}
    if not ids:
        return found
    rows = session.scalars(
        select(CorrectionRow)
        .where(CorrectionRow.target_type == target_type, CorrectionRow.target_id.in_(ids))
        .order_by(CorrectionRow.id)
    )
    for row in rows:
        found.setdefault(row.target_id, []).append(correction_entity(row).to_json())
    return found


def describe_artifact(registry: Registry, ref: int | str) -> dict[str, Any]:
    """Everything an auditor reads about one artifact, JSON-ready: the artifact and its
    corrections; every measurement (superseded ones flagged, with their corrections); the runs
    that produced it, each with its full provenance (recipe, plugins and versions, software
    versions, host, who started it, flow run, times, status), its edges and corrections; and
    the ids of the runs that used it."""
    with registry.session() as session:
        row = find_artifact_row(session, ref)
        artifact = artifact_entity(row)
        metrics = [metric_entity(m) for m in session.scalars(
            select(MetricRow).where(MetricRow.artifact_id == row.id).order_by(MetricRow.id))]
        replaced = {m.supersedes_id: m.id for m in metrics if m.supersedes_id is not None}
        metric_notes = _corrections(session, "metric", [m.id for m in metrics])
        producers = _producers(session, row.id)
        run_notes = _corrections(session, "run", [run.id for run in producers])
        edges = [edge_entity(e) for e in session.scalars(
            select(RunEdgeRow).where(RunEdgeRow.run_id.in_([run.id for run in producers])))]
        names = dict(session.execute(select(ArtifactRow.id, ArtifactRow.name).where(
            ArtifactRow.id.in_({edge.artifact_id for edge in edges}))).tuples().all())
        users = session.scalars(
            select(RunEdgeRow.run_id)
            .where(RunEdgeRow.artifact_id == row.id, RunEdgeRow.direction == "input")
            .distinct().order_by(RunEdgeRow.run_id))
        used_by = list(users)
        artifact_notes = _corrections(session, "artifact", [row.id]).get(row.id, [])

    def edge_rows(run_id: int, direction: str) -> list[dict[str, Any]]:
        chosen = [e for e in edges if e.run_id == run_id and e.direction == direction]
        return [{"artifact_id": e.artifact_id, "name": names.get(e.artifact_id), "role": e.role}
                for e in sorted(chosen, key=lambda e: (e.artifact_id, e.role))]

    return {
        "artifact": artifact.to_json(),
        "corrections": artifact_notes,
        "metrics": [
            {**m.to_json(), "superseded_by": replaced.get(m.id),
             "corrections": metric_notes.get(m.id, [])}
            for m in metrics
        ],
        "produced_by": [
            {"run": run.to_json(), "inputs": edge_rows(run.id, "input"),
             "outputs": edge_rows(run.id, "output"), "corrections": run_notes.get(run.id, [])}
            for run in producers
        ],
        "used_by_run_ids": used_by,
    }
