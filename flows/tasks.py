"""The compress flow's steps: each calls one plugin (or the registry) with the run's context and
returns a frozen record of what it stored (``flows/results.py``), never tensors or scratch paths.

The step bodies are plain functions (``*_step``) so they can be unit-tested without a Prefect
server; the ``@task`` objects at the bottom wrap them with names and retries.

What a rerun of an interrupted job skips, and where that is recorded:

- the base model, data files and calibration set: the registry (content hashes; a calibration
  set identical to a registered one that storage still holds intact is reused);
- base-model measurements: the registry. Each is recorded, as an ``evaluation`` run, as soon
  as it is made, and an identical earlier measurement (same evaluator, version, settings and
  data) is reused by any later job on the same model;
- finished decoder blocks, the exported and stored checkpoint and each measurement of it: the
  job's work area in storage, keyed by the quantization's fingerprint (``flows/work.py``),
  trusted only after the stored checkpoint is fetched intact. They are the job's own, not yet
  audited results, so they live beside the job's storage rather than in the registry, and they
  are removed once the run is registered.

Prefect's task caching is not used for any of this (``NO_CACHE``): its results would be a second
copy of what storage holds, keyed by Prefect's view of the inputs (and read back by unpickling),
while the registry and the work area check the content itself.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file, save_file

from quantmill.flows.artifacts import Backends, as_uri, fetch_artifact
from quantmill.flows.context import RunContext
from quantmill.flows.environment import software_versions
from quantmill.flows.recipe import Job
from quantmill.flows.results import (
    Calibration,
    Evaluation,
    Inputs,
    PlanResult,
    Published,
    QuantizeResult,
    StoredCheckpoint,
    jsonable,
)
from quantmill.flows.work import FlowWorkArea, fingerprint
from quantmill.plugins.base import (
    CalibrationSet,
    EvaluationResult,
    Evaluator,
    LoadedModel,
    QuantizationResult,
    QuantPlan,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hashing import sha256_path
from quantmill.registry import ArtifactNotFound, NewArtifact, NewLocation, NewMetric, Registry

CALIBRATION_FILE = "calibration.safetensors"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Inputs and calibration
# ---------------------------------------------------------------------------------------------


def register_inputs_step(ctx: RunContext) -> Inputs:
    """Hash and register the base model and every data file the job reads."""
    job, reg = ctx.job, ctx.registry
    sha, size = sha256_path(job.model_path)
    uri, details = job.input_location(job.model_path)
    model = reg.upsert_artifact(
        kind="model", name=_input_name(uri), sha256=sha, size_bytes=size,
        uri=uri, format=job.model_source.name,
        metadata={"source": job.model_source.name},
        locations=[NewLocation(uri, "stored", details)],
    )
    datasets: dict[str, int] = {}
    files = list(job.calibration.data_files()) if job.calibration else []
    for evaluator in job.evaluators:
        files.extend(evaluator.data_files())
    for path in files:
        if str(path) in datasets:
            continue
        dsha, dsize = sha256_path(path)
        uri, details = job.input_location(path)
        art = reg.upsert_artifact(kind="dataset", name=_input_name(uri), sha256=dsha,
                                  size_bytes=dsize, uri=uri, format="text",
                                  locations=[NewLocation(uri, "stored", details)])
        datasets[str(path)] = art.id
    return Inputs(model.id, sha, datasets)


def _input_name(uri: str) -> str:
    """The last path segment of an input's URI (a cached copy's own name is its hash)."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _write_calibration_file(calib: CalibrationSet, directory: Path) -> Path:
    import json

    directory.mkdir(parents=True, exist_ok=True)
    file = directory / CALIBRATION_FILE
    # one metadata key: safetensors writes several in hash-map order, which would make identical
    # calibration sets hash differently
    header = {"description": calib.description, "token_ids_sha256": calib.sha256}
    save_file({"input_ids": calib.input_ids.contiguous()}, str(file),
              metadata={"quantmill": json.dumps(header, sort_keys=True)})
    return file


