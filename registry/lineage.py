"""Lineage: what an artifact was made from (upstream) and what was made from it (downstream).

Artifact A is a parent of B when some run has A as an input edge and B as an output edge. Each
direction is one recursive CTE over ``run_edges``, written in portable SQL (``UNION`` with a depth
column and a depth bound) so SQLite and PostgreSQL answer identically and a cycle cannot loop.
"""

from typing import Literal

from sqlalchemy import Integer, cast, func, literal, select
from sqlalchemy.orm import Session, aliased

from quantmill.registry.convert import (
    artifact_entity,
    edge_entity,
    metric_entity,
    run_entity,
    runs_query,
)
from quantmill.registry.entities import LineageGraph
from quantmill.registry.errors import ArtifactNotFound
from quantmill.registry.models import ArtifactRow, MetricRow, RunEdgeRow, RunRow

LineageDirection = Literal["upstream", "downstream"]


def _depths(
    session: Session, root_id: int, direction: LineageDirection, max_depth: int
) -> dict[int, int]:
    """Shortest distance (in runs) from ``root_id`` to every artifact within ``max_depth``.

    Upstream, a step goes from an artifact to the inputs of the runs that output it; downstream,
    to the outputs of the runs that took it as input.
    """
    near, far = ("output", "input") if direction == "upstream" else ("input", "output")
    seed = select(
        ArtifactRow.id.label("artifact_id"), cast(literal(0), Integer).label("depth")
    ).where(ArtifactRow.id == root_id)
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
        .where(reach.c.depth < max_depth)
    )
    # UNION (not UNION ALL) drops repeated (artifact, depth) pairs; the depth bound ends cycles.
    reach = reach.union(step)
    rows = session.execute(
        select(reach.c.artifact_id, func.min(reach.c.depth)).group_by(reach.c.artifact_id)
    )
    return {artifact_id: depth for artifact_id, depth in rows}


def lineage(
    session: Session, artifact_id: int, direction: LineageDirection, max_depth: int = 50
) -> LineageGraph:
    """The lineage graph of ``artifact_id`` in ``direction``, at most ``max_depth`` runs away.

    The graph's runs are those that connect an artifact at depth d < ``max_depth`` to one at
    depth d + 1; an artifact at exactly ``max_depth`` is included without the runs behind it.
    """
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    depths = _depths(session, artifact_id, direction, max_depth)
    if not depths:
        raise ArtifactNotFound(f"no artifact with id {artifact_id}")
    node_ids = sorted(depths)
    expandable = [node for node, depth in depths.items() if depth < max_depth]
    near = "output" if direction == "upstream" else "input"

    run_ids: list[int] = []
    if expandable:
        run_ids = list(
            session.scalars(
                select(RunEdgeRow.run_id)
                .where(RunEdgeRow.direction == near, RunEdgeRow.artifact_id.in_(expandable))
                .distinct()
            )
        )
    artifacts = session.scalars(
        select(ArtifactRow).where(ArtifactRow.id.in_(node_ids)).order_by(ArtifactRow.id)
    )
    runs = session.execute(runs_query().where(RunRow.id.in_(run_ids)).order_by(RunRow.id))
    edge_rows = session.scalars(
        select(RunEdgeRow).where(
            RunEdgeRow.run_id.in_(run_ids), RunEdgeRow.artifact_id.in_(node_ids)
        )
    )
    # Sorted in Python: SQL string order depends on the database's collation.
    edges = sorted(
        (edge_entity(row) for row in edge_rows),
        key=lambda e: (e.run_id, e.direction, e.artifact_id, e.role),
    )
    metrics = session.scalars(
        select(MetricRow).where(MetricRow.artifact_id.in_(node_ids)).order_by(MetricRow.id)
    )
    return LineageGraph(
        root_id=artifact_id,
        direction=direction,
        max_depth=max_depth,
        artifacts={row.id: artifact_entity(row) for row in artifacts},
        depths=dict(sorted(depths.items())),
        runs={row.id: run_entity(row, done) for row, done in runs},
        edges=tuple(edges),
        metrics=tuple(metric_entity(row) for row in metrics),
    )


def upstream(session: Session, artifact_id: int, max_depth: int = 50) -> LineageGraph:
    """What ``artifact_id`` was made from, transitively (one query for the whole walk)."""
    return lineage(session, artifact_id, "upstream", max_depth)


def downstream(session: Session, artifact_id: int, max_depth: int = 50) -> LineageGraph:
    """What was made from ``artifact_id``, transitively."""
    return lineage(session, artifact_id, "downstream", max_depth)
