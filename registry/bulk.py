"""Recording many ended runs in one transaction: back-fills, imports, the scale benchmark.

Why batched: ``start_run`` + ``finish_run`` cost two transactions per run, each taking the chain
lock, reading the chain's tail, reading every new record back on its own to chain it, and
committing (an fsync). Registering tens of thousands of historical runs spends its time in those
round trips. ``record_runs`` writes exactly the rows and ledger links ``RecordWriter`` would
(its row values and rules from ``quantmill.registry.writes``, each run's records in the same
order: the run, its input edges, its new output artifacts each followed by its new locations,
output edges, metrics, completion), for a whole batch of ``EndedRun`` at once: one lock,
multi-row inserts, one read-back per table, one commit. All of a batch is stored, or none of
it. Live workers keep using the per-run calls: a run must be visible as ``running`` while it
runs.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Table, insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from quantmill.registry.chain import entry_hash, payload_text, row_payload, sha256_text, tail
from quantmill.registry.entities import NewArtifact, NewLocation, NewMetric, check_sha256
from quantmill.registry.errors import ArtifactConflict, ArtifactNotFound, RegistryError
from quantmill.registry.models import (
    CHAINED_TABLES,
    ArtifactLocationRow,
    ArtifactRow,
    LedgerRow,
    MetricRow,
    RunCompletionRow,
    RunEdgeRow,
    RunRow,
    utcnow,
)
from quantmill.registry.store import Registry
from quantmill.registry.writes import (
    EndedRun,
    artifact_values,
    check_measured,
    check_producer,
    completion_values,
    current_user,
    edge_values,
    ended_run_values,
    location_values,
    metric_values,
)

#: Ids per ``IN (...)`` read-back (well under SQLite's bound-parameter limit).
READ_CHUNK = 900
#: Rows per multi-row ``INSERT ... ON CONFLICT`` of artifacts (9 parameters each) or
#: locations (6 each).
UPSERT_CHUNK = 500


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _insert(session: Session, table: Table, rows: list[dict[str, Any]]) -> list[int]:
    """Multi-row insert; the new ids in the order of ``rows``."""
    if not rows:
        return []
    statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
    return list(session.scalars(statement, rows))


class _Batch:
    """The rows of one ``record_runs`` call, resolved and inserted table by table."""

    def __init__(self, session: Session, records: Sequence[EndedRun], user: str) -> None:
        self.session = session
        self.records = records
        self.user = user
        self.now = utcnow()
        #: sha256 -> (id, size_bytes) of every artifact this batch touches.
        self.artifacts: dict[str, tuple[int, int]] = {}
        self.known_ids: set[int] = set()
        #: sha256s this batch inserted (chained by the run that output them first).
        self.new_artifacts: set[str] = set()
        #: (artifact id, uri) -> id of each location this batch inserted (chained likewise).
        self.new_locations: dict[tuple[int, str], int] = {}

    def known_artifacts(self, shas: set[str], ids: set[int]) -> None:
        table = ArtifactRow.__table__
        for column, wanted in ((table.c.sha256, sorted(shas)), (table.c.id, sorted(ids))):
            for chunk in _chunks(wanted, READ_CHUNK):
                query = select(table.c.sha256, table.c.id, table.c.size_bytes)
                for sha, artifact_id, size in self.session.execute(query.where(column.in_(chunk))):
                    self.artifacts[sha] = (artifact_id, size)
                    self.known_ids.add(artifact_id)

    def upsert_outputs(self) -> None:
        """Register every output not registered yet (race-safe, like ``upsert_artifact``)."""
        wanted: dict[str, NewArtifact] = {}
        for record in self.records:
            for output in record.outputs:
                wanted.setdefault(output.sha256, output)
        missing = [new for sha, new in wanted.items() if sha not in self.artifacts]
        table = ArtifactRow.__table__
        for chunk in _chunks(missing, UPSERT_CHUNK):
            statement = (
                self._upsert(table)
                .values([artifact_values(new, self.now) for new in chunk])
                .on_conflict_do_nothing(index_elements=["sha256"])
                .returning(table.c.sha256)
            )
            self.new_artifacts.update(self.session.scalars(statement))
        self.known_artifacts({new.sha256 for new in missing}, set())
        # every output, not only the first of each sha256: a later duplicate in the batch with
        # another size is the same caller bug the per-run path refuses
        for record in self.records:
            for output in record.outputs:
                size = self.artifacts[output.sha256][1]
                if size != output.size_bytes:
                    raise ArtifactConflict(f"sha256 {output.sha256} is registered with {size} "
                                           f"bytes, not {output.size_bytes}")
        self.record_locations()

    def _upsert(self, table: Table) -> Any:
        """The dialect's ``INSERT`` that can skip conflicting rows."""
        dialect = self.session.get_bind().dialect.name
        if dialect not in ("postgresql", "sqlite"):
            raise RegistryError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")
        return (postgresql_insert if dialect == "postgresql" else sqlite_insert)(table)

    def record_locations(self) -> None:
        """Insert every output's locations not recorded yet for its artifact (first one of a
        place wins, as in ``RecordWriter.record_location``); remember which were new."""
        wanted: dict[tuple[int, str], NewLocation] = {}
        for record in self.records:
            for output in record.outputs:
                artifact_id = self.artifacts[output.sha256][0]
                for location in output.locations:
                    wanted.setdefault((artifact_id, location.uri), location)
        table = ArtifactLocationRow.__table__
        for chunk in _chunks(list(wanted.items()), UPSERT_CHUNK):
            statement = (
                self._upsert(table)
                .values([location_values(artifact_id, new, self.user, self.now)
                         for (artifact_id, _), new in chunk])
                .on_conflict_do_nothing(index_elements=["artifact_id", "uri"])
                .returning(table.c.id, table.c.artifact_id, table.c.uri)
            )
            for location_id, artifact_id, uri in self.session.execute(statement):
                self.new_locations[(artifact_id, uri)] = location_id

    def producers(self) -> dict[int, set[int]]:
        """Artifact id -> the runs registered before the batch that produced it, for every
        output of the batch."""
        ids = sorted({self.artifacts[o.sha256][0] for r in self.records for o in r.outputs})
        found: dict[int, set[int]] = {}
        edges = RunEdgeRow.__table__
        for chunk in _chunks(ids, READ_CHUNK):
            query = select(edges.c.artifact_id, edges.c.run_id).where(
                edges.c.artifact_id.in_(chunk), edges.c.direction == "output")
            for artifact_id, run_id in self.session.execute(query):
                found.setdefault(artifact_id, set()).add(run_id)
        return found

    def resolve(self, ref: int | str, available: set[str]) -> int:
        """An artifact reference as an id; a sha256 must be available at this point."""
        if isinstance(ref, str):
            sha = check_sha256(ref)
            if sha not in available:
                raise ArtifactNotFound(f"no artifact with sha256 {sha} registered yet")
            return self.artifacts[sha][0]
        if ref not in self.known_ids:
            raise ArtifactNotFound(f"no artifact with id {ref}")
        return ref


