"""Where a batch's points run: in this process, as child flow runs on a work pool, or as Prefect
tasks on a Dask cluster.

- ``InProcess``: one ``compress`` subflow after another (``quantmill tradeoff`` on one machine).
- ``OnPool``: every point is queued at once as a child flow run of the pool's ad-hoc
  deployment (``run_deployment``), so the pool's workers on any machine take them as they free
  up; the batch waits for all of them. A point that fails or crashes is retried alone (its own
  flow run set back to Scheduled, as the UI's Retry does) up to ``retries`` times, and resumes
  from its work area; the others are untouched.
- ``OnDask``: every point is a task of prefect-dask's ``DaskTaskRunner`` that runs the
  ``compress`` flow on a Dask worker. Every Dask worker must report to the same Prefect server
  (``PREFECT_API_URL``), or each would start a temporary server of its own and the batch's runs
  would be scattered over them; this is checked before any point is sent.

Each returns an ``Outcome`` per point, with the registry run that recorded it (the points share
the batch's job id), so the report is read from the registry whichever way the points ran.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from quantmill.flows.batch import BatchPlan, PlannedPoint
from quantmill.flows.compress import compress
from quantmill.flows.prefect_server import ServiceError, configured_api_url
from quantmill.registry import Registry

POLL_S = 2.0
#: a crashed run is retried only once its Crashed state is this old: the process worker reports
#: a killed flow-run process twice (its runner at once, the worker seconds later), and a
#: retry scheduled between the two would be overwritten by the second report
CRASH_SETTLE_S = 15.0


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded (run now), reused (registered earlier), failed
    run_id: int | None
    error: str | None = None
    flow_s: float | None = None  # the point's own wall time, calibration and hashing included
    flow_run_id: str | None = None
    attempts: int = 1
    where: str | None = None  # the Dask worker that ran it


def point_run(reg: Registry, point: PlannedPoint, job_id: str, status: str) -> int | None:
    """The newest quantization run with ``status`` this batch recorded for the point."""
    for run in reg.list_runs(job_id=job_id, kind="quantization", status=status, limit=200):
        if run.recipe_sha256 == point.recipe_sha256:
            return run.id
    return None


def _error_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


class InProcess:
    """Points as ``compress`` subflows in this process, one after another."""

    def run(self, plan: BatchPlan, points: list[PlannedPoint], job_id: str,
            database_url: str | None, advance: Callable[[int], None]) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        for point in points:
            started = time.perf_counter()
            try:
                summary = compress(point.recipe_text, str(plan.path), point.recipe_name,
                                   database_url, job_id)
            except Exception as exc:  # reported as a failed point; the batch goes on
                error = _error_line(exc)
                print(f"{point.label}: failed: {error}")
                with Registry.open(database_url) as reg:
                    run_id = point_run(reg, point, job_id, "failed")
                outcomes[point.label] = Outcome("failed", run_id, error,
                                                round(time.perf_counter() - started, 3))
            else:
                outcomes[point.label] = Outcome("succeeded", summary["run_id"], None,
                                                round(time.perf_counter() - started, 3))
            advance(1)
        return outcomes


@dataclass
class _Child:
    point: PlannedPoint
    flow_run_id: Any
    attempts: int = 1


class OnPool:
    """Points as child flow runs on a work pool (see the module docstring)."""

    def __init__(self, pool: str, retries: int = 1) -> None:
        self.pool, self.retries = pool, retries

    def run(self, plan: BatchPlan, points: list[PlannedPoint], job_id: str,
            database_url: str | None, advance: Callable[[int], None]) -> dict[str, Outcome]:
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.runtime import flow_run
        from prefect.states import Scheduled

        from quantmill.flows.deployments import adhoc_deployment, require_pool
        from quantmill.flows.environment import current_environment

        if configured_api_url() is None:
            raise ServiceError("points on a work pool need a Prefect server its workers reach "
                               "(set PREFECT_API_URL)")
        with get_client(sync_client=True) as client:
            require_pool(client, self.pool)
            deployment = adhoc_deployment(client, "compress", self.pool)
        environment = current_environment().record()
        batch_tags = [t for t in (flow_run.tags or []) if t != "quantmill"
                      and not t.startswith("batch:")] + [f"batch:{plan.name}"]
        children: dict[str, _Child] = {}
        for point in points:  # queue them all: free workers take them at once
            child = run_deployment(
                deployment, timeout=0, as_subflow=True,
                parameters={"recipe_text": point.recipe_text, "recipe_path": str(plan.path),
                            "recipe_name": point.recipe_name, "job_id": job_id,
                            "environment": environment},
                tags=[*batch_tags, f"point:{point.label}"])
            children[point.label] = _Child(point, child.id)
            print(f"{point.label}: queued on pool {self.pool} as flow run {child.id}")
        outcomes: dict[str, Outcome] = {}
        with get_client(sync_client=True) as client:
            while len(outcomes) < len(children):
                for label, child in children.items():
                    if label in outcomes:
                        continue
                    run = client.read_flow_run(child.flow_run_id)
                    if run.state is None or not run.state.is_final():
                        continue
                    if not run.state.is_completed() and child.attempts <= self.retries:
                        if run.state.is_crashed() and _age_s(run.state) < CRASH_SETTLE_S:
                            continue
                        child.attempts += 1
                        print(f"{label}: {run.state.name}, retrying it alone (attempt "
                              f"{child.attempts})")
                        client.set_flow_run_state(
                            run.id, Scheduled(name="AwaitingRetry",
                                              message="retried by its batch"), force=True)
                        continue
                    outcomes[label] = self._outcome(child, run, job_id, database_url)
                    advance(1)
                if len(outcomes) < len(children):
                    time.sleep(POLL_S)
        return outcomes

    @staticmethod
    def _outcome(child: _Child, run: Any, job_id: str, database_url: str | None) -> Outcome:
        seconds = round(run.total_run_time.total_seconds(), 3) if run.total_run_time else None
        status = "succeeded" if run.state.is_completed() else "failed"
        with Registry.open(database_url) as reg:
            run_id = point_run(reg, child.point, job_id, status)
        error = None
        if status == "failed":
            error = f"{run.state.name}: {run.state.message or 'no message'}".splitlines()[0]
            print(f"{child.point.label}: failed: {error}")
        return Outcome(status, run_id, error, seconds, str(run.id), child.attempts)


def _age_s(state: Any) -> float:
    from datetime import UTC, datetime

    return (datetime.now(UTC) - state.timestamp).total_seconds()


@task(name="point", task_run_name="point-{recipe_name}", cache_policy=NO_CACHE,
      persist_result=False)
def run_point(recipe_text: str, batch_path: str, recipe_name: str, job_id: str,
              database_url: str | None) -> dict[str, Any]:
    """One point's ``compress`` flow, on whichever Dask worker took the task."""
    from distributed import get_worker

    started = time.perf_counter()
    summary = compress(recipe_text, batch_path, recipe_name, database_url, job_id)
    return {"run_id": summary["run_id"], "flow_s": round(time.perf_counter() - started, 3),
            "where": f"dask worker {get_worker().address} (pid {os.getpid()})"}


