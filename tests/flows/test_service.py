"""Deployments, submitted jobs and workers against a real Prefect server on loopback.

The quick tests need only the server (deploy, list, pause, cancel, retry, bad input); the slow
ones start real workers (``quantmill worker``, Prefect's process worker) that run real jobs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from prefect.states import Cancelled
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.flows.input_roots import ROOTS_ENV
from quantmill.flows.worker import ZOMBIE_AUTOMATION

runner = CliRunner()


def _cli(*args: str):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr.strip()


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _pool(name: str) -> str:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with _client() as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            pass
    return name


def _deployments() -> list:
    from quantmill.flows.deployments import list_deployments

    with _client() as client:
        return list_deployments(client)


@pytest.fixture()
def roots(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, wikitext_dir: Path) -> str:
    value = f"{tiny_model_dir},{wikitext_dir}"
    monkeypatch.setenv(ROOTS_ENV, value)
    return value


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


@pytest.mark.parametrize("command", [["submit", "RECIPE", "--pool", "p"],
                                     ["deploy", "RECIPE", "--pool", "p"], ["jobs", "list"],
                                     ["worker", "--pool", "p", "--check"]])
def test_an_unreachable_server_is_refused_within_seconds(command, monkeypatch, tiny_recipe,
                                                         roots):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{_closed_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    args = [str(tiny_recipe()) if a == "RECIPE" else a for a in command]
    started = time.monotonic()
    with temporary_settings(updates={PREFECT_API_URL: url}):
        code, _, err = _cli(*args)
    assert code == 2 and time.monotonic() - started < 10
    assert err == f"error: the Prefect server at {url} is unreachable (ConnectError: " \
                  f"{err.split('ConnectError: ', 1)[1]}" and len(err.splitlines()) == 1


def test_no_server_configured_is_one_line(monkeypatch, tiny_recipe, roots):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        code, _, err = _cli("submit", str(tiny_recipe()), "--pool", "p")
    assert code == 2 and "no Prefect server configured: set PREFECT_API_URL" in err


def test_bad_input_is_refused_at_deploy_and_submit_time(prefect_api, tiny_recipe, roots,
                                                        tmp_path: Path):
    pool = _pool("bad-input")
    before = {d.name for d in _deployments()}
    invalid = tiny_recipe("invalid.yaml", quantization={"method": "rtn", "bits": 99})
    outside = tiny_recipe("outside.yaml", calibration={"path": "/etc/passwd"})
    batch = tmp_path / "batch.yaml"
    batch.write_text(yaml.safe_dump({
        "name": "b", "base": {k: v for k, v in yaml.safe_load(tiny_recipe().read_text()).items()
                              if k not in ("name", "quantization")},
        "points": [{"label": "good", "quantization": {"method": "rtn", "bits": 4}},
                   {"label": "broken", "quantization": {"method": "nope"}}]}))
    cases = [
        (["deploy", str(invalid), "--pool", pool], "bits"),
        (["submit", str(invalid), "--pool", pool], "bits"),
        (["submit", str(outside), "--pool", pool], "'calibration': /etc/passwd is outside the "
                                                   "input roots"),
        (["deploy", str(batch), "--pool", pool], "batch point 'broken'"),
        (["deploy", str(tiny_recipe()), "--pool", "no-such-pool"],
         "work pool 'no-such-pool' does not exist"),
        (["submit", str(tiny_recipe()), "--pool", "no-such-pool"],
         "work pool 'no-such-pool' does not exist"),
        (["deploy", str(tiny_recipe()), "--pool", pool, "--cron", "61 3 * * *"],
         "invalid --cron: Invalid cron string"),
        (["deploy", str(tiny_recipe()), "--pool", pool, "--cron", "0 3 * * *",
          "--timezone", "Mars/Base"], "Invalid timezone"),
        (["deploy", str(tiny_recipe()), "--pool", pool, "--cron", "0 3 * * *",
          "--interval", "60"], "give one schedule"),
        (["deploy", str(tiny_recipe()), "--pool", pool, "--rrule", "FREQ=SOMETIMES"],
         "invalid --rrule"),
    ]
    for args, message in cases:
        code, _, err = _cli(*args)
        assert code == 2, (args, err)
        assert message in err and len(err.splitlines()) == 1, (args, err)
    assert {d.name for d in _deployments()} == before  # nothing half-created
    from quantmill.flows.jobs import list_jobs

    with _client() as client:
        assert [r for r in list_jobs(client) if r.name.startswith("compress-tiny")] == []


def test_deploy_pins_the_content_and_a_changed_file_is_a_new_version(prefect_api, tiny_recipe,
                                                                      roots):
    pool = _pool("pinning")
    recipe = tiny_recipe("nightly.yaml")
    code, out, err = _cli("deploy", str(recipe), "--pool", pool, "--cron", "0 3 * * *",
                          "--timezone", "Europe/Berlin", "--team", "nlp", "--name",
                          "tiny-nightly")
    assert code == 0, err
    assert "deployment compress/tiny-nightly created" in out
    from quantmill.flows.deployments import read_deployment

    with _client() as client:
        first = read_deployment(client, "tiny-nightly")
    text = recipe.read_text()
    assert first.parameters["recipe_text"] == text
    assert "environment_sha256" in first.parameters["environment"]
    assert first.work_pool_name == pool and first.paused is False
    assert {"quantmill", "method:rtn", "team:nlp"} <= set(first.tags)
    assert first.schedules[0].schedule.cron == "0 3 * * *"
    assert first.schedules[0].schedule.timezone == "Europe/Berlin"
    import hashlib

    assert first.version == hashlib.sha256(text.encode()).hexdigest()[:12]

    # editing the file changes nothing deployed until it is deployed again, as a new version
    recipe.write_text(text.replace("num_samples: 4", "num_samples: 5"))
    with _client() as client:
        assert read_deployment(client, "tiny-nightly").parameters["recipe_text"] == text
    assert _cli("deployments", "pause", "tiny-nightly")[0] == 0
    code, out, _ = _cli("deploy", str(recipe), "--pool", pool, "--cron", "0 3 * * *",
                        "--name", "tiny-nightly")
    assert code == 0 and f"version {first.version} -> " in out and "content changed" in out
    with _client() as client:
        second = read_deployment(client, "tiny-nightly")
    assert second.id == first.id and second.version != first.version
    assert "num_samples: 5" in second.parameters["recipe_text"]
    assert second.paused is True  # a redeploy keeps a paused schedule paused
    assert _cli("deployments", "resume", "tiny-nightly")[0] == 0

    code, out, _ = _cli("deployments", "list")
    assert code == 0 and "compress/tiny-nightly" in out and second.version in out
    code, out, _ = _cli("deployments", "show", "tiny-nightly")
    assert code == 0 and '"recipe_text": "<' in out and "cron 0 3 * * *" in out
    assert _cli("deployments", "delete", "tiny-nightly")[0] == 0
    code, _, err = _cli("deployments", "show", "tiny-nightly")
    assert code == 2 and "no deployment named 'tiny-nightly'" in err


def test_submitted_jobs_are_listed_cancelled_and_retried(prefect_api, tiny_recipe, roots,
                                                         monkeypatch):
    # a registry URL with a password in the submitter's environment must not travel
    monkeypatch.setenv("QUANTMILL_DATABASE_URL", "postgresql+psycopg://u:s3cret@127.0.0.1/x")
    pool = _pool("queue-only")  # no worker: the run waits in the queue
    code, out, err = _cli("submit", str(tiny_recipe()), "--pool", pool, "--tag", "urgent")
    assert code == 0, err
    flow_run_id = out.split("flow run ", 1)[1].split()[0]
    assert f"/runs/flow-run/{flow_run_id}" in out
    from quantmill.flows.jobs import read_job

    with _client() as client:
        run = read_job(client, flow_run_id)
    assert run.state.is_scheduled() and {"quantmill", "urgent", "method:rtn"} <= set(run.tags)
    assert "s3cret" not in str(run.parameters) and "database_url" not in run.parameters
    assert run.parameters["recipe_text"] == tiny_recipe().read_text()
    monkeypatch.delenv("QUANTMILL_DATABASE_URL")

    code, out, _ = _cli("jobs", "list", "--state", "scheduled")
    assert code == 0 and flow_run_id in out
    assert _cli("jobs", "list", "--state", "sleeping")[2].startswith("error: unknown state")
    code, out, _ = _cli("jobs", "show", flow_run_id)
    assert code == 0 and '"state": "Scheduled"' in out

    code, out, err = _cli("jobs", "retry", flow_run_id)
    assert code == 2 and "only failed, crashed or cancelled runs are retried" in err
    code, out, err = _cli("jobs", "cancel", flow_run_id)
    assert code == 0, err
    with _client() as client:
        assert read_job(client, flow_run_id).state.is_cancelled()
    code, _, err = _cli("jobs", "cancel", flow_run_id)
    assert code == 2 and "has already finished (Cancelled); there is nothing to cancel" in err
    code, out, err = _cli("jobs", "retry", flow_run_id)
    assert code == 0 and "AwaitingRetry" in out, err
    with _client() as client:
        assert read_job(client, flow_run_id).state.is_scheduled()
        client.set_flow_run_state(run.id, Cancelled(), force=True)  # nothing left queued
    code, _, err = _cli("jobs", "show", "not-a-uuid")
    assert code == 2 and "is not a flow run id" in err


def test_a_worker_refuses_to_start_without_its_registry_or_storage(prefect_api, monkeypatch,
                                                                   tmp_path: Path):
    code, _, err = _cli("worker", "--pool", "refusals", "--check", "--database-url",
                        "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert code == 2 and err.startswith("error: this worker cannot use the registry")
    assert len(err.splitlines()) == 1
    monkeypatch.setenv("QUANTMILL_STORAGE_URL", "s3://")
    code, _, err = _cli("worker", "--pool", "refusals", "--check")
    assert code == 2 and err.startswith("error: this worker cannot use the storage"), err


def test_a_worker_check_reports_what_it_will_use(prefect_api, quantmill_home, tmp_path: Path):
    code, out, err = _cli("worker", "--pool", "checked", "--check", "--input-root",
                          str(tmp_path), "--heavy-slots", "2")
    assert code == 0, err
    assert "work pool checked" in out and "registry sqlite" in out and "storage local" in out
    assert f"input roots: {tmp_path}" in out
    from quantmill.flows.limits import host_limit_name

    with _client() as client:
        limit = client.read_global_concurrency_limit_by_name(host_limit_name())
        assert limit.limit == 2
        assert client.read_automations_by_name(ZOMBIE_AUTOMATION)


def _wait(flow_run_id, timeout: float = 600, until=lambda run: run.state.is_final()):
    from quantmill.flows.jobs import read_job

    deadline = time.monotonic() + timeout
    with _client() as client:
        while True:
            run = read_job(client, str(flow_run_id))
            if until(run) or time.monotonic() > deadline:
                return run
            time.sleep(1)


@pytest.fixture()
def start_worker(prefect_api, prefect_service, quantmill_home: Path, roots: str,
                 tmp_path: Path):
    """``start_worker(pool, *args) -> Worker``: real ``quantmill worker`` processes sharing this
    test's registry and storage (``QUANTMILL_HOME``); all stopped at the end."""
    started = []

    def start(pool: str, *args: str, env: dict[str, str] | None = None):
        env = {**prefect_api.env(), "QUANTMILL_HOME": str(quantmill_home), ROOTS_ENV: roots,
               **(env or {})}
        worker = prefect_service.Worker(tmp_path / f"worker-{len(started)}.log", pool, env,
                                args).start()
        started.append(worker)
        worker.wait_started()
        return worker

    yield start
    for worker in started:
        worker.stop()


