"""Service commands: deploy and submit jobs to a Prefect work pool, watch them, run a worker.

Each command checks the Prefect server first (``PREFECT_API_URL``, a clear line within seconds if
it does not answer) and validates a recipe or batch fully before anything reaches the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from quantmill.flows.cli import DatabaseOption, app, console, user_errors

deployments_app = typer.Typer(help="Deployments of recipes and batches (Prefect).",
                              no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs queued or run on work pools (Prefect flow runs).",
                       no_args_is_help=True)
app.add_typer(deployments_app, name="deployments")
app.add_typer(jobs_app, name="jobs")

PoolOption = typer.Option(..., "--pool", help="Prefect work pool.")
TeamOption = typer.Option(None, "--team", help="Team tag (team:NAME) for the UI and limits.")
TagOption = typer.Option(None, "--tag", help="Extra tag (repeatable).")


def _client() -> Any:
    from prefect.client.orchestration import get_client

    from quantmill.flows.prefect_server import check_server

    check_server()
    return get_client(sync_client=True)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


@app.command()
@user_errors
def deploy(
    path: Path = typer.Argument(..., help="Recipe or batch file (YAML)."),
    pool: str = PoolOption,
    cron: str | None = typer.Option(None, "--cron", help="Cron schedule, e.g. '0 3 * * *'."),
    interval: float | None = typer.Option(None, "--interval", help="Run every N seconds."),
    rrule: str | None = typer.Option(None, "--rrule", help="iCalendar RRULE schedule."),
    timezone: str | None = typer.Option(None, "--timezone", help="IANA time zone of the "
                                        "schedule, e.g. Europe/Berlin."),
    name: str | None = typer.Option(None, "--name", help="Deployment name (default: the "
                                    "recipe's or batch's name)."),
    team: str | None = TeamOption,
    tag: list[str] | None = TagOption,
) -> None:
    """Create or update a deployment of PATH on POOL, its content pinned, optionally scheduled."""
    from quantmill.flows.deployments import deploy as apply_deployment
    from quantmill.flows.deployments import load_job_file, make_schedule
    from quantmill.flows.prefect_server import check_server

    schedule = make_schedule(cron, interval, rrule, timezone)
    check_server()
    job = load_job_file(path, team=team, tags=tag)
    done = apply_deployment(job, pool, name=name, schedule=schedule)
    if done.created:
        change = "created"
    elif done.previous_version == done.version:
        change = f"updated (version {done.version}, content unchanged)"
    else:
        change = f"updated: version {done.previous_version} -> {done.version} (content changed)"
    console.print(f"deployment [bold]{done.full_name}[/] {change}; pool {pool}; "
                  f"{job.kind} sha256 {job.sha256[:12]}; "
                  + (f"schedule {_schedule_text(schedule)}" if schedule else "no schedule"),
                  highlight=False, soft_wrap=True)
    console.print(f"tags: {', '.join(job.tags)}", highlight=False, soft_wrap=True)


def _schedule_text(schedule: Any) -> str:
    for key in ("cron", "interval", "rrule"):
        value = getattr(schedule, key, None)
        if value:
            zone = getattr(schedule, "timezone", None)
            return f"{key} {value}" + (f" ({zone})" if zone else "")
    return str(schedule)


@app.command()
@user_errors
def submit(
    path: Path = typer.Argument(..., help="Recipe or batch file (YAML)."),
    pool: str = PoolOption,
    team: str | None = TeamOption,
    tag: list[str] | None = TagOption,
) -> None:
    """Queue one run of PATH on POOL now; prints the flow run's id and its page in the UI."""
    from quantmill.flows.deployments import load_job_file
    from quantmill.flows.jobs import submit as queue
    from quantmill.flows.prefect_server import check_server, flow_run_link

    check_server()
    job = load_job_file(path, team=team, tags=tag)
    done = queue(job, pool)
    console.print(f"queued {job.kind} [cyan]{job.name}[/] on pool {pool}: flow run "
                  f"[bold]{done.flow_run_id}[/] ({done.name})", highlight=False, soft_wrap=True)
    console.print(f"watch it: {flow_run_link(done.flow_run_id)}", highlight=False,
                  soft_wrap=True)


