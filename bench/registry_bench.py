"""Registry at scale (issue #5): fill 100,000 artifacts in realistic lineage chains, then time
depth-10 lineage queries on SQLite and on PostgreSQL.

Target: ``Registry.upstream/downstream(id, max_depth=10)`` p95 under 20 ms on both databases.

Workload (seeded, identical on both databases): a few hundred base models and a few dozen data
sets (half calibration, half evaluation sets); then job after job, each a chain of 10-30 runs
starting from a random base model. Every run takes the previous artifact plus a data set and
outputs a checkpoint (with a perplexity metric, half of them also a size metric) and, for about
a third of the runs, a report. About 6% of the checkpoints are re-quantized several ways (2-4
branches of 1-8 runs each), and about 2% of the steps have a failed attempt first (a run that
ends with ``fail_run`` and no outputs, as crashed jobs leave them). The fill stops at exactly
``--artifacts`` artifacts.

Fill: through the public API, as production writes (``upsert_artifact`` for the roots,
``start_run`` + ``finish_run``/``fail_run`` for every run, each its own transaction with its
ledger links), or with ``--fill bulk`` through ``quantmill.registry.bulk`` (same rows and
ledger, many runs per transaction). The rate is reported as measured; ``Registry.verify()``
must pass on the filled database (its time is reported too).

Queries: roots drawn at random (seeded) among the artifacts that HAVE 10 levels of lineage in
the queried direction (rejection sampling over all artifacts, checked against the generator's
own graph); ``--warmup`` untimed queries first, then each of ``--queries`` calls timed alone
with ``time.perf_counter``. Every timed result is then checked against the generator's graph
(same artifacts at the same depths, same runs), and a separate pass counts SQL statements per
call.

    .venv/bin/python bench/registry_bench.py --fill bulk          # both, 100k: ~15 min here
    .venv/bin/python bench/registry_bench.py --backend sqlite --artifacts 5000 --fill api \
        --out /tmp/r.json                                           # quick, all through the API

Writes ``--out`` (JSON) and the same name with ``.md`` (a table for humans).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, event, text

from quantmill.registry import LineageGraph, NewArtifact, NewMetric, Registry
from quantmill.registry.db import create_registry_engine

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
TARGET_P95_MS = 20.0

# Shape of the workload (see the module docstring).
CHAIN_STEPS = (10, 30)
BRANCH_STEPS = (1, 8)
FANOUT_RATE = 0.06
FANOUT_WAYS = (2, 4)
REPORT_RATE = 0.35
SIZE_METRIC_RATE = 0.5
FAIL_RATE = 0.02
RUN_KINDS = ("quantization", "calibration", "finetune", "pruning", "conversion")
PLUGINS = {kind: {f"{kind}-plugin": "0.1.0"} for kind in RUN_KINDS}
VERSIONS = {"quantmill": "0.1.0", "torch": "2.13.0", "transformers": "5.0.0"}
PROTOCOL = {"seq_len": 512, "windows": 40}


# --- workload ----------------------------------------------------------------------------------


def label_sha(label: str) -> str:
    """The (made-up) content hash of the artifact the bench calls ``label``."""
    return hashlib.sha256(f"quantmill-bench:{label}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ArtifactSpec:
    label: str
    kind: str
    format: str
    size_bytes: int

    @property
    def sha256(self) -> str:
        return label_sha(self.label)

    @property
    def uri(self) -> str:
        return f"s3://quantmill-bench/{self.kind}/{self.label}"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    artifact: str
    evaluator: str
    name: str
    value: float
    unit: str | None
    dataset: str | None


@dataclass(slots=True)
class RunSpec:
    job_id: str
    kind: str
    name: str
    recipe: dict[str, Any]
    inputs: list[tuple[str, str]]  # (label, role)
    outputs: list[tuple[ArtifactSpec, str]] = field(default_factory=list)
    metrics: list[MetricSpec] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class Workload:
    """What to register, in order, and the lineage graph it must produce (by label)."""

    roots: list[ArtifactSpec] = field(default_factory=list)
    runs: list[RunSpec] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    #: label -> indices (in ``runs``) of the runs that output it / take it as input.
    producers: dict[str, list[int]] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)

    @property
    def artifacts(self) -> int:
        return len(self.labels)

    def add_run(self, run: RunSpec) -> None:
        index = len(self.runs)
        self.runs.append(run)
        for label, _ in run.inputs:
            self.consumers.setdefault(label, []).append(index)
        for spec, _ in run.outputs:
            self.labels.append(spec.label)
            self.producers.setdefault(spec.label, []).append(index)

    def lineage(self, label: str, direction: str, max_depth: int) -> tuple[dict[str, int], set]:
        """What ``Registry.upstream/downstream`` must return: {label: depth} and run indices.

        The same definition as ``quantmill.registry.lineage``, computed independently here by
        breadth-first search over the generator's own records: upstream, a step goes from an
        artifact to the inputs of the runs that output it; downstream, to the outputs of the
        runs that took it as input (a failed run joins the graph but leads nowhere).
        """
        upstream = direction == "upstream"
        near = self.producers if upstream else self.consumers
        depths = {label: 0}
        frontier = deque([label])
        runs: set[int] = set()
        while frontier:
            node = frontier.popleft()
            if depths[node] >= max_depth:
                continue
            for index in near.get(node, ()):
                runs.add(index)
                run = self.runs[index]
                far = [lbl for lbl, _ in run.inputs] if upstream else [
                    spec.label for spec, _ in run.outputs]
                for other in far:
                    if other not in depths:
                        depths[other] = depths[node] + 1
                        frontier.append(other)
        return depths, runs


def build_workload(n_artifacts: int, seed: int, n_models: int, n_datasets: int) -> Workload:
    """The seeded history described in the module docstring, exactly ``n_artifacts`` big."""
    rng = random.Random(seed)
    work = Workload()
    models = [ArtifactSpec(f"model-{i:03d}", "model", rng.choice(("hf", "gguf")),
                           rng.randint(200, 16_000) * 2**20) for i in range(n_models)]
    datasets = [ArtifactSpec(f"{purpose}-set-{j:02d}", "dataset", "jsonl",
                             rng.randint(1, 500) * 2**20)
                for j, purpose in ((j, ("calibration", "evaluation")[j % 2])
                                   for j in range(n_datasets))]
    work.roots = models + datasets
    work.labels = [spec.label for spec in work.roots]
    if n_artifacts < len(work.labels) + 1:
        raise SystemExit(f"--artifacts must exceed the {len(work.labels)} roots")
    evaluation = [d.label for d in datasets if d.label.startswith("evaluation")]
    counter = 0

    def step(job: str, prev: ArtifactSpec, depth: int) -> ArtifactSpec | None:
        nonlocal counter
        if work.artifacts >= n_artifacts:
            return None
        kind = rng.choice(RUN_KINDS)
        data = rng.choice(datasets)
        role = "calibration" if data.label.startswith("calibration") else "evaluation"
        recipe = {"method": kind, "bits": rng.choice((2, 3, 4, 8)),
                  "group_size": rng.choice((32, 64, 128)), "step": depth}
        inputs = [(prev.label, "model"), (data.label, role)]
        if rng.random() < FAIL_RATE:
            work.add_run(RunSpec(job, kind, f"{kind}-{depth}-attempt", recipe, inputs,
                                 error="worker lost: out of memory"))
        counter += 1
        ckpt = ArtifactSpec(f"ckpt-{counter:06d}", "checkpoint", "safetensors",
                            max(prev.size_bytes // rng.choice((1, 2, 4)), 2**20))
        run = RunSpec(job, kind, f"{kind}-{depth}", recipe, inputs, [(ckpt, "checkpoint")])
        run.metrics.append(MetricSpec(ckpt.label, "perplexity", "perplexity",
                                      round(rng.uniform(6.0, 40.0), 4), None,
                                      rng.choice(evaluation)))
        if rng.random() < SIZE_METRIC_RATE:
            run.metrics.append(MetricSpec(ckpt.label, "size", "size_mb",
                                          round(ckpt.size_bytes / 2**20, 3), "MB", None))
        if work.artifacts + 1 < n_artifacts and rng.random() < REPORT_RATE:
            run.outputs.append((ArtifactSpec(f"report-{counter:06d}", "report", "markdown",
                                             rng.randint(2, 64) * 1024), "report"))
        work.add_run(run)
        return ckpt

    job_no = 0
    while work.artifacts < n_artifacts:
        job_no += 1
        job = f"job-{job_no:05d}"
        pending = [(rng.choice(models), rng.randint(*CHAIN_STEPS), 0)]
        while pending:
            prev, steps, depth = pending.pop()
            for s in range(steps):
                made = step(job, prev, depth + s)
                if made is None:
                    break
                prev = made
                if s < steps - 1 and rng.random() < FANOUT_RATE:
                    for _ in range(rng.randint(*FANOUT_WAYS) - 1):
                        pending.append((prev, rng.randint(*BRANCH_STEPS), depth + s + 1))
    return work


def has_levels(work: Workload, label: str, direction: str, depth: int) -> bool:
    depths, _ = work.lineage(label, direction, depth)
    return max(depths.values()) >= depth


def pick_roots(work: Workload, direction: str, depth: int, count: int,
               rng: random.Random) -> list[str]:
    """``count`` distinct artifacts, uniform among those with ``depth`` levels in ``direction``
    (rejection sampling; fewer only if fewer exist)."""
    order = list(work.labels)
    rng.shuffle(order)
    chosen: list[str] = []
    for label in order:
        if has_levels(work, label, direction, depth):
            chosen.append(label)
            if len(chosen) == count:
                break
    return chosen


# --- databases ---------------------------------------------------------------------------------


@contextmanager
def database(backend: str, keep: bool, sqlite_path: Path, pg_name: str) -> Iterator[str]:
    """A fresh, empty database for the run; removed afterwards unless ``keep``."""
    if backend == "sqlite":
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{sqlite_path}{suffix}").unlink(missing_ok=True)
        try:
            yield f"sqlite:///{sqlite_path}"
        finally:
            if not keep:
                sqlite_path.unlink(missing_ok=True)
        return
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{pg_name}"')
    try:
        yield PG_URL.format(name=pg_name)
    finally:
        if not keep:
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')


def sql(url: str, statement: str) -> list[Any]:
    """Rows of one read-only statement on a connection of its own (bench bookkeeping, kept
    apart from the registry's engine and its timings)."""
    engine = create_registry_engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(statement)).all())
    finally:
        engine.dispose()


