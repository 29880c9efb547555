"""Many OS processes writing one registry at once, on SQLite and PostgreSQL (issue #5).

Why real processes (``spawn``, each with its own ``Registry.open``): production workers are
separate processes with separate connections; threads in one process would share a pool and the
GIL and could hide the races this guards against. The writers start together on a barrier and
race on everything that can race: the chain's tail (every write), ``upsert_artifact`` of the
same content (shared base models at the start), and, in the second test, ``finish_run`` against
``fail_run`` of the very same run. (Outputs are each run's own: an artifact has one producing
run, so two runs can no longer both claim one report.)

After the storm the database must hold exactly the planned rows (shared content once), one
completion per run, a ledger numbered 1..N with one link per record, and ``verify()`` must pass.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import queue
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from quantmill.registry import NewArtifact, NewMetric, Registry, RunStateError
from quantmill.registry.db import create_registry_engine
from quantmill.registry.models import (
    CHAINED_TABLES,
    ArtifactRow,
    LedgerRow,
    MetricRow,
    RunCompletionRow,
    RunEdgeRow,
    RunRow,
)

PROCESSES = 8
RUNS_PER_PROCESS = 15
SHARED_BASES = 3
#: Seconds a worker waits for the others at the barrier (spawned imports are slow on 2 cores).
BARRIER_TIMEOUT = 120
#: Modules a registry worker must never load: they cost seconds per spawned process.
HEAVY_MODULES = ("torch", "transformers", "prefect", "quantmill.plugins", "quantmill.flows")


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


# --- the plan: what every worker does, so the test can derive what the database must hold -------


@dataclass(frozen=True)
class PlannedRun:
    """Run ``index`` of worker ``worker``: its inputs, and how it ends."""

    worker: int
    index: int

    @property
    def name(self) -> str:
        return f"run-{self.index}"

    @property
    def job_id(self) -> str:
        return f"worker-{self.worker}"

    @property
    def fails(self) -> bool:
        return self.index % 4 == 3

    @property
    def inputs(self) -> tuple[tuple[str, str], ...]:
        """(label, role): a base model shared by all workers, the worker's own data set."""
        return ((f"base-{self.index % SHARED_BASES}", "base_model"),
                (f"calib-{self.worker}", "calibration"))

    @property
    def outputs(self) -> tuple[tuple[str, str], ...]:
        """(label, role): a private checkpoint and, every 5th run, a report."""
        if self.fails:
            return ()
        report = ((f"report-{self.worker}-{self.index}", "report"),) \
            if self.index % 5 == 0 else ()
        return ((f"ckpt-{self.worker}-{self.index}", "checkpoint"), *report)

    @property
    def metric_value(self) -> float:
        return 20.0 + self.worker + self.index / 100


def plan(runs_per_worker: int = RUNS_PER_PROCESS) -> list[PlannedRun]:
    return [PlannedRun(w, i) for w in range(PROCESSES) for i in range(runs_per_worker)]


def artifact(label: str, kind: str, role: str = "") -> NewArtifact:
    return NewArtifact(kind=kind, name=label, sha256=sha(label), size_bytes=len(label),
                       uri=f"file:///store/{label}", format="raw", role=role)


def heavy_modules_loaded() -> list[str]:
    return sorted(m for m in sys.modules if m.startswith(HEAVY_MODULES))


# --- worker processes (top level: ``spawn`` pickles them by reference) ---------------------------


def _registration_worker(url: str, worker: int, barrier: Barrier, results: Any) -> None:
    """Register this worker's share of the plan as fast as it can, once all are ready."""
    try:
        with Registry.open(url) as registry:
            barrier.wait(BARRIER_TIMEOUT)
            ids = {}
            # Every worker registers the shared bases first: the same sha256, at the same time.
            for label in [f"base-{b}" for b in range(SHARED_BASES)] + [f"calib-{worker}"]:
                kind = "model" if label.startswith("base") else "dataset"
                new = artifact(label, kind)
                ids[label] = registry.upsert_artifact(
                    kind=new.kind, name=new.name, sha256=new.sha256, size_bytes=new.size_bytes,
                    uri=new.uri, format=new.format).id
            runs = []
            for planned in (p for p in plan() if p.worker == worker):
                run = registry.start_run(
                    job_id=planned.job_id, kind="quantization", name=planned.name,
                    recipe={"bits": 4, "worker": worker}, plugins={"rtn": "0.1"},
                    versions={"quantmill": "test"},
                    inputs=[(ids[label], role) for label, role in planned.inputs])
                if planned.fails:
                    registry.fail_run(run.id, f"planned failure {planned.index}")
                else:
                    checkpoint = planned.outputs[0][0]
                    registry.finish_run(
                        run.id,
                        outputs=[artifact(label, "report" if role == "report" else "checkpoint",
                                          role) for label, role in planned.outputs],
                        metrics=[NewMetric(evaluator="perplexity", name="perplexity",
                                           value=planned.metric_value,
                                           artifact_sha256=sha(checkpoint),
                                           dataset_artifact_id=ids[f"calib-{worker}"])])
                runs.append((planned.index, run.id))
                if len(runs) == 1:
                    # Everyone's first run is in before anyone's second: the writers interleave
                    # by construction, not by luck of SQLite's lock hand-off (which can let one
                    # process run all its writes back to back).
                    barrier.wait(BARRIER_TIMEOUT)
        results.put({"worker": worker, "ids": ids, "runs": runs,
                     "heavy": heavy_modules_loaded()})
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put({"worker": worker, "error": traceback.format_exc()})