def _artifacts(flow_run_id) -> list[dict]:
    from quantmill.flows.jobs import run_artifacts

    with _client() as client:
        return run_artifacts(client, str(flow_run_id))


def _logs_until(flow_run_id, wanted, timeout: float = 60) -> list[tuple[str, str]]:
    """The run's (logger, message) pairs once ``wanted(pairs)`` holds (log lines reach the
    server in batches) or the timeout passes."""
    from quantmill.flows.jobs import job_logs

    deadline = time.monotonic() + timeout
    while True:
        with _client() as client:
            pairs = [(line.name, line.message) for line in job_logs(client, flow_run_id)]
        if wanted(pairs) or time.monotonic() > deadline:
            return pairs
        time.sleep(1)


@pytest.mark.slow
def test_a_worker_runs_scheduled_and_submitted_jobs_with_logs_and_artifacts(
        start_worker, tiny_recipe, quantmill_home: Path, roots: str):
    from quantmill.registry import Registry

    pool = _pool("end-to-end")
    worker = start_worker(pool, "--limit", "1")
    code, out, err = _cli("jobs", "probe", "--pool", pool)  # the whole path, no computation
    assert code == 0, err
    assert '"environment_skew": []' in out and f'"input_roots": "{roots.replace(",", ", ")}"' \
        in out and '"heavy_limit": "quantmill-heavy-' in out
    code, out, err = _cli("deploy", str(tiny_recipe("every.yaml")), "--pool", pool,
                          "--interval", "20", "--name", "tiny-every-20s")
    assert code == 0, err
    code, out, err = _cli("submit", str(tiny_recipe()), "--pool", pool)
    assert code == 0, err
    submitted = out.split("flow run ", 1)[1].split()[0]

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    from quantmill.flows.deployments import read_deployment

    deadline = time.monotonic() + 60
    with _client() as client:
        deployment = read_deployment(client, "tiny-every-20s")
        while True:  # the server's scheduler turns the schedule into runs
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=5, offset=0)
            if scheduled or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert scheduled, "the interval schedule produced no run"
    first = scheduled[0]
    for flow_run_id in (submitted, first.id):
        run = _wait(flow_run_id)
        assert run.state.is_completed(), (run.state, worker.log()[-4000:])
    assert _wait(first.id).deployment_version == deployment.version

    with Registry.open() as reg:
        recorded = reg.list_runs(job_id=submitted, kind="quantization")
    assert [r.status for r in recorded] == ["succeeded"]
    assert recorded[0].flow_run_id == submitted
    def quantmill_line(pairs: list[tuple[str, str]]) -> bool:
        return any(name == "quantmill.flows.compress" and message.startswith("running on ")
                   for name, message in pairs)

    def complete(pairs: list[tuple[str, str]]) -> bool:
        return quantmill_line(pairs) and \
            any("quantize" in message and "done" in message for _, message in pairs)

    messages = _logs_until(submitted, complete)
    assert quantmill_line(messages), messages[:20]
    assert any("quantize" in message and "done" in message for _, message in messages), \
        [m for m in messages if not m[0].startswith("prefect.task_runs")]
    kinds = {(a["type"], a["key"]) for a in _artifacts(submitted)}
    assert ("table", "compress-tiny-rtn") in kinds
    assert any(kind == "progress" for kind, _ in kinds), kinds
    assert _cli("deployments", "delete", "tiny-every-20s")[0] == 0