def execute(url: str, statement: str) -> None:
    """Run one statement and commit it, on a connection of its own."""
    engine = create_registry_engine(url, pooled=False)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def database_bytes(url: str, backend: str, sqlite_path: Path) -> int:
    if backend == "sqlite":
        return sqlite_path.stat().st_size
    return int(sql(url, "SELECT pg_database_size(current_database())")[0][0])


def server_version(url: str, backend: str) -> str:
    if backend == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    return "PostgreSQL " + str(sql(url, "SHOW server_version")[0][0])


# --- fill --------------------------------------------------------------------------------------


class Progress:
    """One line to stderr every ``every`` items, with the rate so far and the time left."""

    def __init__(self, total: int, label: str, every: int) -> None:
        self.total, self.label, self.every = total, label, every
        self.start = time.perf_counter()

    def __call__(self, done: int) -> None:
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed else 0.0
        left = (self.total - done) / rate if rate else 0.0
        print(f"  {self.label}: {done}/{self.total} ({rate:.0f}/s, {elapsed:.0f} s, "
              f"~{left:.0f} s left, load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


def register_roots(registry: Registry, work: Workload) -> dict[str, int]:
    return {spec.label: registry.upsert_artifact(
        kind=spec.kind, name=spec.label, sha256=spec.sha256, size_bytes=spec.size_bytes,
        uri=spec.uri, format=spec.format, metadata={"source": "bench"}).id
        for spec in work.roots}


def new_outputs(spec: RunSpec) -> list[NewArtifact]:
    return [NewArtifact(kind=a.kind, name=a.label, sha256=a.sha256, size_bytes=a.size_bytes,
                        uri=a.uri, format=a.format, role=role) for a, role in spec.outputs]


def new_metrics(spec: RunSpec, ids: dict[str, int]) -> list[NewMetric]:
    sha = {a.label: a.sha256 for a, _ in spec.outputs}
    return [NewMetric(evaluator=m.evaluator, name=m.name, value=m.value, unit=m.unit,
                      protocol=PROTOCOL, artifact_sha256=sha[m.artifact],
                      dataset_artifact_id=ids[m.dataset] if m.dataset else None)
            for m in spec.metrics]


def fill_api(registry: Registry, work: Workload) -> list[int]:
    """Register everything through the public API, one call per step as a flow does it
    (the next step's input id is read back with ``get_artifact``); returns the run ids."""
    ids = register_roots(registry, work)
    run_ids: list[int] = []
    progress = Progress(len(work.runs), "runs", 2000)
    for n, spec in enumerate(work.runs, 1):
        run = registry.start_run(
            job_id=spec.job_id, kind=spec.kind, name=spec.name, recipe=spec.recipe,
            plugins=PLUGINS[spec.kind], versions=VERSIONS,
            inputs=[(ids[label], role) for label, role in spec.inputs])
        run_ids.append(run.id)
        if spec.error is not None:
            registry.fail_run(run.id, spec.error)
        else:
            registry.finish_run(run.id, outputs=new_outputs(spec),
                                metrics=new_metrics(spec, ids), details={"seconds": 1.0})
            for a, _ in spec.outputs:
                if a.kind == "checkpoint":  # the next step's input
                    ids[a.label] = registry.get_artifact(a.sha256).id
        progress(n)
    return run_ids


def fill_bulk(registry: Registry, work: Workload, batch: int) -> list[int]:
    """Register everything through ``quantmill.registry.bulk`` (many runs per transaction)."""
    from quantmill.registry import bulk
    from quantmill.registry.writes import EndedRun, RunCompletion, RunInput

    ids = register_roots(registry, work)
    run_ids: list[int] = []
    progress = Progress(len(work.runs), "runs", batch * 4)
    for start in range(0, len(work.runs), batch):
        chunk = work.runs[start:start + batch]
        run_ids.extend(bulk.record_runs(registry, [
            EndedRun(
                job_id=spec.job_id, kind=spec.kind, name=spec.name, recipe=spec.recipe,
                plugins=PLUGINS[spec.kind], versions=VERSIONS,
                inputs=tuple(RunInput(ids.get(label) or label_sha(label), role)
                             for label, role in spec.inputs),
                outputs=tuple(new_outputs(spec)), metrics=tuple(new_metrics(spec, ids)),
                completion=RunCompletion("succeeded", {"seconds": 1.0}) if spec.error is None
                else RunCompletion("failed", {}, spec.error))
            for spec in chunk]))
        progress(start + len(chunk))
    return run_ids


def resolve_ids(url: str, work: Workload) -> dict[str, int]:
    """{label: artifact id}, read back by name (the bench names each artifact by its label)."""
    ids = {name: artifact_id for name, artifact_id in sql(url, "SELECT name, id FROM artifacts")}
    missing = [label for label in work.labels if label not in ids]
    if missing or len(ids) != work.artifacts:
        raise SystemExit(f"fill is incomplete: {len(missing)} artifacts missing, "
                         f"{len(ids)} stored for {work.artifacts} planned")
    return ids


def table_counts(url: str) -> dict[str, int]:
    tables = ("artifacts", "runs", "run_completions", "run_edges", "metrics", "ledger")
    return {t: int(sql(url, f"SELECT count(*) FROM {t}")[0][0]) for t in tables}


# --- queries -----------------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the order statistics (numpy's default method)."""
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)
    return {
        "n": len(ordered),
        "mean_ms": round(sum(ordered) / len(ordered), 3),
        "p50_ms": round(percentile(ordered, 0.50), 3),
        "p95_ms": round(percentile(ordered, 0.95), 3),
        "p99_ms": round(percentile(ordered, 0.99), 3),
        "max_ms": round(ordered[-1], 3),
    }