def _intact_artifact(ctx: RunContext, sha256: str) -> int | None:
    """The id of a registered artifact with this content that one of its locations still
    holds intact; None when it is new, or every copy is gone or damaged (then it is stored
    again)."""
    try:
        existing = ctx.registry.get_artifact(sha256)
        fetch_artifact(ctx.registry, existing, Backends(ctx.catalog, like=ctx.job.storage))
    except (ArtifactNotFound, QuantmillError):
        return None
    return existing.id


def calibrate_step(ctx: RunContext, inputs: Inputs) -> Calibration | None:
    """Build the calibration set; register it as the output of a calibration run, unless an
    identical set (same file hash) is already registered and still intact in storage, in which
    case that artifact is reused and no new run is recorded."""
    job, reg = ctx.job, ctx.registry
    if job.calibration is None:
        return None
    tokenizer = job.model_source.load_tokenizer(job.model_path)
    calib = job.calibration.build(tokenizer)
    file = _write_calibration_file(calib, ctx.work_dir / "calibration")
    sha, _ = sha256_path(file)
    existing = _intact_artifact(ctx, sha)
    if existing is not None:
        return Calibration(existing, calib.sha256)
    data_ids = [inputs.datasets[str(p)] for p in job.calibration.data_files()]
    run = reg.start_run(
        job_id=ctx.job_id, kind="calibration", name=f"{job.recipe.name}:calibration",
        recipe=job.recipe_json(), plugins=job.plugin_versions, versions=software_versions(),
        flow_run_id=flow_run_id(),
        inputs=[(inputs.base_model_id, "tokenizer_model")]
        + [(i, "calibration_data") for i in data_ids],
    )
    try:
        stored = job.storage.put_tree(file, consume=True)
        reg.finish_run(run.id, outputs=[NewArtifact(
            kind="calibration_set", name=f"{job.recipe.name}-calibration",
            sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri,
            format="safetensors-token-ids", role="calibration_set",
            metadata={**calib.description, "token_ids_sha256": calib.sha256,
                      "shape": list(calib.input_ids.shape)},
            locations=(NewLocation(stored.uri, "stored", job.storage.location_details()),),
        )], metrics=[])
    except BaseException as exc:
        reg.fail_run(run.id, f"{type(exc).__name__}: {exc}")
        raise
    return Calibration(reg.get_artifact(stored.sha256).id, calib.sha256)


def load_calibration(ctx: RunContext, calibration: Calibration | None) -> CalibrationSet | None:
    """The calibration set's token ids, read from wherever storage holds it."""
    if calibration is None:
        return None
    artifact = ctx.registry.get_artifact(calibration.artifact_id)
    path = fetch_artifact(ctx.registry, artifact,
                          Backends(ctx.catalog, like=ctx.job.storage)).path
    ids = load_file(str(path))["input_ids"]
    return CalibrationSet(input_ids=ids, description=dict(artifact.metadata or {}))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _protocol(evaluator: Evaluator, result: EvaluationResult) -> dict[str, Any]:
    return {"config": evaluator.config.model_dump(mode="json"), "details": result.protocol,
            "plugin_version": type(evaluator).version()}


def _measure(evaluator: Evaluator, loaded: LoadedModel, checkpoint_dir: Path | None,
             target: str) -> Evaluation:
    result: EvaluationResult = evaluator.evaluate(loaded, checkpoint_dir)
    return Evaluation(
        evaluator=result.evaluator, target=target, metrics=result.as_dict(),
        units={m.name: m.unit for m in result.metrics}, protocol=_protocol(evaluator, result),
        dataset=str(result.dataset_path) if result.dataset_path else None,
    )