def record_runs(registry: Registry, records: Sequence[EndedRun]) -> list[int]:
    """Store ``records`` as ended runs with their edges, outputs, metrics and ledger links, in
    one transaction; returns the new run ids in the order of ``records``."""
    if not records:
        return []
    # The registry's own write path: the chain lock (and SQLite's BEGIN IMMEDIATE) is held
    # from the first statement to the commit.
    with registry.writer() as write:
        return _record(write.session, records)


def _record(session: Session, records: Sequence[EndedRun]) -> list[int]:
    host, user = socket.gethostname(), current_user()
    batch = _Batch(session, records, user)
    refs = [item.artifact for record in records for item in record.inputs]
    metric_refs = [ref for record in records for metric in record.metrics
                   for ref in (metric.artifact_id, metric.dataset_artifact_id) if ref is not None]
    batch.known_artifacts(
        {check_sha256(ref) for ref in refs if isinstance(ref, str)}
        | {m.artifact_sha256 for r in records for m in r.metrics if m.artifact_sha256},
        {ref for ref in [*refs, *metric_refs] if isinstance(ref, int)})
    available = set(batch.artifacts)  # registered before the batch
    batch.upsert_outputs()
    producers = batch.producers()

    run_ids = _insert(session, RunRow.__table__, [
        ended_run_values(r, user, batch.now, host) for r in records])

    # Per run, in the order the per-run calls write them; ids are filled in table by table.
    edges: list[dict[str, Any]] = []
    metrics: list[dict[str, Any]] = []
    plan: list[list[tuple[str, Any]]] = []
    chained_artifacts: set[str] = set()
    chained_locations: set[tuple[int, str]] = set()
    for record, run_id in zip(records, run_ids, strict=True):
        steps: list[tuple[str, Any]] = [("runs", run_id)]
        own: set[int] = set()
        for artifact_id, role in dict.fromkeys(
                (batch.resolve(item.artifact, available), item.role) for item in record.inputs):
            steps.append(("run_edges", len(edges)))
            edges.append(edge_values(run_id, artifact_id, "input", role))
            own.add(artifact_id)
        outputs: dict[tuple[int, str], None] = {}
        for output in record.outputs:
            artifact_id = batch.artifacts[output.sha256][0]
            check_producer(artifact_id, output.sha256, producers.setdefault(artifact_id, set()),
                           run_id)
            producers[artifact_id].add(run_id)
            own.add(artifact_id)
            if output.sha256 in batch.new_artifacts and output.sha256 not in chained_artifacts:
                chained_artifacts.add(output.sha256)
                steps.append(("artifacts", artifact_id))
            for location in output.locations:
                place = (artifact_id, location.uri)
                if place in batch.new_locations and place not in chained_locations:
                    chained_locations.add(place)
                    steps.append(("artifact_locations", batch.new_locations[place]))
            available.add(output.sha256)
            outputs[(artifact_id, output.role)] = None
        for artifact_id, role in outputs:
            steps.append(("run_edges", len(edges)))
            edges.append(edge_values(run_id, artifact_id, "output", role))
        for metric in record.metrics:
            steps.append(("metrics", len(metrics)))
            metrics.append(_metric_values(batch, run_id, metric, available, own))
        plan.append(steps)

    edge_ids = _insert(session, RunEdgeRow.__table__, edges)
    metric_ids = _insert(session, MetricRow.__table__, metrics)
    completion_ids = _insert(session, RunCompletionRow.__table__, [
        completion_values(run_id, r.completion, batch.now)
        for r, run_id in zip(records, run_ids, strict=True)])
    positions = {"run_edges": edge_ids, "metrics": metric_ids}
    links = [(kind, positions[kind][ref] if kind in positions else ref)
             for steps, completion_id in zip(plan, completion_ids, strict=True)
             for kind, ref in [*steps, ("run_completions", completion_id)]]
    _chain(session, links)
    return run_ids