def _tiny_batch(tiny_recipe, path: Path, name: str = "tiny-batch") -> Path:
    base = {k: v for k, v in yaml.safe_load(tiny_recipe().read_text()).items()
            if k not in ("name", "quantization")}
    path.write_text(yaml.safe_dump({
        "name": name, "base": base,
        "matrix": {"bits": [2, 3, 4], "methods": {"gptq": {"quantization": {"group_size": 32}}}},
        "points": [{"label": "rtn-w4", "quantization": {"method": "rtn", "bits": 4,
                                                        "group_size": 32}}]}))
    return path


def _worker_of(workers, flow_run_id) -> str | None:
    """The worker that submitted the run, from the line Prefect's worker prints when it does
    (its own console output: the copy it also sends to the server is batched and may lag)."""
    line = f"submitting flow run '{flow_run_id}'"
    for worker in workers:
        for text in worker.log().splitlines():
            if line in text and "Worker '" in text:
                return text.split("Worker '", 1)[1].split("'", 1)[0]
    return None


def _children(batch_name: str) -> list:
    """The flow runs of a batch's points (tagged ``batch:<name>``)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"batch:{batch_name}"])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200, offset=0)


@pytest.mark.slow
def test_two_workers_share_a_batch_and_a_crashed_point_is_retried_alone(
        start_worker, tiny_recipe, quantmill_home: Path, tmp_path: Path):
    import json

    pool = _pool("shared")
    # worker-a's runs die right after their first block, as if its machine went down; a
    # retried point resumes at block 1 (the failpoint no longer fires) wherever it lands
    workers = [start_worker(pool, "--limit", "1", "--name", "worker-a",
                            env={"QUANTMILL_FAILPOINT": "kill-after-block:0"}),
               start_worker(pool, "--limit", "1", "--name", "worker-b")]
    batch = _tiny_batch(tiny_recipe, tmp_path / "batch.yaml", name="shared-batch")
    code, out, err = _cli("tradeoff", str(batch), "--pool", pool, "--point-retries", "2",
                          "--out", str(tmp_path / "r"))
    assert code == 0, (err, out)
    report = json.loads((tmp_path / "r" / "tradeoff.json").read_text())
    assert [p["status"] for p in report["points"]] == ["succeeded"] * 4
    assert all(p["perplexity"] for p in report["points"])
    children = _children("shared-batch")
    assert len(children) == 4 and all(c.state.is_completed() for c in children)
    assert {_worker_of(workers, c.id) for c in children} == {"worker-a", "worker-b"}
    retried = [c for c in children if c.run_count > 1]
    assert retried, "no point crashed on worker-a"
    assert all(c.run_count == 1 for c in children if c not in retried)  # the others: once


@pytest.mark.slow
def test_a_killed_worker_leaves_its_run_crashed_and_a_retry_elsewhere_resumes(
        start_worker, tiny_recipe, quantmill_home: Path):
    from quantmill.registry import Registry

    pool = _pool("crash")
    lost = start_worker(pool, "--limit", "1", "--name", "worker-lost",
                        env={"QUANTMILL_FAILPOINT": "hang-after-block:0"})
    recipe = tiny_recipe("gptq.yaml", quantization={"method": "gptq", "bits": 4,
                                                    "group_size": 32})
    code, out, err = _cli("submit", str(recipe), "--pool", pool)
    assert code == 0, err
    flow_run_id = out.split("flow run ", 1)[1].split()[0]

    def quantizing() -> list:
        with Registry.open() as reg:
            return reg.list_runs(job_id=flow_run_id, kind="quantization")

    deadline = time.monotonic() + 300
    while not quantizing() and time.monotonic() < deadline:
        time.sleep(1)
    assert [r.status for r in quantizing()] == ["running"], lost.log()[-3000:]
    time.sleep(5)  # block 0 of the tiny model is recorded within a second; then it hangs
    lost.kill()  # the worker and its flow-run process, as a machine going down

    # Prefect's automation turns the missing heartbeats into Crashed
    run = _wait(flow_run_id, timeout=300, until=lambda r: r.state.is_final())
    assert run.state.is_crashed(), run.state
    start_worker(pool, "--limit", "1", "--name", "worker-spare")
    code, out, err = _cli("jobs", "retry", flow_run_id)
    assert code == 0, err
    run = _wait(flow_run_id, timeout=300, until=lambda r: r.state.is_completed()
                or (r.state.is_final() and r.run_count > 1))
    assert run.state.is_completed(), run.state
    runs = {r.status: r for r in quantizing()}
    assert set(runs) == {"abandoned", "succeeded"}, runs
    assert runs["succeeded"].details["resumed_at_block"] == 1


def test_a_dask_cluster_reporting_to_another_server_is_refused(prefect_api, monkeypatch):
    from distributed import LocalCluster

    from quantmill.flows.fanout import check_dask_workers
    from quantmill.flows.prefect_server import ServiceError

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # what the workers inherit
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        with pytest.raises(ServiceError, match=r"1 Dask worker\(s\) report to another Prefect "
                                               r"server .*PREFECT_API_URL=http://127.0.0.1:9/api"):
            check_dask_workers(cluster.scheduler_address)
    with pytest.raises(ServiceError, match="is unreachable"):
        check_dask_workers(f"tcp://127.0.0.1:{_closed_port()}")


@pytest.mark.slow
def test_a_batch_runs_its_points_on_a_local_dask_cluster(prefect_api, tiny_recipe, roots,
                                                         quantmill_home: Path, tmp_path: Path):
    import json

    batch = _tiny_batch(tiny_recipe, tmp_path / "batch.yaml", name="dask-batch")
    code, out, err = _cli("tradeoff", str(batch), "--dask-workers", "2", "--out",
                          str(tmp_path / "r"))
    assert code == 0, (err, out)
    report = json.loads((tmp_path / "r" / "tradeoff.json").read_text())
    assert [p["status"] for p in report["points"]] == ["succeeded"] * 4
    assert all(p["perplexity"] for p in report["points"])
    places = {p["where"] for p in report["points"]}
    assert len(places) == 2 and all(w.startswith("dask worker tcp://127.0.0.1:") for w in places)
    from quantmill.flows.jobs import list_jobs  # every point's flow run is on our one server

    with _client() as client:
        names = [r.name for r in list_jobs(client, ["completed"], limit=200)
                 if r.name.startswith("compress-dask-batch-")]
    assert sorted(names) == sorted(f"compress-{p['recipe_name']}" for p in report["points"])


@pytest.fixture()
def pg_databases():
    """``make() -> name``: empty PostgreSQL databases on the local server, dropped afterwards."""
    import uuid

    import psycopg

    admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres "
                            "connect_timeout=5", autocommit=True)
    names: list[str] = []

    def make() -> str:
        names.append(f"qm_service_{uuid.uuid4().hex[:10]}")
        admin.execute(f'CREATE DATABASE "{names[-1]}"')
        return names[-1]

    yield make
    for name in names:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.mark.slow
def test_server_and_registry_on_postgresql(prefect_service, pg_databases, tiny_recipe, roots,
                                           tmp_path: Path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from quantmill.registry import Registry

    server = prefect_service.PrefectServer(
        tmp_path / "prefect-pg", f"postgresql+asyncpg://postgres@127.0.0.1:5432/{pg_databases()}")
    registry_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{pg_databases()}"
    server.start()
    worker = None
    try:
        monkeypatch.setenv("PREFECT_API_URL", server.api_url)
        monkeypatch.setenv("QUANTMILL_DATABASE_URL", registry_url)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            assert _cli("registry", "upgrade")[0] == 0
            pool = _pool("on-postgres")
            worker = prefect_service.Worker(
                tmp_path / "worker.log", pool,
                {**server.env(), "QUANTMILL_HOME": str(tmp_path / "home"), ROOTS_ENV: roots,
                 "QUANTMILL_DATABASE_URL": registry_url}, ("--limit", "1")).start()
            worker.wait_started()
            code, out, err = _cli("submit", str(tiny_recipe()), "--pool", pool)
            assert code == 0, err
            flow_run_id = out.split("flow run ", 1)[1].split()[0]
            run = _wait(flow_run_id)
            assert run.state.is_completed(), (run.state, worker.log()[-3000:])
            with Registry.open(registry_url) as reg:
                assert [r.status for r in reg.list_runs(job_id=flow_run_id,
                                                        kind="quantization")] == ["succeeded"]
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