@deployments_app.command("list")
@user_errors
def deployments_list() -> None:
    """quantmill's deployments: name, pool, version, schedule, paused."""
    from quantmill.flows.deployments import flow_of, list_deployments

    with _client() as client:
        found = list_deployments(client)
    table = Table()
    for column in ("deployment", "pool", "version", "schedule", "paused", "tags"):
        table.add_column(column)
    for d in found:
        flow = flow_of(d)
        schedules = ", ".join(_schedule_text(s.schedule) for s in d.schedules) or "-"
        table.add_row(f"{flow}/{d.name}", d.work_pool_name or "-", d.version or "-", schedules,
                      "yes" if d.paused else "no", ", ".join(d.tags))
    console.print(table)


@deployments_app.command("show")
@user_errors
def deployments_show(name: str = typer.Argument(..., help="Deployment name or flow/name.")) \
        -> None:
    """One deployment: its pinned file's hash, environment, schedule and recent runs."""
    import json

    from quantmill.flows.deployments import read_deployment
    from quantmill.flows.jobs import PAGE

    with _client() as client:
        d = read_deployment(client, name)
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=min(10, PAGE), offset=0)
    parameters = {k: (f"<{len(v)} characters>" if k.endswith("_text") else v)
                  for k, v in (d.parameters or {}).items()}
    console.print_json(json.dumps({
        "id": str(d.id), "name": d.name, "pool": d.work_pool_name, "version": d.version,
        "description": d.description, "paused": d.paused, "tags": d.tags,
        "entrypoint": d.entrypoint,
        "schedules": [_schedule_text(s.schedule) for s in d.schedules],
        "parameters": parameters,
        "recent_runs": [{"id": str(r.id), "name": r.name, "state": r.state_name,
                         "version": r.deployment_version,
                         "expected_start": _when(r.expected_start_time)} for r in runs],
    }, default=str))


def _set_paused(name: str, paused: bool) -> None:
    from quantmill.flows.deployments import read_deployment

    with _client() as client:
        d = read_deployment(client, name)
        (client.pause_deployment if paused else client.resume_deployment)(d.id)
    console.print(f"deployment {d.name} {'paused' if paused else 'resumed'}")


@deployments_app.command("pause")
@user_errors
def deployments_pause(name: str = typer.Argument(..., help="Deployment name or flow/name.")) \
        -> None:
    """Stop a deployment's schedule from creating runs (queued runs stay)."""
    _set_paused(name, True)


@deployments_app.command("resume")
@user_errors
def deployments_resume(name: str = typer.Argument(..., help="Deployment name or flow/name.")) \
        -> None:
    """Let a paused deployment's schedule create runs again."""
    _set_paused(name, False)


@deployments_app.command("delete")
@user_errors
def deployments_delete(name: str = typer.Argument(..., help="Deployment name or flow/name.")) \
        -> None:
    """Delete a deployment and its scheduled runs (finished runs and the registry stay)."""
    from quantmill.flows.deployments import read_deployment

    with _client() as client:
        d = read_deployment(client, name)
        client.delete_deployment(d.id)
    console.print(f"deployment {d.name} deleted")


@jobs_app.command("list")
@user_errors
def jobs_list(
    state: list[str] | None = typer.Option(None, "--state", help="Only runs in this state "
                                           "(scheduled, running, completed, failed, crashed, "
                                           "cancelled...; repeatable)."),
    limit: int = typer.Option(50, min=1, max=200),
) -> None:
    """quantmill's flow runs on the Prefect server, newest first."""
    from quantmill.flows.jobs import duration, list_jobs

    with _client() as client:
        runs = list_jobs(client, state, limit)
    table = Table()
    for column in ("flow run", "name", "state", "version", "started", "seconds", "tags"):
        table.add_column(column)
    for r in runs:
        seconds = duration(r)
        table.add_row(str(r.id), r.name, r.state_name or "-", r.deployment_version or "-",
                      _when(r.start_time), f"{seconds:.0f}" if seconds is not None else "-",
                      ", ".join(t for t in r.tags if t != "quantmill"))
    console.print(table)