def _ending_worker(url: str, worker: int, run_ids: list[int], barrier: Barrier,
                   results: Any) -> None:
    """End each run at the same moment as the other worker: one finishes it, one fails it."""
    try:
        outcomes = []
        with Registry.open(url) as registry:
            for k, run_id in enumerate(run_ids):
                finishes = (k + worker) % 2 == 0
                barrier.wait(BARRIER_TIMEOUT)
                try:
                    if finishes:
                        registry.finish_run(
                            run_id, outputs=[artifact(f"raced-{run_id}", "checkpoint", "out")],
                            metrics=[NewMetric(evaluator="size", name="bytes", value=1.0,
                                               artifact_sha256=sha(f"raced-{run_id}"))])
                    else:
                        registry.fail_run(run_id, "raced failure")
                    outcome = "ok"
                except RunStateError:
                    outcome = "RunStateError"
                outcomes.append((run_id, "finish" if finishes else "fail", outcome))
        results.put({"worker": worker, "outcomes": outcomes})
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put({"worker": worker, "error": traceback.format_exc()})


def _run_workers(monkeypatch: pytest.MonkeyPatch, target: Any,
                 args_for: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Start one spawned process per argument tuple (each gets ``barrier, results`` appended),
    wait for all, and return their reports ordered by worker (errors fail the test)."""
    # A spawned child imports this module by its name to find ``target``: make the folder that
    # name is relative to importable there (pytest's importlib mode keeps it off ``sys.path``).
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[__name__.count(".")]))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(args_for))
    results = context.Queue()
    processes = [context.Process(target=target, args=(*args, barrier, results))
                 for args in args_for]
    for process in processes:
        process.start()
    reports = []
    try:
        for _ in processes:
            reports.append(results.get(timeout=BARRIER_TIMEOUT + 120))
    except queue.Empty:
        pytest.fail(f"only {len(reports)} of {len(processes)} workers reported")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [report["error"] for report in reports if "error" in report]
    assert not errors, "\n".join(errors)
    assert [process.exitcode for process in processes] == [0] * len(processes)
    return sorted(reports, key=lambda report: report["worker"])


def _count(connection: Any, model: Any) -> int:
    return connection.execute(select(func.count()).select_from(model)).scalar_one()


def _check_ledger(url: str, registry: Registry) -> int:
    """One link per chained record, seq exactly 1..N, chain verified; returns N."""
    engine = create_registry_engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            records = {(name, record_id) for name, model in CHAINED_TABLES.items()
                       for record_id in connection.scalars(select(model.id))}
            links = connection.execute(
                select(LedgerRow.seq, LedgerRow.record_type, LedgerRow.record_id)
                .order_by(LedgerRow.seq)).all()
    finally:
        engine.dispose()
    assert [link.seq for link in links] == list(range(1, len(records) + 1))
    chained = [(link.record_type, link.record_id) for link in links]
    assert len(set(chained)) == len(chained), "a record is chained twice"
    assert set(chained) == records
    report = registry.verify()
    assert report.ok, report.problems
    assert report.entries == len(records)
    assert registry.head()[0] == len(records)
    return len(records)


@pytest.mark.slow
def test_processes_register_runs_at_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Open (and so migrate) before the workers start: they must not race the migration.
    with Registry.open(db_url) as registry:
        reports = _run_workers(monkeypatch, _registration_worker,
                               [(db_url, worker) for worker in range(PROCESSES)])
        planned = plan()

        assert all(report["heavy"] == [] for report in reports), reports[0]["heavy"]
        # The shared bases were registered once: every worker got the same ids back.
        for b in range(SHARED_BASES):
            assert len({report["ids"][f"base-{b}"] for report in reports}) == 1
        run_of = {(r["worker"], index): run_id for r in reports for index, run_id in r["runs"]}
        assert len(run_of) == len(planned) and len(set(run_of.values())) == len(planned)
        # The writers really interleaved (otherwise this test would prove nothing): the
        # barrier after each worker's first run guarantees it; this checks the ids agree.
        spans = sorted((min(i for (w, _), i in run_of.items() if w == worker),
                        max(i for (w, _), i in run_of.items() if w == worker))
                       for worker in range(PROCESSES))
        assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))

        expected_edges = Counter()
        for p in planned:
            for label, role in p.inputs:
                expected_edges[(run_of[(p.worker, p.index)], sha(label), "input", role)] += 1
            for label, role in p.outputs:
                expected_edges[(run_of[(p.worker, p.index)], sha(label), "output", role)] += 1
        labels = {label for p in planned for label, _ in (*p.inputs, *p.outputs)}

        engine = create_registry_engine(db_url, pooled=False)
        try:
            with engine.connect() as connection:
                shas = list(connection.scalars(select(ArtifactRow.sha256)))
                assert sorted(shas) == sorted(sha(label) for label in labels)
                runs = connection.execute(select(RunRow.id, RunRow.job_id, RunRow.name)).all()
                assert sorted((r.job_id, r.name) for r in runs) == sorted(
                    (p.job_id, p.name) for p in planned)
                statuses = connection.execute(
                    select(RunCompletionRow.run_id, RunCompletionRow.status)).all()
                assert sorted(statuses) == sorted(
                    (run_of[(p.worker, p.index)], "failed" if p.fails else "succeeded")
                    for p in planned)
                edges = Counter(connection.execute(
                    select(RunEdgeRow.run_id, ArtifactRow.sha256, RunEdgeRow.direction,
                           RunEdgeRow.role)
                    .join(ArtifactRow, ArtifactRow.id == RunEdgeRow.artifact_id)).all())
                assert edges == expected_edges
                metrics = connection.execute(
                    select(MetricRow.run_id, ArtifactRow.sha256, MetricRow.value)
                    .join(ArtifactRow, ArtifactRow.id == MetricRow.artifact_id)).all()
                assert sorted(metrics) == sorted(
                    (run_of[(p.worker, p.index)], sha(p.outputs[0][0]), p.metric_value)
                    for p in planned if not p.fails)
                counts = {name: _count(connection, model)
                          for name, model in CHAINED_TABLES.items()}
        finally:
            engine.dispose()

        entries = _check_ledger(db_url, registry)
        assert entries == sum(counts.values()) == (
            len(labels) + 2 * len(planned) + sum(expected_edges.values())
            + sum(not p.fails for p in planned))


RACES = 6


def test_finish_and_fail_race_on_one_run(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Registry.open(db_url) as registry:
        base = registry.upsert_artifact(kind="model", name="base", sha256=sha("base"),
                                        size_bytes=4, uri="file:///base", format="raw")
        run_ids = [registry.start_run(job_id="race", kind="quantization", name=f"r{k}",
                                      recipe={}, plugins={}, versions={},
                                      inputs=[(base.id, "base_model")]).id
                   for k in range(RACES)]
        reports = _run_workers(monkeypatch, _ending_worker,
                               [(db_url, worker, run_ids) for worker in range(2)])

        for k, run_id in enumerate(run_ids):
            tries = [next(o for o in report["outcomes"] if o[0] == run_id) for report in reports]
            assert sorted(outcome for _, _, outcome in tries) == ["RunStateError", "ok"], tries
            winner = next(op for _, op, outcome in tries if outcome == "ok")
            run = registry.get_run(run_id)
            assert run.status == ("succeeded" if winner == "finish" else "failed"), k
            outputs = [e for e in registry.run_edges(run_id) if e.direction == "output"]
            metrics = registry.metrics_for_run(run_id)
            if winner == "finish":
                made = registry.get_artifact(sha(f"raced-{run_id}"))
                assert [e.artifact_id for e in outputs] == [made.id]
                assert [m.artifact_id for m in metrics] == [made.id]
            else:  # the losing finish_run left nothing behind
                assert outputs == [] and metrics == []
                assert sha(f"raced-{run_id}") not in {
                    a.sha256 for a in registry.list_artifacts(limit=100)}

        engine = create_registry_engine(db_url, pooled=False)
        try:
            with engine.connect() as connection:
                completed = connection.execute(
                    select(RunCompletionRow.run_id, func.count()).group_by(
                        RunCompletionRow.run_id)).all()
        finally:
            engine.dispose()
        assert sorted(completed) == [(run_id, 1) for run_id in sorted(run_ids)]
        _check_ledger(db_url, registry)
