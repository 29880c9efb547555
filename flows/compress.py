"""The ``compress`` flow: inputs -> calibrate -> measure base -> plan -> quantize -> measure
checkpoint -> publish -> register.

One straight line of tasks, each calling one step of ``flows/tasks.py`` with the run's context
(``flows/context.py``). A quantization run is opened in the registry once the base model is
measured and closed in one transaction at the end; if any step fails the run is marked failed
and no output artifact or metric is registered. What a rerun of an interrupted job skips is
listed in ``flows/tasks.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, tags
from prefect.artifacts import create_table_artifact

from quantmill.flows import tasks
from quantmill.flows.context import JobRef, RunContext
from quantmill.flows.environment import check_skew, current_environment, software_versions
from quantmill.flows.heartbeat import Heartbeat
from quantmill.flows.limits import heavy_slot
from quantmill.flows.prefect_progress import PrefectProgressSink
from quantmill.flows.prefect_server import SERVICE_TAG, configured_api_url
from quantmill.flows.recipe import Job
from quantmill.flows.results import Calibration, Evaluation, Inputs
from quantmill.plugins.progress import current_sink, use_sink
from quantmill.registry import RegistryError

REPORT_KEY = re.compile(r"[^a-z0-9-]+")
log = logging.getLogger(__name__)


class Notifier:
    """Calls the notification hooks; a failing listener is logged, never fatal to the job."""

    def __init__(self, ctx: RunContext) -> None:
        self.pm = ctx.catalog.pm

    def __call__(self, hook: str, **kwargs: Any) -> None:
        try:
            getattr(self.pm.hook, hook)(**kwargs)
        except Exception as exc:  # listeners must not break an audited job
            log.warning("a %s listener failed: %s", hook, exc)


@contextlib.contextmanager
def stage(notify: Notifier, name: str, run_id: int | None) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        notify("stage_finished", stage=name, run_id=run_id,
               seconds=time.perf_counter() - started, status="failed")
        raise
    notify("stage_finished", stage=name, run_id=run_id, seconds=time.perf_counter() - started,
           status="succeeded")


def evaluation_table(evaluations: list[Evaluation]) -> list[dict[str, Any]]:
    """Rows of (evaluator, metric, base, quantized, delta) for the CLI and Prefect artifacts."""
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for ev in evaluations:
        for name, value in ev.metrics.items():
            row = by_key.setdefault((ev.evaluator, name),
                                    {"evaluator": ev.evaluator, "metric": name,
                                     "base": None, "quantized": None, "delta": None})
            row[ev.target] = value
    for row in by_key.values():
        if row["base"] is not None and row["quantized"] is not None:
            row["delta"] = row["quantized"] - row["base"]
    return list(by_key.values())


def _input_edges(job: Job, inputs: Inputs,
                 calibration: Calibration | None) -> list[tuple[int, str]]:
    edges = [(inputs.base_model_id, "base_model")]
    if calibration is not None:
        edges.append((calibration.artifact_id, "calibration_set"))
    # evaluation data is read by the run but shapes no weight: its role says so, so lineage
    # shows an auditor every file the run touched without it passing for calibration data
    for evaluator in job.evaluators:
        for path in evaluator.data_files():
            dataset = inputs.datasets.get(str(path))
            if dataset is not None:
                edges.append((dataset, "evaluation_data"))
    return edges


@contextlib.contextmanager
def flow_run_scope(environment: dict[str, Any] | None) -> Iterator[None]:
    """What every quantmill flow run does first: compare the software with the deployer's
    (``environment``, pinned by ``quantmill deploy``), give its task runs the run's tags (for
    Prefect's tag concurrency limits: task runs do not inherit them), and, on a Prefect server
    (not the embedded temporary one, whose UI nobody watches), show plugin progress in the
    run's logs and artifacts when no other display (the CLI's bars) is installed."""
    from prefect.runtime import deployment, flow_run

    check_skew(environment, f"deployment {deployment.name or '(none)'}")
    here = current_environment()
    # the first line of the run's page: which machine and software this attempt ran on
    log.info("running on %s (pid %d): environment %s, lock %s, source %s",
             socket.gethostname(), os.getpid(), here.sha256[:12],
             (here.lock_sha256 or "none")[:12], here.source_commit or "unknown")
    with contextlib.ExitStack() as stack:
        stack.enter_context(tags(SERVICE_TAG, *(flow_run.tags or [])))
        if current_sink() is None and configured_api_url() is not None:
            stack.enter_context(use_sink(PrefectProgressSink()))
        yield


@flow(name="compress", flow_run_name="compress-{recipe_name}", log_prints=True)
def compress(recipe_text: str, recipe_path: str, recipe_name: str,
             database_url: str | None = None, job_id: str | None = None,
             environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one recipe end to end and return a summary (ids, URIs, evaluation table).

    ``job_id`` defaults to the flow run's id (so a retried flow run stays one job);
    ``environment`` is the deployer's software record, compared with this machine's.
    """
    with flow_run_scope(environment):
        ctx = RunContext.of(JobRef(recipe_text, recipe_path,
                                   job_id or tasks.flow_run_id() or uuid.uuid4().hex,
                                   database_url))
        try:
            with Heartbeat(ctx.registry):
                return _compress(ctx, recipe_name)
        finally:
            ctx.close()
            shutil.rmtree(ctx.work_dir, ignore_errors=True)


