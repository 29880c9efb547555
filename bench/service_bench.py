"""Prefect service overhead (issue #16): submit-to-start latency and a queue drained by 2 workers.

Starts its own ``prefect server start`` (SQLite, fresh home) and two ``quantmill worker --pool
bench --limit 1`` processes on this machine, then:

- latency: ``--latency-runs`` probe jobs (``flows/probe.py``: no computation) submitted one at a
  time to idle, warm workers; for each, seconds from ``submit`` returning to the worker claiming
  the run (state Pending) and to the flow starting (state Running, after the flow-run process
  has started Python and imported quantmill), and to Completed;
- drain: ``--queue`` probe jobs submitted at once; runs per minute until the last completes, and
  the CPU seconds the Prefect server and the workers (with their flow-run processes) used.

    .venv/bin/python bench/service_bench.py                     # 10 latency runs, 100 queued
    .venv/bin/python bench/service_bench.py --queue 20 --out /tmp/service

Writes ``--out``.json and ``--out``.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
POOL = "bench"


def _support() -> Any:
    spec = importlib.util.spec_from_file_location("prefect_service_support",
                                                  REPO / "tests" / "support" /
                                                  "prefect_service.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes and their reaped children."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
    return total


def _state_times(client: Any, flow_run_id: Any) -> dict[str, datetime]:
    times: dict[str, datetime] = {}
    for state in client.read_flow_run_states(flow_run_id):
        times.setdefault(state.type.value, state.timestamp)
    return times


def _wait_final(client: Any, ids: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        for flow_run_id in list(pending):
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                if not run.state.is_completed():
                    raise RuntimeError(f"probe {flow_run_id} ended {run.state.name}: "
                                       f"{run.state.message}")
                pending.discard(flow_run_id)
        time.sleep(0.5)
    if pending:
        raise RuntimeError(f"{len(pending)} probe(s) unfinished after {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--queue", type=int, default=100)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "service")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "bench"))
    from machine import cpu_facts, write_results

    service = _support()
    root = Path(tempfile.mkdtemp(prefix="quantmill-service-bench-"))
    server = service.PrefectServer(root / "prefect")
    started = time.perf_counter()
    server.start()
    server_start_s = time.perf_counter() - started
    os.environ.update(server.env())
    os.environ["QUANTMILL_HOME"] = str(root / "home")
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from quantmill.flows.deployments import adhoc_deployment
    from quantmill.flows.environment import current_environment

    workers: list[Any] = []
    try:
        # one after the other: the first creates the fresh registry (two processes migrating
        # one new SQLite file at once can fail with "database is locked")
        for i in range(2):
            workers.append(service.Worker(root / f"worker-{i}.log", POOL,
                                          {**server.env(), "QUANTMILL_HOME": str(root / "home")},
                                          ("--limit", "1", "--name", f"bench-{i}")).start())
            workers[-1].wait_started()
        with get_client(sync_client=True) as client:
            deployment = adhoc_deployment(client, "probe", POOL)
        environment = current_environment().record()

        def submit(label: str) -> tuple[Any, datetime]:
            run = run_deployment(deployment, parameters={"label": label,
                                                         "environment": environment},
                                 timeout=0, as_subflow=False)
            return run.id, datetime.now(UTC)

        # warm-up: each worker's first flow-run process pays for cold caches
        with get_client(sync_client=True) as client:
            _wait_final(client, [submit(f"warm-{i}")[0] for i in range(2)], 300)

        latency: list[dict[str, float]] = []
        with get_client(sync_client=True) as client:
            for index in range(args.latency_runs):
                flow_run_id, submitted = submit(f"latency-{index}")
                _wait_final(client, [flow_run_id], 300)
                times = _state_times(client, flow_run_id)
                latency.append({key: (times[state] - submitted).total_seconds()
                                for key, state in (("claimed_s", "PENDING"),
                                                   ("running_s", "RUNNING"),
                                                   ("completed_s", "COMPLETED"))})
                time.sleep(1)

        server_pids = [server.process.pid, *service.descendants(server.process.pid)]
        worker_pids = [w.process.pid for w in workers]
        server_cpu0, worker_cpu0 = cpu_seconds(server_pids), cpu_seconds(worker_pids)
        drain_started = time.perf_counter()
        ids = [submit(f"queue-{i}")[0] for i in range(args.queue)]
        submit_s = time.perf_counter() - drain_started
        with get_client(sync_client=True) as client:
            _wait_final(client, ids, 3600)
        drain_s = time.perf_counter() - drain_started
        server_cpu = cpu_seconds(server_pids) - server_cpu0
        worker_cpu = cpu_seconds(worker_pids) - worker_cpu0
        # idle: what the two workers' polling (every PREFECT_WORKER_QUERY_SECONDS) costs
        idle0 = cpu_seconds(server_pids)
        time.sleep(args.idle_s)
        idle_cpu = cpu_seconds(server_pids) - idle0
    finally:
        for worker in workers:
            worker.stop()
        server.stop()

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in latency), 2)

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/service_bench.py " + " ".join(sys.argv[1:]),
        "machine": {**cpu_facts(), "prefect": metadata.version("prefect")},
        "server_start_s": round(server_start_s, 1),
        "latency_runs": latency,
        "latency_median": {k: med(k) for k in ("claimed_s", "running_s", "completed_s")},
        "queue": args.queue, "queue_submit_s": round(submit_s, 1),
        "drain_s": round(drain_s, 1), "runs_per_minute": round(60 * args.queue / drain_s, 1),
        "server_cpu_s": round(server_cpu, 1),
        "server_cpu_share": round(server_cpu / drain_s, 3),
        "worker_cpu_s": round(worker_cpu, 1),
        "idle_s": args.idle_s, "idle_server_cpu_s": round(idle_cpu, 2),
        "idle_server_cpu_share": round(idle_cpu / args.idle_s, 4),
    }
    write_results(args.out, report, markdown(report))


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lat = r["latency_median"]
    return "\n".join([
        f"# Prefect service benchmark ({r['date']})", "",
        f"Command: `{r['command']}`", "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, ISA {', '.join(m['isa'])}; Python "
        f"{m['python']}, prefect {m['prefect']}; `prefect server start` (SQLite) and 2 "
        "`quantmill worker --limit 1` on the same machine.", "",
        f"Server healthy {r['server_start_s']} s after start.", "",
        f"## Submit to start, warm idle workers (median of {len(r['latency_runs'])} probe jobs)",
        "",
        "| from `submit` to | seconds |", "|---|---|",
        f"| a worker claims the run (Pending) | {lat['claimed_s']} |",
        f"| the flow starts (Running) | {lat['running_s']} |",
        f"| the run is Completed | {lat['completed_s']} |", "",
        f"## A queue of {r['queue']} probe jobs drained by 2 workers (limit 1 each)", "",
        f"- submitted in {r['queue_submit_s']} s; all completed {r['drain_s']} s after the "
        f"first submit: **{r['runs_per_minute']} runs per minute**",
        f"- Prefect server CPU: {r['server_cpu_s']} s ({100 * r['server_cpu_share']:.0f}% of "
        f"one core over the drain); workers and their flow-run processes: "
        f"{r['worker_cpu_s']} s",
        f"- idle, the 2 workers polling every 2 s for {r['idle_s']:.0f} s: Prefect server CPU "
        f"{r['idle_server_cpu_s']} s ({100 * r['idle_server_cpu_share']:.1f}% of one core)",
        ""])


if __name__ == "__main__":
    main()
