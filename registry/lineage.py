"""Lineage: what an artifact was made from (upstream) and what was made from it (downstream).

Artifact A is a parent of B when some run has A as an input edge and B as an output edge. Each
direction is one recursive CTE over ``run_edges``, written in portable SQL (``UNION`` with a depth
column and a depth bound) so SQLite and PostgreSQL answer identically and a cycle cannot loop.

Why it is written for speed (issue #5: a depth-10 query in well under 20 ms on a registry of
100,000 artifacts, on both databases): most of a small query's time was Python, not SQL. So a
call is five statements (the walk returns the artifacts themselves; the ids of the runs linked
to them, those runs, their edges and the metrics follow), built once per process with bind
parameters (no SQL construction per call), and rows are read as plain rows of the mapped
columns instead of ORM objects. Id lists are sent in chunks, so a graph of any size stays under
SQLite's bound-parameter limit. The run ids are fetched on their own rather than as a sub-query
of the runs statement: with the sub-query, PostgreSQL's estimate for a data set's id (an input of
thousands of runs, never an output) made it scan every run, 25 ms per upstream query at 100,000
artifacts.
"""

from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from typing import Any, Literal, NamedTuple

from sqlalchemy import Integer, Select, bindparam, cast, func, inspect, literal, select
from sqlalchemy.orm import Bundle, Session, aliased

from quantmill.registry.convert import artifact_entity, edge_entity, metric_entity, run_entity
from quantmill.registry.entities import Artifact, LineageGraph, Run
from quantmill.registry.errors import ArtifactNotFound
from quantmill.registry.models import (
    ArtifactRow,
    Base,
    MetricRow,
    RunCompletionRow,
    RunEdgeRow,
    RunRow,
)

LineageDirection = Literal["upstream", "downstream"]

#: Ids per ``IN (...)``: one statement for any ordinary graph, and far below SQLite's limit of
#: 32,766 bound parameters for the largest.
ID_CHUNK = 2000


def _columns(model: type[Base]) -> list[Any]:
    """Every mapped column attribute of ``model``: rows of these carry the attribute names
    (``metadata_``, not ``metadata``), which is all the converters in ``convert`` read."""
    return [getattr(model, attr.key) for attr in inspect(model).column_attrs]


class _Statements(NamedTuple):
    """The statements of one direction, built once (see ``_statements``)."""

    walk: Select[Any]
    linked: Select[Any]
    runs: Select[Any]
    edges: Select[Any]
    metrics: Select[Any]


@cache
def _statements(direction: LineageDirection) -> _Statements:
    """The statements for ``direction``, with bind parameters ``root_id`` and ``max_depth``
    (walk), ``artifact_ids`` (linked, metrics) and ``run_ids`` (runs, edges).

    Upstream, a step goes from an artifact to the inputs of the runs that output it; downstream,
    to the outputs of the runs that took it as input.
    """
    near, far = ("output", "input") if direction == "upstream" else ("input", "output")
    seed = select(
        ArtifactRow.id.label("artifact_id"), cast(literal(0), Integer).label("depth")
    ).where(ArtifactRow.id == bindparam("root_id", type_=Integer))
    reach = seed.cte("reach", recursive=True)
    near_edge = aliased(RunEdgeRow, name="near_edge")
    far_edge = aliased(RunEdgeRow, name="far_edge")
    step = (
        select(far_edge.artifact_id, (reach.c.depth + 1).label("depth"))
        .select_from(reach)
        .join(
            near_edge,
            (near_edge.artifact_id == reach.c.artifact_id) & (near_edge.direction == near),
        )
        .join(far_edge, (far_edge.run_id == near_edge.run_id) & (far_edge.direction == far))
        .where(reach.c.depth < bindparam("max_depth", type_=Integer))
    )
    # UNION (not UNION ALL) drops repeated (artifact, depth) pairs; the depth bound ends cycles.
    reach = reach.union(step)
    # Shortest distance of every reached artifact, joined to the artifact itself.
    depths = (
        select(reach.c.artifact_id, func.min(reach.c.depth).label("depth"))
        .group_by(reach.c.artifact_id)
        .subquery("depths")
    )
    walk = (
        select(*_columns(ArtifactRow), depths.c.depth)
        .join_from(depths, ArtifactRow, ArtifactRow.id == depths.c.artifact_id)
        .order_by(ArtifactRow.id)
    )
    artifact_ids = bindparam("artifact_ids", expanding=True)
    run_ids = bindparam("run_ids", expanding=True)
    # The runs that made (upstream) or used (downstream) an artifact the walk went past.
    linked = select(RunEdgeRow.run_id).where(
        RunEdgeRow.direction == near, RunEdgeRow.artifact_id.in_(artifact_ids)
    )
    runs = (
        select(Bundle("run", *_columns(RunRow)), Bundle("done", *_columns(RunCompletionRow)))
        .outerjoin(RunCompletionRow, RunCompletionRow.run_id == RunRow.id)
        .where(RunRow.id.in_(run_ids))
    )
    edges = select(*_columns(RunEdgeRow)).where(RunEdgeRow.run_id.in_(run_ids))
    metrics = select(*_columns(MetricRow)).where(MetricRow.artifact_id.in_(artifact_ids))
    return _Statements(walk, linked, runs, edges, metrics)


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), ID_CHUNK):
        yield ids[start : start + ID_CHUNK]