def _earlier_base_measurement(ctx: RunContext, inputs: Inputs,
                              evaluator: Evaluator) -> Evaluation | None:
    """The newest registered measurement of the base model by this evaluator under the same
    settings, version and data, if any."""
    options = evaluator.config.model_dump(mode="json")
    wanted = {inputs.datasets.get(str(p)) for p in evaluator.data_files()} or {None}
    earlier = [m for m in ctx.registry.metrics_for_artifact(inputs.base_model_id)
               if m.evaluator == evaluator.name and m.dataset_artifact_id in wanted
               and (m.protocol or {}).get("config") == options
               and (m.protocol or {}).get("plugin_version") == type(evaluator).version()]
    if not earlier:
        return None
    latest = max(m.run_id for m in earlier)
    chosen = [m for m in earlier if m.run_id == latest]
    return Evaluation(evaluator=evaluator.name, target="base",
                      metrics={m.name: m.value for m in chosen},
                      units={m.name: m.unit for m in chosen}, protocol=chosen[0].protocol,
                      reused_from_run=latest)


def evaluate_base_step(ctx: RunContext, inputs: Inputs, evaluator_index: int) -> Evaluation:
    """Measure the base model with one evaluator, or return the identical measurement the
    registry already holds. A new measurement is recorded at once (an ``evaluation`` run), so
    a job that dies later never measures it again."""
    job, reg = ctx.job, ctx.registry
    evaluator = job.evaluators[evaluator_index]
    earlier = _earlier_base_measurement(ctx, inputs, evaluator)
    if earlier is not None:
        return earlier
    loaded = ctx.models.get(job.model_source, job.model_path, job.device())
    measured = _measure(evaluator, loaded, None, "base")
    dataset = inputs.datasets.get(measured.dataset) if measured.dataset else None
    run = reg.start_run(
        job_id=ctx.job_id, kind="evaluation", name=f"{job.recipe.name}:base:{evaluator.name}",
        recipe=job.recipe_json(), plugins=job.plugin_versions, versions=software_versions(),
        flow_run_id=flow_run_id(),
        inputs=[(inputs.base_model_id, "evaluated_model")]
        + ([(dataset, "evaluation_data")] if dataset is not None else []),
    )
    reg.finish_run(run.id, metrics=_new_metrics(measured, {"artifact_id": inputs.base_model_id},
                                                dataset))
    return replace(measured, recorded_by_run=run.id)


def evaluate_checkpoint_step(ctx: RunContext, quantized: QuantizeResult,
                             evaluator_index: int) -> Evaluation:
    """Measure the stored checkpoint with one evaluator (read back by the export format's model
    source, as a runtime would), unless this job's work area already holds that measurement."""
    job = ctx.job
    evaluator = job.evaluators[evaluator_index]
    area = _work_area(ctx, quantized.work_key)
    for earlier in area.recorded_evaluations():
        if earlier.evaluator == evaluator.name and earlier.protocol.get("config") == \
                evaluator.config.model_dump(mode="json"):
            return earlier
    checkpoint = ctx.fetch(quantized.checkpoint.uri)
    source = ctx.catalog.model_sources.get(job.exporter.format_name)()
    loaded = ctx.models.get(source, checkpoint, job.device())
    measured = _measure(evaluator, loaded, checkpoint, "quantized")
    area.record_evaluation(measured)
    return measured


def _new_metrics(evaluation: Evaluation, target: dict[str, Any],
                 dataset_id: int | None) -> list[NewMetric]:
    return [NewMetric(**target, evaluator=evaluation.evaluator, name=name, value=float(value),
                      unit=evaluation.units.get(name, ""), protocol=dict(evaluation.protocol),
                      dataset_artifact_id=dataset_id)
            for name, value in evaluation.metrics.items()]


# ---------------------------------------------------------------------------------------------
# Plan, quantize, export
# ---------------------------------------------------------------------------------------------


