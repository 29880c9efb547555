"""The one way records are written: runs, their edges, artifacts, locations, metrics and
completions, with the rules every writer obeys, each row's values and its place in the chain
built here and nowhere else.

Who writes through this module: ``Registry`` (``start_run``/``finish_run``/``fail_run``/
``reap``/``upsert_artifact``), ``remote.record_run`` (a whole ``EndedRun`` from the HTTP API)
and ``bulk.record_runs`` (many ``EndedRun`` at once, which uses the same row values and rules
and chains the same records in the same order, with multi-row inserts).

The rules (each a ``RegistryError`` naming the record):
- an artifact has one producing run: a run cannot claim as its output what another run
  produced (``ArtifactConflict``); a run that reproduces a registered artifact names it as an
  input instead;
- a run measures only its own inputs and outputs (``InvalidClaim``), so a metric can never be
  attached to someone else's checkpoint;
- a closed run (succeeded, failed, abandoned) gains nothing (``RunStateError``);
- what the caller cannot vouch for is checked by its ``ClaimCheck`` first: the HTTP API passes
  one that confirms every output is stored in a configured storage with its sha256 and size.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Table, delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from quantmill.registry.chain import ChainWriter
from quantmill.registry.entities import NewArtifact, NewLocation, NewMetric
from quantmill.registry.errors import (
    ArtifactConflict,
    ArtifactNotFound,
    InvalidClaim,
    RegistryError,
    RunNotFound,
    RunStateError,
)
from quantmill.registry.hashing import json_sha256
from quantmill.registry.liveness import this_process
from quantmill.registry.lookup import find_artifact_row
from quantmill.registry.models import (
    ArtifactLocationRow,
    ArtifactRow,
    MetricRow,
    RunCompletionRow,
    RunEdgeRow,
    RunHeartbeatRow,
    RunRow,
    utcnow,
)

#: ``check(output)`` raises a RegistryError when the output's content is not where it claims
#: (the HTTP API's storage check); the registry itself cannot read storage.
ClaimCheck = Callable[[NewArtifact], None]
CompletionStatus = Literal["succeeded", "failed", "abandoned"]


def current_user() -> str:
    """Who started a run; ``getpass`` fails in containers whose uid has no passwd entry."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


# --- the ended run: one description for every writer that records a run at once --------------


@dataclass(frozen=True, slots=True)
class RunInput:
    """An existing artifact the run consumed: its id or sha256 (prefix), and its role."""

    artifact: int | str
    role: str