@jobs_app.command("show")
@user_errors
def jobs_show(
    flow_run_id: str = typer.Argument(..., help="Flow run id."),
    database_url: str | None = DatabaseOption,
) -> None:
    """One job: its Prefect state and the registry runs it recorded."""
    import json

    from quantmill.flows.jobs import duration, read_job
    from quantmill.flows.prefect_server import flow_run_link
    from quantmill.registry import Registry

    with _client() as client:
        r = read_job(client, flow_run_id)
    with Registry.open(database_url) as reg:
        recorded = reg.list_runs(job_id=str(r.id), limit=200)
    console.print_json(json.dumps({
        "id": str(r.id), "name": r.name, "state": r.state_name,
        "message": r.state.message if r.state else None,
        "deployment_version": r.deployment_version, "tags": r.tags,
        "run_count": r.run_count, "started": _when(r.start_time), "seconds": duration(r),
        "ui": flow_run_link(r.id),
        "registry_runs": [{"id": x.id, "kind": x.kind, "name": x.name, "status": x.status}
                          for x in recorded],
    }, default=str))


@jobs_app.command("logs")
@user_errors
def jobs_logs(flow_run_id: str = typer.Argument(..., help="Flow run id.")) -> None:
    """The job's log lines, as the flow run's page in the UI shows them."""
    import logging

    from quantmill.flows.jobs import job_logs

    with _client() as client:
        lines = job_logs(client, flow_run_id)
    for line in lines:
        console.print(f"{_when(line.timestamp)} {logging.getLevelName(line.level):<7} "
                      f"{line.name}: {line.message}", highlight=False, markup=False,
                      soft_wrap=True)


@jobs_app.command("cancel")
@user_errors
def jobs_cancel(flow_run_id: str = typer.Argument(..., help="Flow run id.")) -> None:
    """Cancel a queued or running job (its worker stops the run's processes)."""
    from quantmill.flows.jobs import cancel_job

    with _client() as client:
        state = cancel_job(client, flow_run_id)
    console.print(f"flow run {flow_run_id}: {state}")


@jobs_app.command("retry")
@user_errors
def jobs_retry(flow_run_id: str = typer.Argument(..., help="Flow run id.")) -> None:
    """Run a failed, crashed or cancelled job again on its pool; it resumes where it stopped."""
    from quantmill.flows.jobs import retry_job

    with _client() as client:
        state = retry_job(client, flow_run_id)
    console.print(f"flow run {flow_run_id}: {state} (any worker of its pool picks it up)")


@jobs_app.command("probe")
@user_errors
def jobs_probe(
    pool: str = PoolOption,
    timeout: float = typer.Option(120, "--timeout", min=1, help="Seconds to wait for a worker."),
) -> None:
    """Send a job that computes nothing through POOL; print what the worker that ran it sees."""
    import json

    from quantmill.flows.jobs import probe_pool

    console.print_json(json.dumps(probe_pool(pool, timeout)))


@app.command()
@user_errors
def worker(
    pool: str = PoolOption,
    limit: int | None = typer.Option(None, "--limit", min=1, help="Flow runs at a time."),
    input_root: list[str] | None = typer.Option(
        None, "--input-root", help="Directory or s3:// prefix jobs may read (repeatable; "
        "default: $QUANTMILL_INPUT_ROOTS, else $QUANTMILL_HOME/models and data)."),
    heavy_slots: int = typer.Option(1, "--heavy-slots", min=1, help="Heavy steps (quantize, "
                                    "evaluate) at a time on this host."),
    name: str | None = typer.Option(None, "--name", help="Worker name."),
    database_url: str | None = DatabaseOption,
    check_only: bool = typer.Option(False, "--check", help="Run the start-up checks and exit."),
) -> None:
    """Check the Prefect server, registry and storage, then run Prefect's process worker on
    POOL."""
    from quantmill.flows.input_roots import InputRoots
    from quantmill.flows.worker import exec_worker, plan_worker

    roots = InputRoots.parse(input_root) if input_root else InputRoots.for_service()
    plan = plan_worker(pool, limit=limit, roots=roots, database_url=database_url,
                       heavy_slots=heavy_slots, name=name)
    for line in plan.checks:
        console.print(f"[green]ok[/] {line}", highlight=False, soft_wrap=True)
    if check_only:
        return
    console.print(f"starting worker {plan.name}: {' '.join(plan.argv[1:])}", highlight=False)
    exec_worker(plan)