def _model_for_quantization(ctx: RunContext) -> LoadedModel:
    """The base model as the quantizer wants it: with deferred weights (read when their block
    comes up: less memory) when it accepts them, else fully loaded."""
    job = ctx.job
    return ctx.models.get(job.model_source, job.model_path, job.device(),
                          deferred=job.quantizer.accepts_deferred_weights)


def plan_step(ctx: RunContext, calibration: Calibration | None) -> PlanResult:
    """The allocator's per-module plan."""
    job = ctx.job
    loaded = _model_for_quantization(ctx)
    default = job.quantizer.default_spec()
    if default is None:
        raise QuantmillError(f"quantizer '{job.quantizer.name}' has no default spec")
    started = time.perf_counter()
    plan = job.allocator.plan(loaded.model, job.quantizable(loaded.model), default,
                              load_calibration(ctx, calibration))
    return PlanResult(plan.to_json(), jsonable(plan.details),
                      round(time.perf_counter() - started, 3))


@dataclass(frozen=True)
class Quantization:
    """A quantized model in this process's memory: what ``export_step`` writes."""

    loaded: LoadedModel
    result: QuantizationResult
    seconds: float


def work_key(ctx: RunContext, inputs: Inputs, calibration: Calibration | None,
             plan: PlanResult) -> str:
    """The fingerprint of this quantization: the key of its work area."""
    job = ctx.job
    return fingerprint(inputs.base_model_sha256,
                       calibration.token_ids_sha256 if calibration else None, job.quantizer,
                       QuantPlan.from_json(plan.modules), job.device())


def _work_area(ctx: RunContext, key: str) -> FlowWorkArea:
    job = ctx.job
    return FlowWorkArea(job.storage, key, {"recipe": job.recipe.name,
                                           "quantizer": job.quantizer.name,
                                           "job_id": ctx.job_id})


def quantize_step(ctx: RunContext, calibration: Calibration | None, plan: PlanResult,
                  area: FlowWorkArea) -> Quantization:
    """Quantize the base model as planned. Resumable quantizers keep each finished decoder
    block in ``area`` and continue after the last one an interrupted run finished."""
    job = ctx.job
    loaded = _model_for_quantization(ctx)
    calib = load_calibration(ctx, calibration)
    quant_plan = QuantPlan.from_json(plan.modules, plan.details)
    started = time.perf_counter()
    if job.quantizer.resumable:
        result = job.quantizer.quantize(loaded.model, quant_plan, calib, work_area=area)
    else:
        result = job.quantizer.quantize(loaded.model, quant_plan, calib)
    seconds = time.perf_counter() - started
    if result.float_overrides and not job.exporter.accepts_float_overrides:
        raise QuantmillError(
            f"method '{job.quantizer.name}' changed {len(result.float_overrides)} float tensor(s) "
            f"(e.g. '{next(iter(sorted(result.float_overrides)))}') that export format "
            f"'{job.exporter.name}' cannot write; the checkpoint would not be the quantized "
            "model (use a built-in format, or turn off the setting that changes them)")
    return Quantization(loaded, result, seconds)


def export_step(ctx: RunContext, quantization: Quantization, key: str) -> QuantizeResult:
    """Write the checkpoint in the export format and store it (the scratch copy is handed to
    storage, which moves rather than copies it where it can); returns once it is confirmed."""
    job = ctx.job
    staging = ctx.work_dir / "checkpoint"
    if staging.exists():
        shutil.rmtree(staging)  # a rerun of an interrupted job starts its export afresh
    summary = job.exporter.export(quantization.loaded, quantization.result, staging)
    ctx.models.clear()  # the quantized in-memory model is done with
    stored = job.storage.put_tree(staging, consume=True)
    details = jsonable(quantization.result.details)
    return QuantizeResult(
        checkpoint=StoredCheckpoint(stored.uri, stored.sha256, stored.size_bytes,
                                    job.storage.location_details(),
                                    job.storage.transfer_report()),
        quantize_seconds=round(quantization.seconds, 3), details=details,
        export=jsonable(summary), work_key=key,
        resumed_at_block=int(details.get("resumed_at_block", 0) or 0),
    )


