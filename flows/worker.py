"""``quantmill worker``: check what a job will need, then become a Prefect process worker.

A worker that cannot reach the registry or the storage would take jobs and fail each one after
it had loaded the model, so before it polls the pool it checks the three things every job uses
(the Prefect server, the registry, the default storage) and refuses with one line. It then
``exec``s ``prefect worker start`` (Prefect's own worker, same pid: SIGINT stops it, as Prefect
documents), with the environment its flow runs inherit:

- ``QUANTMILL_INPUT_ROOTS``: what jobs may read (``flows/input_roots.py``);
- ``QUANTMILL_LOG_LEVEL=INFO`` and quantmill's loggers sent to the API: the run's page shows
  the job's steps and progress;
- ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``: flow-run heartbeats, which the automation installed
  here turns into a Crashed state when they stop (a killed machine), so the run can be retried;
- the heavy-step limit of this host, created with ``--heavy-slots`` slots (``flows/limits.py``);
- ``PREFECT_WORKER_QUERY_SECONDS=2``: a submitted job starts within seconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from quantmill.flows.input_roots import ROOTS_ENV, InputRoots
from quantmill.flows.limits import LIMIT_ENV, ensure_limit, heavy_limit_name, host_limit_name
from quantmill.flows.prefect_server import ServiceError, check_server
from quantmill.flows.runtime import LOG_LEVEL_ENV

HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
#: how often the worker asks the server for runs (Prefect's default is 10 s; a submitted job
#: should start within seconds, and one poll is one cheap query)
QUERY_ENV = "PREFECT_WORKER_QUERY_SECONDS"
QUERY_S = 2
HEARTBEAT_S = 30  # Prefect's minimum
#: heartbeats missed before a run is declared crashed
MISSED_HEARTBEATS = 3
ZOMBIE_AUTOMATION = "quantmill: crash flow runs whose heartbeats stopped"


@dataclass(frozen=True)
class WorkerPlan:
    pool: str
    limit: int | None
    name: str
    argv: list[str]
    env: dict[str, str]
    checks: list[str]


def install_zombie_automation(heartbeat_s: int) -> bool:
    """The documented Prefect automation: a flow run whose heartbeats stop (its machine or its
    process was killed) is set Crashed. Returns whether it was created now."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(ZOMBIE_AUTOMATION):
            return False
    Automation(
        name=ZOMBIE_AUTOMATION,
        description="Installed by quantmill worker: marks flow runs crashed after "
                    f"{MISSED_HEARTBEATS} missed heartbeats so they can be retried.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS * heartbeat_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message="crashed: its heartbeats stopped (the worker's "
                                            "machine or process was killed)")],
    ).create()
    return True


def _ensure_pool(pool: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=pool, type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template()))
            except ObjectAlreadyExists:
                return f"work pool {pool} (process)"
            return f"work pool {pool} created (process)"
    if found.type != "process":
        raise ServiceError(f"work pool {pool!r} is a {found.type} pool; quantmill worker runs "
                           "process pools (start Prefect's own worker for other types, see "
                           "the README)")
    return f"work pool {pool} (process)"


def _check_registry(database_url: str | None) -> str:
    from quantmill.registry import Registry

    try:
        with Registry.open(database_url) as reg:
            reg.list_runs(limit=1)
            url = reg.url
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ServiceError(f"this worker cannot use the registry: {first}") from None
    return f"registry {url}"


def _check_storage() -> str:
    from quantmill.flows.recipe import default_storage
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.errors import QuantmillError
    from quantmill.plugins.manager import get_plugin_manager

    try:
        storage = default_storage(Catalog(get_plugin_manager()))
        storage.check()
    except QuantmillError as exc:
        raise ServiceError(f"this worker cannot use the storage: {exc}") from None
    return f"storage {storage.name}"


def plan_worker(pool: str, *, limit: int | None, roots: InputRoots,
                database_url: str | None, heavy_slots: int, name: str | None = None
                ) -> WorkerPlan:
    """Run the start-up checks and say how the worker will be started (nothing started)."""
    checks = [f"Prefect server {check_server()}", _ensure_pool(pool),
              _check_registry(database_url), _check_storage()]
    env = {ROOTS_ENV: roots.to_env(), LOG_LEVEL_ENV: os.environ.get(LOG_LEVEL_ENV, "INFO"),
           HEARTBEAT_ENV: os.environ.get(HEARTBEAT_ENV, str(HEARTBEAT_S)),
           QUERY_ENV: os.environ.get(QUERY_ENV, str(QUERY_S))}
    if database_url:
        env["QUANTMILL_DATABASE_URL"] = database_url
    heartbeat = int(float(env[HEARTBEAT_ENV]))
    if install_zombie_automation(heartbeat):
        checks.append("installed the crashed-run automation")
    os.environ.setdefault(LIMIT_ENV, "host")
    limit_name = heavy_limit_name()
    if limit_name is not None:
        ensure_limit(limit_name, heavy_slots, overwrite=limit_name == host_limit_name())
        checks.append(f"heavy steps take a slot of the limit {limit_name}")
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    name = name or f"quantmill-{socket.gethostname()}-{os.getpid()}"
    argv = [prefect, "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    if limit is not None:
        argv += ["--limit", str(limit)]
    checks.append(f"input roots: {roots.describe()}")
    return WorkerPlan(pool, limit, name, argv, env, checks)


def exec_worker(plan: WorkerPlan) -> None:  # pragma: no cover - replaces the process
    os.environ.update(plan.env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(plan.argv[0], plan.argv)