def _dask_api_urls(client: Any) -> dict[str, str | None]:
    return client.run(lambda: os.environ.get("PREFECT_API_URL"))


def check_dask_workers(address: str) -> None:
    """Refuse a cluster whose workers report to another Prefect server (or none)."""
    from distributed import Client

    ours = configured_api_url()
    try:
        with Client(address, timeout=10) as client:
            urls = _dask_api_urls(client)
    except (OSError, TimeoutError) as exc:
        raise ServiceError(f"the Dask scheduler at {address} is unreachable ({exc})") from None
    if not urls:
        raise ServiceError(f"the Dask cluster at {address} has no workers")
    wrong = {w: u for w, u in urls.items() if (u or "").rstrip("/") != ours}
    if wrong:
        worker, url = next(iter(wrong.items()))
        raise ServiceError(f"{len(wrong)} Dask worker(s) report to another Prefect server "
                           f"(e.g. {worker}: PREFECT_API_URL={url}); start them with "
                           f"PREFECT_API_URL={ours}")


class OnDask:
    """Points as tasks of the flow's ``DaskTaskRunner`` (``dask_task_runner`` makes it)."""

    def run(self, plan: BatchPlan, points: list[PlannedPoint], job_id: str,
            database_url: str | None, advance: Callable[[int], None]) -> dict[str, Outcome]:
        futures = {p.label: run_point.submit(p.recipe_text, str(plan.path), p.recipe_name,
                                             job_id, database_url) for p in points}
        outcomes: dict[str, Outcome] = {}
        for point in points:
            try:
                done = futures[point.label].result()
            except Exception as exc:
                error = _error_line(exc)
                print(f"{point.label}: failed: {error}")
                with Registry.open(database_url) as reg:
                    run_id = point_run(reg, point, job_id, "failed")
                outcomes[point.label] = Outcome("failed", run_id, error)
            else:
                outcomes[point.label] = Outcome("succeeded", done["run_id"], None,
                                                done["flow_s"], where=done["where"])
            advance(1)
        return outcomes


def dask_task_runner(address: str | None, workers: int | None) -> Any:
    """prefect-dask's runner on an existing cluster (``address``) or a LocalCluster of
    ``workers`` single-threaded processes, after checking every worker reaches our server."""
    from prefect_dask import DaskTaskRunner

    if configured_api_url() is None:
        raise ServiceError("points on Dask need a Prefect server every Dask worker reports to "
                           "(set PREFECT_API_URL)")
    if address is not None:
        check_dask_workers(address)
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})