def _metric_values(batch: _Batch, run_id: int, metric: NewMetric, available: set[str],
                   own: set[int]) -> dict[str, Any]:
    """A metric's row values with its artifact references resolved (unknown ones raise) and
    checked to be one of the run's own inputs or outputs."""
    if metric.artifact_sha256 is not None:
        artifact_id = batch.resolve(metric.artifact_sha256, available)
    elif metric.artifact_id is not None:
        artifact_id = batch.resolve(metric.artifact_id, available)
    else:  # NewMetric.__post_init__ already refuses this
        raise ValueError(f"metric {metric.name!r} names no artifact")
    check_measured(metric, artifact_id, own)
    if metric.dataset_artifact_id is not None:
        batch.resolve(metric.dataset_artifact_id, available)
    return metric_values(run_id, artifact_id, metric, batch.now)


def _chain(session: Session, links: list[tuple[str, int]]) -> None:
    """Append a ledger link for every ``(table, id)``, in order, from the chain's tail.

    The payloads are read back from the database, as ``ChainWriter.append`` does, so they hash
    to what ``verify`` will read later; the caller holds the chain lock (``Registry._write``).
    """
    payloads: dict[tuple[str, int], str] = {}
    for kind in {kind for kind, _ in links}:
        table = CHAINED_TABLES[kind].__table__
        ids = sorted(record_id for k, record_id in links if k == kind)
        for chunk in _chunks(ids, READ_CHUNK):
            for row in session.execute(select(table).where(table.c.id.in_(chunk))):
                payloads[(kind, row.id)] = payload_text(row_payload(table, row))
    seq, prev = tail(session)
    ledger = []
    for kind, record_id in links:
        text_ = payloads[(kind, record_id)]
        record_sha = sha256_text(text_)
        seq += 1
        link_hash = entry_hash(prev, seq, kind, record_id, record_sha)
        ledger.append({"seq": seq, "record_type": kind, "record_id": record_id,
                       "payload": text_, "record_sha256": record_sha, "prev_hash": prev,
                       "entry_hash": link_hash, "created_at": utcnow()})
        prev = link_hash
    session.execute(insert(LedgerRow.__table__), ledger)
