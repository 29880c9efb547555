"""The ``compress`` flow: calibrate -> quantize -> evaluate -> upload -> register.

One straight line of tasks, each calling one plugin. A quantization run is opened in the registry
before the work starts and closed in a single transaction at the end; if any step fails the run is
marked failed, the staging directory is removed and no output artifact or metric is registered.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from quantmill.flows import tasks
from quantmill.flows.runtime import software_versions
from quantmill.flows.tasks import JobRef
from quantmill.plugins.manager import get_plugin_manager
from quantmill.registry import RegistryError

REPORT_KEY = re.compile(r"[^a-z0-9-]+")
log = logging.getLogger(__name__)


class Notifier:
    """Calls the notification hooks; a failing listener is logged, never fatal to the job."""

    def __init__(self) -> None:
        self.pm = get_plugin_manager()

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


def evaluation_table(evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of (evaluator, metric, base, quantized, delta) for the CLI and Prefect artifacts."""
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for ev in evaluations:
        for name, value in ev["metrics"].items():
            row = by_key.setdefault((ev["evaluator"], name),
                                    {"evaluator": ev["evaluator"], "metric": name,
                                     "base": None, "quantized": None, "delta": None})
            row[ev["target"]] = value
    for row in by_key.values():
        if row["base"] is not None and row["quantized"] is not None:
            row["delta"] = row["quantized"] - row["base"]
    return list(by_key.values())


@flow(name="compress", flow_run_name="compress-{recipe_name}", log_prints=True)
def compress(recipe_text: str, recipe_path: str, recipe_name: str,
             database_url: str | None = None, job_id: str | None = None) -> dict[str, Any]:
    """Run one recipe end to end and return a summary (ids, URIs, evaluation table)."""
    ref = JobRef(recipe_text, recipe_path, job_id or uuid.uuid4().hex, database_url)
    job = ref.job()
    notify = Notifier()
    with stage(notify, "register-inputs", None):
        inputs = tasks.register_inputs(ref)
    with stage(notify, "calibrate", None):
        calibration_id = tasks.calibrate(ref, inputs)

    input_edges = [(inputs["base_model"], "base_model")]
    if calibration_id is not None:
        input_edges.append((calibration_id, "calibration_set"))
    # evaluation data is read by the run but shapes no weight: its role says so, so lineage
    # shows an auditor every file the run touched without it passing for calibration data
    for evaluator in job.evaluators:
        for path in evaluator.data_files():
            dataset = inputs["datasets"].get(str(path))
            if dataset is not None:
                input_edges.append((dataset, "evaluation_data"))
    with ref.registry() as reg:
        run = reg.start_run(
            job_id=ref.job_id, kind="quantization", name=recipe_name, recipe=job.recipe_json(),
            plugins=job.plugin_versions, versions=software_versions(),
            flow_run_id=tasks._flow_run_id(), inputs=input_edges,
        )
    try:
        with stage(notify, "quantize", run.id):
            quantized = tasks.quantize(ref, inputs, calibration_id)
        checkpoint_dir = quantized["checkpoint_dir"]
        evaluations: list[dict[str, Any]] = []
        with stage(notify, "evaluate", run.id):
            for index in range(len(job.evaluators)):
                ev = tasks.evaluate(ref, index, inputs["base_model"], str(job.model_path),
                                    None, None, reuse=True)
                evaluations.append({**ev, "target": "base"})
            for index in range(len(job.evaluators)):
                # the model source named like the export format reads the checkpoint back
                ev = tasks.evaluate(ref, index, None, checkpoint_dir, job.exporter.format_name,
                                    checkpoint_dir, reuse=False)
                evaluations.append({**ev, "target": "quantized"})
        tasks.MODEL_CACHE.clear()
        with stage(notify, "upload", run.id):
            stored = tasks.upload(ref, checkpoint_dir)
        with stage(notify, "register", run.id):
            checkpoint_id = tasks.register(ref, run.id, stored, quantized,
                                           inputs["base_model"], evaluations,
                                           inputs["datasets"])
        tasks.clear_work_area(ref, quantized.get("work_area"))
    except BaseException as exc:
        tasks.MODEL_CACHE.clear()
        try:
            with ref.registry() as reg:
                reg.fail_run(run.id, f"{type(exc).__name__}: {exc}")
        except RegistryError:  # e.g. the run was already closed: keep the original error
            pass
        raise
    finally:
        shutil.rmtree(ref.work_dir, ignore_errors=True)

    with ref.registry() as reg:
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
        "job_id": ref.job_id,
        "run_id": run.id,
        "base_model_id": inputs["base_model"],
        "calibration_set_id": calibration_id,
        "checkpoint_id": checkpoint_id,
        "checkpoint_uri": stored["uri"],
        "checkpoint_sha256": stored["sha256"],
        "quantize_seconds": quantized["quantize_seconds"],
        "table": table,
    }


def run_recipe_file(path: Path, database_url: str | None = None) -> dict[str, Any]:
    """Validate a recipe (fast, before Prefect starts) and run it through the flow."""
    from quantmill.flows.recipe import load_job
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager

    job = load_job(path, Catalog(get_plugin_manager()))
    return compress(job.recipe_text, str(path.resolve()), job.recipe.name, database_url)