def _rows(session: Session, statement: Select[Any], name: str, ids: Sequence[int]) -> Iterable[Any]:
    """Rows of ``statement`` with the id list ``name`` bound chunk by chunk."""
    for chunk in _chunks(ids):
        yield from session.execute(statement, {name: list(chunk)})


def lineage(
    session: Session, artifact_id: int, direction: LineageDirection, max_depth: int = 50
) -> LineageGraph:
    """The lineage graph of ``artifact_id`` in ``direction``, at most ``max_depth`` runs away.

    The graph's runs are those that connect an artifact at depth d < ``max_depth`` to one at
    depth d + 1; an artifact at exactly ``max_depth`` is included without the runs behind it.
    """
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    statements = _statements(direction)
    reached = session.execute(statements.walk, {"root_id": artifact_id, "max_depth": max_depth})
    artifacts: dict[int, Artifact] = {}
    depths: dict[int, int] = {}
    for row in reached:  # ordered by id, as the graph's mappings are
        artifacts[row.id] = artifact_entity(row)
        depths[row.id] = row.depth
    if not depths:
        raise ArtifactNotFound(f"no artifact with id {artifact_id}")
    node_ids = sorted(depths)
    expandable = [node for node in node_ids if depths[node] < max_depth]

    run_ids = sorted({row.run_id for row in _rows(session, statements.linked, "artifact_ids",
                                                  expandable)})
    runs: dict[int, Run] = {}
    for row in _rows(session, statements.runs, "run_ids", run_ids):
        runs[row.run.id] = run_entity(row.run, row.done if row.done.id is not None else None)
    nodes = set(node_ids)
    # Sorted in Python: SQL string order depends on the database's collation.
    edges = sorted(
        (edge_entity(row) for row in _rows(session, statements.edges, "run_ids", run_ids)
         if row.artifact_id in nodes),
        key=lambda e: (e.run_id, e.direction, e.artifact_id, e.role),
    )
    metrics = sorted(
        (metric_entity(row) for row in _rows(session, statements.metrics, "artifact_ids",
                                             node_ids)),
        key=lambda m: m.id,
    )
    return LineageGraph(
        root_id=artifact_id,
        direction=direction,
        max_depth=max_depth,
        artifacts=artifacts,
        depths=depths,
        runs={run_id: runs[run_id] for run_id in run_ids},
        edges=tuple(edges),
        metrics=tuple(metrics),
    )


def upstream(session: Session, artifact_id: int, max_depth: int = 50) -> LineageGraph:
    """What ``artifact_id`` was made from, transitively (one query for the whole walk)."""
    return lineage(session, artifact_id, "upstream", max_depth)


def downstream(session: Session, artifact_id: int, max_depth: int = 50) -> LineageGraph:
    """What was made from ``artifact_id``, transitively."""
    return lineage(session, artifact_id, "downstream", max_depth)