def _compress(ctx: RunContext, recipe_name: str) -> dict[str, Any]:
    job, reg = ctx.job, ctx.registry
    notify = Notifier(ctx)
    evaluators = range(len(job.evaluators))
    for run, reason in reg.reap():  # e.g. this job's own earlier attempt, killed
        log.warning("run %s (%s) closed as abandoned: %s", run.id, run.name, reason)
    with stage(notify, "register-inputs", None):
        inputs = tasks.register_inputs(ctx)
    with stage(notify, "calibrate", None):
        calibration = tasks.calibrate(ctx, inputs)
    with stage(notify, "evaluate-base", None):
        evaluations = []
        for index in evaluators:
            with heavy_slot("evaluate-base"):
                evaluations.append(tasks.evaluate_base(ctx, inputs, index))
    run = reg.start_run(
        job_id=ctx.job_id, kind="quantization", name=recipe_name, recipe=job.recipe_json(),
        plugins=job.plugin_versions, versions=software_versions(),
        flow_run_id=tasks.flow_run_id(), inputs=_input_edges(job, inputs, calibration),
    )
    try:
        with stage(notify, "plan", run.id):
            plan = tasks.plan(ctx, calibration)
        with stage(notify, "quantize", run.id), heavy_slot("quantize"):
            quantized = tasks.quantize(ctx, inputs, calibration, plan)
        with stage(notify, "evaluate", run.id):
            for index in evaluators:
                with heavy_slot("evaluate"):
                    evaluations.append(tasks.evaluate_checkpoint(ctx, quantized, index))
        ctx.models.clear()
        with stage(notify, "publish", run.id):
            published = tasks.publish(ctx, quantized)
        with stage(notify, "register", run.id):
            checkpoint_id = tasks.register(ctx, run.id, inputs, plan, quantized, evaluations,
                                           published)
        tasks.clear_work_area(ctx, quantized.work_key)
    except BaseException as exc:
        ctx.models.clear()
        try:
            reg.fail_run(run.id, f"{type(exc).__name__}: {exc}")
        except RegistryError:  # e.g. the run was already closed: keep the original error
            pass
        raise

    notify("artifact_recorded", artifact=reg.get_artifact(checkpoint_id).to_json(),
           run_id=run.id)
    table = evaluation_table(evaluations)
    create_table_artifact(
        key=REPORT_KEY.sub("-", f"compress-{recipe_name}".lower()).strip("-")[:100],
        table=table,
        description=f"Evaluation of {recipe_name}: base model vs quantized checkpoint "
                    f"(artifact {checkpoint_id}, run {run.id})",
    )
    return {
        "job_id": ctx.job_id,
        "run_id": run.id,
        "base_model_id": inputs.base_model_id,
        "calibration_set_id": calibration.artifact_id if calibration else None,
        "checkpoint_id": checkpoint_id,
        "checkpoint_uri": quantized.checkpoint.uri,
        "checkpoint_sha256": quantized.checkpoint.sha256,
        "quantize_seconds": quantized.quantize_seconds,
        "resumed_at_block": quantized.resumed_at_block,
        "table": table,
    }


def run_job(job: Job, recipe_path: Path, database_url: str | None = None) -> dict[str, Any]:
    """Run an already validated job through the flow (its resolved plugins are reused)."""
    ref = JobRef(job.recipe_text, str(recipe_path.resolve()), uuid.uuid4().hex, database_url)
    RunContext.of(ref, job)
    with tags(SERVICE_TAG):
        return compress(ref.recipe_text, ref.recipe_path, job.recipe.name, database_url,
                        ref.job_id)


def run_recipe_file(path: Path, database_url: str | None = None) -> dict[str, Any]:
    """Validate a recipe (fast, before Prefect starts) and run it through the flow."""
    from quantmill.flows.recipe import load_job
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager

    return run_job(load_job(path, Catalog(get_plugin_manager())), path, database_url)
