"""quantmill's jobs as Prefect sees them: queue one, list, read logs, cancel, retry.

Everything here is Prefect state read or changed through its client; quantmill keeps no queue of
its own. A job is a flow run of the ``compress`` or ``tradeoff`` flow tagged ``quantmill``.

prefect 3.8.8's client sends ``null`` for a filter's unset ``limit``/``sort``/``offset`` and its
server refuses that, so every read here passes them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort, LogSort
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling, Scheduled

from quantmill.flows.deployments import FLOWS, JobFile, adhoc_deployment, require_pool
from quantmill.flows.prefect_server import SERVICE_TAG, ServiceError, check_server

PAGE = 200
STATES = {s.value.lower(): s for s in StateType}
RETRYABLE = {StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


@dataclass(frozen=True)
class Submitted:
    flow_run_id: str
    name: str
    deployment: str


def submit(job: JobFile, pool: str, *, tags: tuple[str, ...] = ()) -> Submitted:
    """Queue one run of a validated job on ``pool`` now."""
    check_server()
    with get_client(sync_client=True) as client:
        require_pool(client, pool)
        deployment = adhoc_deployment(client, job.flow_name, pool)
    run = run_deployment(deployment, parameters=job.parameters(pool), timeout=0,
                         as_subflow=False, tags=list(dict.fromkeys([*job.tags, *tags])))
    return Submitted(str(run.id), run.name, deployment)


def probe_pool(pool: str, timeout: float = 120.0) -> dict[str, Any]:
    """Send a probe job through ``pool`` and return what the worker that ran it reported."""
    import json
    import time

    from quantmill.flows.environment import current_environment
    from quantmill.flows.probe import REPORT_KEY

    check_server()
    with get_client(sync_client=True) as client:
        require_pool(client, pool)
        deployment = adhoc_deployment(client, "probe", pool)
    run = run_deployment(deployment, parameters={"label": pool, "environment":
                                                 current_environment().record()},
                         timeout=0, as_subflow=False)
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            found = client.read_flow_run(run.id)
            if found.state is not None and found.state.is_final():
                break
            if time.monotonic() > deadline:
                client.set_flow_run_state(run.id, Cancelling(message="probe timed out"))
                raise ServiceError(f"no worker of pool {pool!r} ran the probe within "
                                   f"{timeout:.0f} s (is one running? quantmill worker "
                                   f"--pool {pool})")
            time.sleep(0.5)
        if not found.state.is_completed():
            raise ServiceError(f"the probe on pool {pool!r} ended {found.state.name}: "
                               f"{found.state.message}")
        for artifact in run_artifacts(client, str(run.id)):
            if artifact.get("key") == REPORT_KEY:
                text = artifact["data"].strip().removeprefix("```json").removesuffix("```")
                return {"flow_run_id": str(run.id), **json.loads(text)}
    raise ServiceError(f"the probe {run.id} completed without its report artifact "
                       f"{REPORT_KEY!r}")


def _run_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ServiceError(f"{text!r} is not a flow run id (a UUID, as `quantmill jobs list` "
                           "prints)") from None


def read_job(client: Any, flow_run_id: str) -> Any:
    try:
        return client.read_flow_run(_run_id(flow_run_id))
    except ObjectNotFound:
        raise ServiceError(f"no flow run {flow_run_id} on the Prefect server") from None


def list_jobs(client: Any, states: list[str] | None = None, limit: int = 50) -> list[Any]:
    """quantmill's flow runs, newest first, optionally in the given states."""
    state_filter = None
    if states:
        unknown = [s for s in states if s.lower() not in STATES]
        if unknown:
            raise ServiceError(f"unknown state {unknown[0]!r} (one of: {', '.join(STATES)})")
        state_filter = FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[STATES[s.lower()] for s in states]))
    return client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))),
        flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[SERVICE_TAG]),
                                      state=state_filter),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=min(limit, PAGE), offset=0)


def job_logs(client: Any, flow_run_id: str) -> list[Any]:
    """Every log line of the flow run (its task runs' included), oldest first."""
    run = read_job(client, flow_run_id)
    lines: list[Any] = []
    while True:
        page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                                limit=PAGE, offset=len(lines), sort=LogSort.TIMESTAMP_ASC)
        lines += page
        if len(page) < PAGE:
            return lines


def run_artifacts(client: Any, flow_run_id: str) -> list[dict[str, Any]]:
    """The flow run's artifacts, newest first, as the server's JSON (a raw filter: prefect
    3.8.8's ``read_artifacts`` sends null filters the server refuses with 422)."""
    artifacts: list[dict[str, Any]] = []
    while True:
        response = client._client.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "CREATED_DESC",
            "limit": PAGE, "offset": len(artifacts)})
        response.raise_for_status()
        page = response.json()
        artifacts += page
        if len(page) < PAGE:
            return artifacts


def cancel_job(client: Any, flow_run_id: str) -> str:
    """Ask the worker to stop the run (it kills the run's processes); finished runs refuse."""
    run = read_job(client, flow_run_id)
    if run.state is not None and run.state.is_final():
        raise ServiceError(f"flow run {run.name} ({run.id}) has already finished "
                           f"({run.state.name}); there is nothing to cancel")
    result = client.set_flow_run_state(run.id, Cancelling(message="cancelled by quantmill "
                                                          "jobs cancel"))
    # a run no worker has started yet goes straight to Cancelled (the server rejects
    # "Cancelling" with that state instead)
    if result.state is None or result.state.type not in (StateType.CANCELLING,
                                                         StateType.CANCELLED):
        raise ServiceError(f"the Prefect server refused to cancel {run.id}: "
                           f"{getattr(result.details, 'reason', result.status.value)}")
    return result.state.name if result.state else "Cancelling"


def retry_job(client: Any, flow_run_id: str) -> str:
    """Schedule a failed, crashed or cancelled run again, as the UI's Retry does; any worker of
    its pool picks it up and the flow resumes from what the earlier attempt stored."""
    run = read_job(client, flow_run_id)
    if run.deployment_id is None:
        raise ServiceError(f"flow run {run.id} was not started from a deployment (quantmill "
                           "run); run the recipe again instead")
    if run.state is None or run.state.type not in RETRYABLE:
        state = run.state.name if run.state else "no state"
        raise ServiceError(f"flow run {run.name} ({run.id}) is {state}; only failed, crashed "
                           "or cancelled runs are retried")
    result = client.set_flow_run_state(
        run.id, Scheduled(name="AwaitingRetry", message="retried by quantmill jobs retry"),
        force=True)
    if result.status.value != "ACCEPT":
        raise ServiceError(f"the Prefect server refused to retry {run.id}")
    return result.state.name if result.state else "AwaitingRetry"


def duration(run: Any) -> float | None:
    if run.start_time is None:
        return None
    end = run.end_time or datetime.now(run.start_time.tzinfo)
    return (end - run.start_time).total_seconds()