@contextmanager
def statement_counter() -> Iterator[list[int]]:
    """Counts SQL statements sent by any engine while active."""
    seen = [0]

    def count(*_args: Any) -> None:
        seen[0] += 1

    event.listen(Engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", count)


def check_graph(graph: LineageGraph, work: Workload, label: str, direction: str, depth: int,
                ids: dict[str, int], run_ids: list[int]) -> None:
    """The registry's answer must be the generator's graph: same artifacts, depths, runs."""
    depths, runs = work.lineage(label, direction, depth)
    want = {ids[name]: d for name, d in depths.items()}
    if dict(graph.depths) != want or set(graph.runs) != {run_ids[i] for i in runs}:
        raise SystemExit(f"wrong {direction} lineage for {label}: {len(graph.depths)} "
                         f"artifacts / {len(graph.runs)} runs, expected {len(want)} / {len(runs)}")
    if max(want.values()) != depth or set(graph.artifacts) != set(want):
        raise SystemExit(f"{label} does not reach depth {depth} {direction}")


def time_queries(registry: Registry, work: Workload, direction: str, args: argparse.Namespace,
                 ids: dict[str, int], run_ids: list[int]) -> dict[str, Any]:
    rng = random.Random(f"{args.seed}-{direction}")
    roots = pick_roots(work, direction, args.depth, args.queries + args.warmup, rng)
    if len(roots) < args.queries + args.warmup:
        raise SystemExit(f"only {len(roots)} artifacts have {args.depth} levels {direction}")
    warmup, timed = roots[:args.warmup], roots[args.warmup:]
    query: Callable[..., LineageGraph] = getattr(registry, direction)
    for label in warmup:
        query(ids[label], max_depth=args.depth)
    times_ms, graphs = [], []
    for label in timed:
        start = time.perf_counter()
        graph = query(ids[label], max_depth=args.depth)
        times_ms.append((time.perf_counter() - start) * 1000)
        graphs.append(graph)
    for label, graph in zip(timed, graphs, strict=True):
        check_graph(graph, work, label, direction, args.depth, ids, run_ids)
    with statement_counter() as seen:
        for label in timed[:20]:
            query(ids[label], max_depth=args.depth)
    sizes = sorted(len(g.artifacts) for g in graphs)
    kinds: dict[str, int] = {}
    for label in timed:
        kind = label.split("-")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        **summarize(times_ms),
        "statements_per_call": seen[0] / min(20, len(timed)),
        "graph_artifacts": {"median": sizes[len(sizes) // 2], "max": sizes[-1]},
        "graph_runs_median": sorted(len(g.runs) for g in graphs)[len(graphs) // 2],
        "root_kinds": dict(sorted(kinds.items())),
        "target_met": percentile(sorted(times_ms), 0.95) < TARGET_P95_MS,
    }


# --- one backend -------------------------------------------------------------------------------


def timed_fill(registry: Registry, url: str, backend: str, work: Workload, mode: str,
               args: argparse.Namespace, sqlite_path: Path) -> tuple[list[int], dict[str, Any]]:
    """Fill ``work`` into the open registry; returns the run ids and the fill's figures."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    run_ids = fill_api(registry, work) if mode == "api" else fill_bulk(registry, work, args.batch)
    seconds = time.perf_counter() - start
    counts = table_counts(url)
    if counts["artifacts"] != work.artifacts or counts["runs"] != len(work.runs):
        raise SystemExit(f"fill is incomplete on {backend}: {counts}")
    return run_ids, {
        "mode": mode,
        "seconds": round(seconds, 1),
        "artifacts_per_s": round(work.artifacts / seconds, 1),
        "runs_per_s": round(len(work.runs) / seconds, 1),
        "ledger_entries_per_s": round(counts["ledger"] / seconds, 1),
        "rows": counts,
        "failed_runs": sum(r.error is not None for r in work.runs),
        "database_mb": round(database_bytes(url, backend, sqlite_path) / 2**20, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def api_sample(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """The public API's fill rate, measured on the first ``--api-sample`` artifacts of the same
    workload in a database of their own, and the time 100% would take at that rate."""
    work = build_workload(args.api_sample, args.seed, args.models, args.datasets)
    print(f"[{backend}] API sample: {work.artifacts} artifacts / {len(work.runs)} runs",
          file=sys.stderr, flush=True)
    path = Path(f"{args.sqlite_path}.api-sample")
    with database(backend, False, path, f"{args.pg_database}_api") as url:
        with Registry.open(url) as registry:
            _, figures = timed_fill(registry, url, backend, work, "api", args, path)
    figures["artifacts"] = work.artifacts
    figures["runs"] = len(work.runs)
    figures["extrapolated_seconds_for_all"] = round(args.artifacts / figures["artifacts_per_s"])
    return figures


def bench_backend(backend: str, work: Workload, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"backend": backend}
    if args.fill == "bulk" and args.api_sample:
        result["api_sample"] = api_sample(backend, args)
    print(f"[{backend}] filling {work.artifacts} artifacts / {len(work.runs)} runs "
          f"({args.fill})", file=sys.stderr, flush=True)
    sqlite_path = Path(args.sqlite_path)
    with database(backend, args.keep, sqlite_path, args.pg_database) as url:
        result["url"] = url
        with Registry.open(url) as registry:
            result["server"] = server_version(url, backend)
            run_ids, result["fill"] = timed_fill(registry, url, backend, work, args.fill, args,
                                                 sqlite_path)
            if backend == "postgresql":
                # Autovacuum is off on this server, so nothing refreshes the planner's
                # statistics after the fill; production's autovacuum would (see NOTES).
                start = time.perf_counter()
                execute(url, "ANALYZE")
                result["fill"]["analyze_seconds"] = round(time.perf_counter() - start, 1)
            seconds = result["fill"]["seconds"]
            ids = resolve_ids(url, work)
            print(f"[{backend}] filled in {seconds:.0f} s; querying", file=sys.stderr,
                  flush=True)
            result["queries"] = {}
            for direction in ("upstream", "downstream"):
                load = os.getloadavg()
                timing = time_queries(registry, work, direction, args, ids, run_ids)
                timing["load_average_before"] = [round(x, 2) for x in load]
                result["queries"][direction] = timing
                print(f"[{backend}] {direction}: p50 {timing['p50_ms']} ms, p95 "
                      f"{timing['p95_ms']} ms", file=sys.stderr, flush=True)
            print(f"[{backend}] verifying the ledger", file=sys.stderr, flush=True)
            start = time.perf_counter()
            report = registry.verify()
            result["verify"] = {"ok": report.ok, "entries": report.entries,
                                "seconds": round(time.perf_counter() - start, 1),
                                "problems": [p.to_json() for p in report.problems[:5]]}
            if not report.ok:
                raise SystemExit(f"verify failed on {backend}: {report.problems[:5]}")
    return result


# --- report ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict[str, str]:
    names = ("quantmill", "sqlalchemy", "psycopg", "alembic")
    found = {name: metadata.version(name) for name in names}
    found["sqlite3 library"] = sqlite3.sqlite_version
    return found


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Registry at scale: lineage queries on {results['artifacts']:,} artifacts "
        f"({results['date']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cpus']} CPUs, "
        f"Python {results['machine']['python']}; "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + f". Load average at start {results['load_average_start']}, at end "
        f"{results['load_average_end']}: the 2 cores were shared with other jobs.",
        "",
        f"Workload: {results['workload']['runs']:,} runs ({results['workload']['failed_runs']} "
        f"failed) in {results['workload']['jobs']:,} jobs from {results['workload']['models']} "
        f"base models and {results['workload']['datasets']} data sets; seed "
        f"{results['seed']}. Target: p95 < {TARGET_P95_MS:g} ms for depth-"
        f"{results['depth']} lineage queries.",
        "",
        "| backend | fill | fill rate | ledger links | DB size | verify |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["backends"]:
        f, v = r["fill"], r["verify"]
        if "api_sample" in r:
            a = r["api_sample"]
            lines.append(
                f"| {r['server']} | public API, first {a['artifacts']:,} artifacts: "
                f"{a['seconds']:.0f} s ({results['artifacts']:,} at this rate: ~"
                f"{a['extrapolated_seconds_for_all'] / 60:.0f} min) | "
                f"{a['artifacts_per_s']:.0f} artifacts/s, {a['runs_per_s']:.0f} runs/s | "
                f"{a['rows']['ledger']:,} ({a['ledger_entries_per_s']:.0f}/s) | "
                f"{a['database_mb']} MB | |")
        lines.append(
            f"| {r['server']} | {f['seconds']:.0f} s ({f['mode']}) | "
            f"{f['artifacts_per_s']:.0f} artifacts/s, {f['runs_per_s']:.0f} runs/s | "
            f"{f['rows']['ledger']:,} ({f['ledger_entries_per_s']:.0f}/s) | "
            f"{f['database_mb']} MB | {'ok' if v['ok'] else 'FAILED'} in {v['seconds']} s |")
    lines += [
        "",
        f"| backend | query (depth {results['depth']}) | n | p50 ms | p95 ms | p99 ms | max ms "
        "| SQL statements/call | graph artifacts median (max) | p95 target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["backends"]:
        for direction, q in r["queries"].items():
            lines.append(
                f"| {r['backend']} | {direction} | {q['n']} | {q['p50_ms']:.2f} | "
                f"{q['p95_ms']:.2f} | {q['p99_ms']:.2f} | {q['max_ms']:.2f} | "
                f"{q['statements_per_call']:g} | {q['graph_artifacts']['median']} "
                f"({q['graph_artifacts']['max']}) | {'met' if q['target_met'] else 'NOT met'} |")
    lines += ["", "Roots per kind: " + "; ".join(
        f"{r['backend']} {d}: {q['root_kinds']}" for r in results["backends"]
        for d, q in r["queries"].items()), ""]
    lines += [results["notes"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--artifacts", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--models", type=int, default=300, help="base models")
    parser.add_argument("--datasets", type=int, default=48)
    parser.add_argument("--fill", choices=("api", "bulk"), default="bulk",
                        help="api: every run through start_run/finish_run (~50 min for 100k "
                             "on SQLite here); bulk: quantmill.registry.bulk, after an API "
                             "sample (--api-sample)")
    parser.add_argument("--batch", type=int, default=500, help="runs per bulk transaction")
    parser.add_argument("--api-sample", type=int, default=5000,
                        help="with --fill bulk: artifacts filled through the public API first, "
                             "in a database of their own, to measure its rate (0: skip)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "registry.json"))
    parser.add_argument("--sqlite-path", default="/tmp/quantmill_bench.db")
    parser.add_argument("--pg-database", default="quantmill_bench")
    parser.add_argument("--keep", action="store_true", help="keep the filled databases")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    work = build_workload(args.artifacts, args.seed, args.models, args.datasets)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
        "load_average_start": load_start,
        "artifacts": work.artifacts,
        "depth": args.depth,
        "seed": args.seed,
        "workload": {"runs": len(work.runs), "failed_runs": sum(r.error is not None
                                                                for r in work.runs),
                     "jobs": len({r.job_id for r in work.runs}), "models": args.models,
                     "datasets": args.datasets},
        "backends": [bench_backend(backend, work, args) for backend in backends],
    }
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["notes"] = NOTES
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


NOTES = """\
Notes:

* Each query is `Registry.upstream/downstream(id, max_depth=10)` including its session, all SQL
  and the conversion to frozen entities, timed alone with `time.perf_counter` after the warm-up;
  percentiles interpolate linearly between order statistics. Roots: uniform among the artifacts
  that have 10 levels of lineage in that direction (the generator's own graph decides); every
  timed answer was then checked against that graph (same artifacts at the same depths, same
  runs). SQL statements/call: counted on a separate pass over 20 of the roots (SQLite's count
  includes its BEGIN).
* Fill: through the public API (`start_run`, `finish_run`/`fail_run`, one transaction each with
  its ledger links) the rate is the "public API" row, measured on the first artifacts of the same
  workload in a database of its own: far too slow to fill 100,000 artifacts in the time available
  (the extrapolation is in the row), so the full fill used `quantmill.registry.bulk.record_runs`
  (the same rows and ledger links, 500 runs per transaction). `Registry.verify()` then recomputed
  the whole chain and compared every record with its chained copy.
* PostgreSQL: autovacuum is off on this server, so the fill is followed by an explicit `ANALYZE`
  (what autovacuum does in production). Without it the planner kept the statistics of a nearly
  empty database and scanned all of `metrics` for every lineage query (~11 ms).
"""


if __name__ == "__main__":
    main()