def quantize_and_export(ctx: RunContext, inputs: Inputs, calibration: Calibration | None,
                        plan: PlanResult) -> QuantizeResult:
    """``quantize_step`` then ``export_step``, in one task because the quantized tensors are
    not an artifact; or the checkpoint an interrupted run of this quantization already stored
    (recorded in its work area and fetched intact), with nothing quantized."""
    key = work_key(ctx, inputs, calibration, plan)
    area = _work_area(ctx, key)
    recorded = area.recorded_checkpoint()
    if recorded is not None and _intact(ctx, recorded.checkpoint):
        log.warning("%s: the checkpoint an interrupted run stored (%s...) is reused",
                    ctx.job.quantizer.name, recorded.checkpoint.sha256[:16])
        return replace(recorded, reused=True)
    quantized = export_step(ctx, quantize_step(ctx, calibration, plan, area), key)
    area.record_checkpoint(quantized)
    return quantized


def _intact(ctx: RunContext, checkpoint: StoredCheckpoint) -> bool:
    try:
        path = ctx.fetch(checkpoint.uri)
    except (QuantmillError, OSError):
        return False
    return path.name == checkpoint.sha256 or sha256_path(path)[0] == checkpoint.sha256


def clear_work_area(ctx: RunContext, key: str) -> None:
    """The run is registered: its finished blocks and records are no longer needed."""
    ctx.job.storage.work_area(key).clear()


# ---------------------------------------------------------------------------------------------
# Publish and register
# ---------------------------------------------------------------------------------------------


def publish_step(ctx: RunContext, quantized: QuantizeResult) -> Published | None:
    """Write the plain copy ``export.publish`` asks for, checked against the stored one."""
    job = ctx.job
    if job.publish_to is None:
        return None
    checkpoint = ctx.fetch(quantized.checkpoint.uri)
    target = as_uri(job.publish_to)
    publisher = Backends(ctx.catalog, like=job.storage).for_location(target, {})
    published = publisher.publish(checkpoint, target)
    if published.sha256 != quantized.checkpoint.sha256:
        raise QuantmillError(f"the published copy at {published.uri} does not hash like "
                             "the stored checkpoint; nothing was registered")
    return Published(published.uri, publisher.location_details())


def register_step(ctx: RunContext, run_id: int, inputs: Inputs, plan: PlanResult,
                  quantized: QuantizeResult, evaluations: list[Evaluation],
                  published: Published | None) -> int:
    """Record the checkpoint and its measurements as the run's outputs in one transaction."""
    job, reg = ctx.job, ctx.registry
    checkpoint = quantized.checkpoint
    if reg.get_run(run_id).status == "succeeded":  # a retry after a committed attempt
        return reg.get_artifact(checkpoint.sha256).id
    metrics: list[NewMetric] = []
    for ev in evaluations:
        if ev.target == "quantized":
            dataset = inputs.datasets.get(ev.dataset) if ev.dataset else None
            metrics.extend(_new_metrics(ev, {"artifact_sha256": checkpoint.sha256}, dataset))
    locations = [NewLocation(checkpoint.uri, "stored", dict(checkpoint.details))]
    if published is not None:
        locations.append(NewLocation(published.uri, "published", dict(published.details)))
    base_runs = {ev.evaluator: ev.recorded_by_run or ev.reused_from_run
                 for ev in evaluations if ev.target == "base"}
    output = NewArtifact(
        kind="checkpoint", name=job.recipe.name, sha256=checkpoint.sha256,
        size_bytes=checkpoint.size_bytes, uri=checkpoint.uri, format=job.exporter.format_name,
        role="quantized_checkpoint",
        metadata=checkpoint_metadata(job, quantized.export, plan.modules,
                                     inputs.base_model_sha256),
        locations=tuple(locations),
    )
    outputs: list[NewArtifact] = [output]
    reproduced: list[tuple[int | str, str]] = []
    reproduces = _producer(reg, checkpoint.sha256)
    if reproduces is not None:
        # the same bytes another run already produced: an artifact has one producing run, so
        # this run records that it reproduced it (and measured it), and where it stored it
        outputs = []
        reproduced = [(checkpoint.sha256, "reproduced_checkpoint")]
        for location in locations:
            reg.add_location(checkpoint.sha256, location.uri, "copy", location.details)
    details = {
        "reproduces_run": reproduces, "upload": dict(checkpoint.transfer),
        "plan": dict(plan.modules), "plan_details": dict(plan.details),
        "quantize_seconds": quantized.quantize_seconds, "plan_seconds": plan.seconds,
        "quantizer": dict(quantized.details), "resumed_at_block": quantized.resumed_at_block,
        "checkpoint_reused_from_work_area": quantized.reused,
        "base_measured_by_runs": base_runs,
        "measured_base": any(ev.recorded_by_run is not None for ev in evaluations),
    }
    reg.finish_run(run_id, outputs=outputs, inputs=reproduced, metrics=metrics, details=details)
    return reg.get_artifact(checkpoint.sha256).id