@dataclass(frozen=True, slots=True)
class RunCompletion:
    """How the run ended; a failed run says why in ``error`` and records no outputs."""

    status: CompletionStatus
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class EndedRun:
    """A run that already ended, with everything it consumed, produced and measured: what a
    remote worker reports (``remote.record_run``) and a back-fill imports (``bulk``)."""

    job_id: str
    kind: str
    name: str
    recipe: dict[str, Any]
    plugins: dict[str, str]
    versions: dict[str, str]
    completion: RunCompletion
    inputs: tuple[RunInput, ...] = ()
    outputs: tuple[NewArtifact, ...] = ()
    metrics: tuple[NewMetric, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    flow_run_id: str | None = None
    host: str | None = None

    def __post_init__(self) -> None:
        if self.completion.status != "succeeded" and (self.outputs or self.metrics):
            raise InvalidClaim(f"run {self.name!r} {self.completion.status}: a run that did not "
                               "succeed records no outputs or metrics")


# --- row values: built once for every writer --------------------------------------------------


def run_values(*, job_id: str, kind: str, name: str, recipe: dict[str, Any],
               plugins: dict[str, str], versions: dict[str, str], details: dict[str, Any],
               flow_run_id: str | None, host: str, started_by: str,
               started_at: datetime) -> dict[str, Any]:
    return {"job_id": job_id, "kind": kind, "name": name, "recipe": dict(recipe),
            "recipe_sha256": json_sha256(recipe), "plugins": dict(plugins),
            "versions": dict(versions), "details": dict(details), "flow_run_id": flow_run_id,
            "host": host, "started_by": started_by, "started_at": started_at}


def ended_run_values(run: EndedRun, started_by: str, started_at: datetime,
                     default_host: str) -> dict[str, Any]:
    return run_values(job_id=run.job_id, kind=run.kind, name=run.name, recipe=run.recipe,
                      plugins=run.plugins, versions=run.versions, details=run.details,
                      flow_run_id=run.flow_run_id, host=run.host or default_host,
                      started_by=started_by, started_at=started_at)


def edge_values(run_id: int, artifact_id: int, direction: str, role: str) -> dict[str, Any]:
    return {"run_id": run_id, "artifact_id": artifact_id, "direction": direction, "role": role}


def artifact_values(new: NewArtifact, created_at: datetime) -> dict[str, Any]:
    return {"kind": new.kind, "name": new.name, "sha256": new.sha256,
            "size_bytes": new.size_bytes, "uri": new.uri, "format": new.format,
            "metadata": dict(new.metadata), "created_at": created_at}


def location_values(artifact_id: int, new: NewLocation, recorded_by: str,
                    created_at: datetime) -> dict[str, Any]:
    return {"artifact_id": artifact_id, "uri": new.uri, "role": new.role,
            "details": dict(new.details), "created_by": recorded_by, "created_at": created_at}


def metric_values(run_id: int, artifact_id: int, metric: NewMetric,
                  created_at: datetime) -> dict[str, Any]:
    return {"run_id": run_id, "artifact_id": artifact_id, "evaluator": metric.evaluator,
            "dataset_artifact_id": metric.dataset_artifact_id, "name": metric.name,
            "value": metric.value, "unit": metric.unit, "protocol": dict(metric.protocol),
            "protocol_sha256": json_sha256(metric.protocol), "supersedes_id": None,
            "created_at": created_at}


def completion_values(run_id: int, completion: RunCompletion,
                      finished_at: datetime) -> dict[str, Any]:
    return {"run_id": run_id, "status": completion.status,
            "details": dict(completion.details), "error": completion.error,
            "finished_at": finished_at}


# --- rules shared with the batched writer -----------------------------------------------------


def check_producer(artifact_id: int, sha256: str, producers: set[int], run_id: int | None) -> None:
    """An artifact has one producing run: refuse ``run_id`` claiming another run's output."""
    others = sorted(producers - ({run_id} if run_id is not None else set()))
    if others:
        raise ArtifactConflict(
            f"artifact {artifact_id} (sha256 {sha256[:16]}...) was produced by run {others[0]}; "
            "a run cannot claim another run's output (a reproduction names it as an input)")


def check_measured(metric: NewMetric, artifact_id: int, own: set[int]) -> None:
    """A run measures only its own inputs and outputs."""
    if artifact_id not in own:
        raise InvalidClaim(
            f"metric {metric.name!r} is about artifact {artifact_id}, which is neither an input "
            "nor an output of this run: a run measures only what it consumed or produced")


def insert_ignoring_conflict(
    session: Session, table: Table, values: dict[str, Any], index_elements: list[str]
) -> int | None:
    """``INSERT ... ON CONFLICT (index_elements) DO NOTHING RETURNING id``: the new id, or None
    when the row was already there.

    Race-safe without savepoints: two writers inserting the same key at once both succeed, and
    only the one that inserted chains the row. RETURNING, not rowcount, says which (rowcount is
    not reliable for ON CONFLICT across drivers).
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        statement = postgresql_insert(table)
    elif dialect == "sqlite":
        statement = sqlite_insert(table)
    else:
        raise RegistryError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")
    # A Core insert on the table: JSON columns go by their column names (e.g. "metadata").
    guarded = statement.values(**values).on_conflict_do_nothing(index_elements=index_elements)
    return session.execute(guarded.returning(table.c.id)).scalar_one_or_none()


# --- the writer ---------------------------------------------------------------------------------


class RecordWriter:
    """Writes records inside one of the registry's write transactions (``Registry.writer``),
    appending each to the chain as it is written."""

    def __init__(self, session: Session, chain: ChainWriter, recorded_by: str,
                 claims: ClaimCheck | None = None) -> None:
        self.session = session
        self.chain = chain
        self.recorded_by = recorded_by
        self.claims = claims

    # artifacts and locations

    def artifact_row(self, ref: int | str) -> ArtifactRow:
        """The artifact by id or by full/prefix sha256."""
        return find_artifact_row(self.session, ref)

    def upsert_artifact(self, new: NewArtifact) -> ArtifactRow:
        """Insert unless the sha256 exists, then read the row back and record ``new``'s
        locations for it. Race-safe: two writers may register the same content at once, and
        both then select the one row."""
        inserted = insert_ignoring_conflict(self.session, ArtifactRow.__table__,
                                            artifact_values(new, utcnow()), ["sha256"])
        row = self.session.scalars(
            select(ArtifactRow).where(ArtifactRow.sha256 == new.sha256)).one()
        if inserted is not None:
            self.chain.append("artifacts", row.id)
        if row.size_bytes != new.size_bytes:
            raise ArtifactConflict(f"sha256 {new.sha256} is registered with {row.size_bytes} "
                                   f"bytes, not {new.size_bytes}")
        for location in new.locations:
            self.record_location(row.id, location)
        return row

    def record_location(self, artifact_id: int, new: NewLocation) -> ArtifactLocationRow:
        """Append the location unless this (artifact, uri) is recorded already; the record
        either way. The first record of a place wins, as the first registration of content."""
        table = ArtifactLocationRow.__table__
        inserted = insert_ignoring_conflict(
            self.session, table, location_values(artifact_id, new, self.recorded_by, utcnow()),
            ["artifact_id", "uri"])
        if inserted is not None:
            self.chain.append("artifact_locations", inserted)
        return self.session.scalars(select(ArtifactLocationRow).where(
            ArtifactLocationRow.artifact_id == artifact_id,
            ArtifactLocationRow.uri == new.uri)).one()

    # runs

    def start_run(self, values: dict[str, Any], inputs: Sequence[tuple[int | str, str]]) -> RunRow:
        """The run's start record (``run_values``) and its input edges."""
        row = RunRow(**values)
        self.session.add(row)
        self.session.flush()
        self.chain.append("runs", row.id)
        self._edges(row.id, [(self.artifact_row(ref).id, role) for ref, role in inputs],
                    "input")
        return row

    def first_beat(self, run: RunRow) -> None:
        """A live run's heartbeat row: this process, alive as of the run's start (``complete``
        removes it)."""
        me = this_process()
        self.session.add(RunHeartbeatRow(run_id=run.id, host=me.host, pid=me.pid,
                                         boot_id=me.boot_id, process_start=me.process_start,
                                         beat_at=run.started_at))

    def _edges(self, run_id: int, pairs: Sequence[tuple[int, str]], direction: str) -> None:
        for artifact_id, role in dict.fromkeys(pairs):
            edge = RunEdgeRow(**edge_values(run_id, artifact_id, direction, role))
            self.session.add(edge)
            self.session.flush()
            self.chain.append("run_edges", edge.id)

    def open_run(self, run_id: int) -> RunRow:
        """The run, if it has not ended. Callers hold the chain lock (the write transaction),
        so no other writer can complete it before this one commits."""
        run = self.session.get(RunRow, run_id)
        if run is None:
            raise RunNotFound(f"no run with id {run_id}")
        done = self.session.scalars(
            select(RunCompletionRow.status).where(RunCompletionRow.run_id == run_id)).first()
        if done is not None:
            raise RunStateError(f"run {run_id} is already {done}, not running")
        return run

    def _producers(self, artifact_id: int) -> set[int]:
        return set(self.session.scalars(select(RunEdgeRow.run_id).where(
            RunEdgeRow.artifact_id == artifact_id, RunEdgeRow.direction == "output")))

    def record_results(self, run: RunRow, outputs: Sequence[NewArtifact | tuple[int, str]],
                       metrics: Sequence[NewMetric],
                       inputs: Sequence[tuple[int | str, str]] = ()) -> None:
        """More input edges (e.g. an artifact the run reproduced), its outputs (with their
        locations) and output edges, then its metrics (which may name those outputs by
        sha256), each checked against the rules in the module docstring."""
        self._edges(run.id, [(self.artifact_row(ref).id, role) for ref, role in inputs],
                    "input")
        produced: list[tuple[int, str]] = []
        for output in outputs:
            if isinstance(output, NewArtifact):
                if self.claims is not None:
                    self.claims(output)
                artifact = self.upsert_artifact(output)
                role = output.role
            else:
                artifact, role = self.artifact_row(output[0]), output[1]
            check_producer(artifact.id, artifact.sha256, self._producers(artifact.id), run.id)
            produced.append((artifact.id, role))
        self._edges(run.id, produced, "output")
        own = set(self.session.scalars(
            select(RunEdgeRow.artifact_id).where(RunEdgeRow.run_id == run.id)))
        for metric in metrics:
            artifact_id = self._metric_artifact(metric)
            check_measured(metric, artifact_id, own)
            if metric.dataset_artifact_id is not None:
                self.artifact_row(metric.dataset_artifact_id)
            row = MetricRow(**metric_values(run.id, artifact_id, metric, utcnow()))
            self.session.add(row)
            self.session.flush()
            self.chain.append("metrics", row.id)

    def _metric_artifact(self, metric: NewMetric) -> int:
        if metric.artifact_sha256 is not None:
            found = self.session.scalars(select(ArtifactRow.id).where(
                ArtifactRow.sha256 == metric.artifact_sha256)).one_or_none()
            if found is None:
                raise ArtifactNotFound(
                    f"metric {metric.name!r} refers to artifact sha256 {metric.artifact_sha256}, "
                    "which is neither an output of this run nor registered")
            return found
        if metric.artifact_id is not None:
            return self.artifact_row(metric.artifact_id).id
        raise ValueError(f"metric {metric.name!r} names no artifact")  # NewMetric refuses it

    def complete(self, run: RunRow, completion: RunCompletion) -> RunCompletionRow:
        """Close the run; its heartbeat (liveness only) goes with it."""
        row = RunCompletionRow(**completion_values(run.id, completion, utcnow()))
        self.session.add(row)
        self.session.flush()
        self.chain.append("run_completions", row.id)
        self.session.execute(delete(RunHeartbeatRow).where(RunHeartbeatRow.run_id == run.id))
        return row

    def record_ended(self, run: EndedRun, started_by: str,
                     default_host: str) -> tuple[RunRow, RunCompletionRow]:
        """A whole ended run: its start, inputs, outputs, metrics and completion
        (``default_host`` where the run does not say where it ran)."""
        row = self.start_run(ended_run_values(run, started_by, utcnow(), default_host),
                             [(item.artifact, item.role) for item in run.inputs])
        self.record_results(row, run.outputs, run.metrics)
        return row, self.complete(row, run.completion)