def checkpoint_metadata(job: Job, export: Mapping[str, Any], plan: Mapping[str, Any],
                        base_sha256: str) -> dict[str, Any]:
    """The checkpoint's searchable facts (``quantmill registry search --method --bits``).

    ``bits``/``group_size`` come from the executed plan when every module got the same one (the
    uniform allocator applies the quantizer's default spec); a mixed-precision plan has no
    single width, so it records the widths it used as ``bits_mixed`` instead of claiming the
    default it did not apply. Codebook methods have no group size.
    """
    metadata: dict[str, Any] = {"export": dict(export), "method": job.quantizer.name,
                                "base_model_sha256": base_sha256}
    specs = list(plan.values())
    default = job.quantizer.default_spec()
    if not specs and default is not None:
        specs = [{"bits": default.bits, "group_size": default.group_size}]
    widths = sorted({spec["bits"] for spec in specs})
    groups = {spec["group_size"] for spec in specs}
    if len(widths) == 1:
        metadata["bits"] = widths[0]
    elif widths:
        metadata["bits_mixed"] = widths
    if len(groups) == 1 and job.quantizer.weight_kind == "uniform":
        metadata["group_size"] = groups.pop()
    seeds = sorted({spec["rotation_seed"] for spec in specs if "rotation_seed" in spec})
    if seeds:  # an auditor can find the checkpoints made from rotated weights
        metadata["rotation"] = {"kind": "randomized_hadamard", "seeds": seeds}
    return metadata


def _producer(reg: Registry, sha256: str) -> int | None:
    try:
        return reg.producer(sha256)
    except ArtifactNotFound:
        return None


def flow_run_id() -> str | None:
    """The Prefect flow run this process is in (None outside one: unit tests of the steps)."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Prefect tasks
# ---------------------------------------------------------------------------------------------

_common = {"cache_policy": NO_CACHE, "persist_result": False}
register_inputs = task(register_inputs_step, name="register-inputs", retries=2,
                       retry_delay_seconds=2, **_common)
calibrate = task(calibrate_step, name="calibrate", **_common)
evaluate_base = task(evaluate_base_step, name="evaluate-base",
                     task_run_name="evaluate-base-{evaluator_index}", **_common)
plan = task(plan_step, name="plan", **_common)
quantize = task(quantize_and_export, name="quantize", **_common)
evaluate_checkpoint = task(evaluate_checkpoint_step, name="evaluate-checkpoint",
                           task_run_name="evaluate-checkpoint-{evaluator_index}", **_common)
publish = task(publish_step, name="publish", retries=2, retry_delay_seconds=2, **_common)
register = task(register_step, name="register", retries=2, retry_delay_seconds=2, **_common)
