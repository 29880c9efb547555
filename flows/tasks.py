"""Prefect tasks of the compress flow: each calls one plugin (or the registry) and passes on
paths, URIs and artifact ids, never tensors.

The task bodies are plain functions (``*_step``) so they can be unit-tested without a Prefect
server; the ``@task`` objects at the bottom wrap them with names, retries and no result caching
(results are registry ids; the registry itself is the cache: identical base-model measurements and
calibration sets are found there and reused).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file, save_file

from quantmill.flows.artifacts import Backends, as_uri, fetch_artifact
from quantmill.flows.recipe import Job, parse_recipe, resolve_job
from quantmill.flows.runtime import software_versions
from quantmill.flows.work import FlowWorkArea, fingerprint
from quantmill.plugins.base import CalibrationSet, EvaluationResult, LoadedModel, StoredObject
from quantmill.plugins.catalog import Catalog
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hashing import sha256_path
from quantmill.plugins.home import quantmill_home
from quantmill.plugins.manager import get_plugin_manager
from quantmill.registry import ArtifactNotFound, NewArtifact, NewLocation, NewMetric, Registry

CALIBRATION_FILE = "calibration.safetensors"


@dataclass(frozen=True)
class JobRef:
    """Everything a task needs to rebuild the job on any worker: the recipe text and where the
    recipe's relative paths are anchored, plus the job's id and registry URL."""

    recipe_text: str
    recipe_path: str
    job_id: str
    database_url: str | None = None

    def job(self) -> Job:
        import yaml

        catalog = Catalog(get_plugin_manager())
        recipe = parse_recipe(yaml.safe_load(self.recipe_text), Path(self.recipe_path).parent)
        return resolve_job(recipe, self.recipe_text, Path(self.recipe_path), catalog)

    def registry(self) -> Registry:
        return Registry.open(self.database_url)

    @property
    def work_dir(self) -> Path:
        return quantmill_home() / "work" / self.job_id


@dataclass
class _ModelCache:
    """Keeps the last loaded model so that consecutive tasks on one model load it once.

    One entry only: a job touches the base model, then the quantized one, never back.
    """

    key: tuple[str, str] | None = None
    loaded: LoadedModel | None = None

    def get(self, job: Job, path: Path, source_name: str | None = None) -> LoadedModel:
        key = (str(path), source_name or job.model_source.name)
        if self.key != key:
            self.key, self.loaded = None, None  # free the old model before loading the next
            source = job.model_source
            if source_name is not None and source_name != source.name:
                catalog = Catalog(get_plugin_manager())
                source = catalog.model_sources.get(source_name)()
            self.loaded = source.load(path, job.device())
            self.key = key
        assert self.loaded is not None
        return self.loaded

    def clear(self) -> None:
        self.key, self.loaded = None, None


MODEL_CACHE = _ModelCache()


# ---------------------------------------------------------------------------------------------
# Step bodies
# ---------------------------------------------------------------------------------------------


def register_inputs_step(ref: JobRef) -> dict[str, Any]:
    """Hash and register the base model and every data file the job reads."""
    job = ref.job()
    with ref.registry() as reg:
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
    return {"base_model": model.id, "datasets": datasets}


def _input_name(uri: str) -> str:
    """The last path segment of an input's URI (a cached copy's own name is its hash)."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _write_calibration_file(calib: CalibrationSet, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / CALIBRATION_FILE
    # one metadata key: safetensors writes several in hash-map order, which would make identical
    # calibration sets hash differently
    header = {"description": calib.description, "token_ids_sha256": calib.sha256}
    save_file({"input_ids": calib.input_ids.contiguous()}, str(file),
              metadata={"quantmill": json.dumps(header, sort_keys=True)})
    return file


def _intact_artifact(reg: Registry, job: Job, sha256: str) -> int | None:
    """The id of a registered artifact with this content that one of its locations still
    holds intact; None when it is new, or every copy is gone or damaged (then it is stored
    again)."""
    try:
        existing = reg.get_artifact(sha256)
        fetch_artifact(reg, existing, Backends(like=job.storage))
    except (ArtifactNotFound, QuantmillError):
        return None
    return existing.id


def _stored_location(job: Job, stored: StoredObject, role: str = "stored") -> NewLocation:
    return NewLocation(stored.uri, role, job.storage.location_details())


def calibrate_step(ref: JobRef, inputs: dict[str, Any]) -> int | None:
    """Build the calibration set; register it as the output of a calibration run, unless an
    identical set (same file hash) is already registered and still intact in storage, in which
    case that artifact is reused and no new run is recorded."""
    job = ref.job()
    if job.calibration is None:
        return None
    tokenizer = job.model_source.load_tokenizer(job.model_path)
    calib = job.calibration.build(tokenizer)
    file = _write_calibration_file(calib, ref.work_dir / "calibration")
    sha, _ = sha256_path(file)
    data_ids = [inputs["datasets"][str(p)] for p in job.calibration.data_files()]
    with ref.registry() as reg:
        existing = _intact_artifact(reg, job, sha)
        if existing is not None:
            return existing
        run = reg.start_run(
            job_id=ref.job_id, kind="calibration", name=f"{job.recipe.name}:calibration",
            recipe=job.recipe_json(), plugins=job.plugin_versions, versions=software_versions(),
            flow_run_id=_flow_run_id(),
            inputs=[(inputs["base_model"], "tokenizer_model")]
            + [(i, "calibration_data") for i in data_ids],
        )
        try:
            stored = job.storage.put_tree(file)
            reg.finish_run(run.id, outputs=[NewArtifact(
                kind="calibration_set", name=f"{job.recipe.name}-calibration",
                sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri,
                format="safetensors-token-ids", role="calibration_set",
                metadata={**calib.description, "token_ids_sha256": calib.sha256,
                          "shape": list(calib.input_ids.shape)},
                locations=(_stored_location(job, stored),),
            )], metrics=[])
        except BaseException as exc:
            reg.fail_run(run.id, f"{type(exc).__name__}: {exc}")
            raise
        return reg.get_artifact(stored.sha256).id


def load_calibration(ref: JobRef, job: Job, calibration_id: int | None) -> CalibrationSet | None:
    if calibration_id is None:
        return None
    with ref.registry() as reg:
        artifact = reg.get_artifact(calibration_id)
        path = fetch_artifact(reg, artifact, Backends(like=job.storage)).path
    ids = load_file(str(path))["input_ids"]
    return CalibrationSet(input_ids=ids, description=dict(artifact.metadata or {}))


def evaluate_step(
    ref: JobRef, evaluator_index: int, artifact_id: int | None, model_path: str,
    source: str | None,
    checkpoint_dir: str | None, reuse: bool,
) -> dict[str, Any]:
    """Run one evaluator on one model; with ``reuse``, return an identical earlier measurement
    of the same artifact from the registry instead of measuring again."""
    job = ref.job()
    evaluator = job.evaluators[evaluator_index]
    options = evaluator.config.model_dump(mode="json")
    if reuse and artifact_id is not None:
        dataset_ids = {dataset_id(ref, p) for p in evaluator.data_files()} or {None}
        with ref.registry() as reg:
            earlier = [m for m in reg.metrics_for_artifact(artifact_id)
                       if m.evaluator == evaluator.name
                       and m.dataset_artifact_id in dataset_ids
                       and (m.protocol or {}).get("config") == options
                       and (m.protocol or {}).get("plugin_version") == type(evaluator).version()]
        if earlier:
            latest_run = max(m.run_id for m in earlier)
            metrics = {m.name: m.value for m in earlier if m.run_id == latest_run}
            protocol = next(m.protocol for m in earlier if m.run_id == latest_run)
            return {"evaluator": evaluator.name, "metrics": metrics, "protocol": protocol,
                    "reused_from_run": latest_run, "dataset": None, "units": {}}
    loaded = MODEL_CACHE.get(job, Path(model_path), source)
    result: EvaluationResult = evaluator.evaluate(
        loaded, Path(checkpoint_dir) if checkpoint_dir else None
    )
    return {
        "evaluator": result.evaluator,
        "metrics": result.as_dict(),
        "units": {m.name: m.unit for m in result.metrics},
        "protocol": {"config": options, "details": result.protocol,
                     "plugin_version": type(evaluator).version()},
        "dataset": str(result.dataset_path) if result.dataset_path else None,
        "reused_from_run": None,
    }


def dataset_id(ref: JobRef, path: Path) -> int | None:
    """The registry id of the data file's current content (None if never registered)."""
    sha, _ = sha256_path(path)
    with ref.registry() as reg:
        try:
            return reg.get_artifact(sha).id
        except ArtifactNotFound:
            return None


def quantize_step(ref: JobRef, inputs: dict[str, Any], calibration_id: int | None) -> dict:
    """Plan, quantize and export the checkpoint into the job's staging directory."""
    job = ref.job()
    if job.quantizer.accepts_deferred_weights:
        # layer by layer: block weights are read when their block comes up (less memory);
        # the base-model evaluation that follows loads the model fully
        MODEL_CACHE.clear()
        loaded = job.model_source.load_deferred(job.model_path, job.device())
    else:
        loaded = MODEL_CACHE.get(job, job.model_path)
    calibration = load_calibration(ref, job, calibration_id)
    quantizable = job.quantizable(loaded.model)
    default = job.quantizer.default_spec()
    if default is None:
        raise RuntimeError(f"quantizer '{job.quantizer.name}' has no default spec")
    planning = time.perf_counter()
    plan = job.allocator.plan(loaded.model, quantizable, default, calibration)
    plan_seconds = time.perf_counter() - planning
    started = time.perf_counter()
    work_key = None
    if job.quantizer.resumable:
        # finished decoder blocks are kept in the storage's work area: a rerun of this job
        # after a crash continues at the first unfinished block (flows/work.py)
        with ref.registry() as reg:
            base_sha = reg.get_artifact(inputs["base_model"]).sha256
        work_key = fingerprint(base_sha, calibration.sha256 if calibration else None,
                               job.quantizer, plan, job.device())
        area = FlowWorkArea(job.storage, work_key, {"recipe": job.recipe.name,
                                                    "quantizer": job.quantizer.name,
                                                    "job_id": ref.job_id})
        result = job.quantizer.quantize(loaded.model, plan, calibration, work_area=area)
    else:
        result = job.quantizer.quantize(loaded.model, plan, calibration)
    quantize_seconds = time.perf_counter() - started
    if result.float_overrides and not job.exporter.accepts_float_overrides:
        raise QuantmillError(
            f"method '{job.quantizer.name}' changed {len(result.float_overrides)} float tensor(s) "
            f"(e.g. '{next(iter(sorted(result.float_overrides)))}') that export format "
            f"'{job.exporter.name}' cannot write; the checkpoint would not be the quantized "
            "model (use a built-in format, or turn off the setting that changes them)")
    staging = ref.work_dir / "checkpoint"
    if staging.exists():
        shutil.rmtree(staging)  # a rerun of an interrupted job starts its export afresh
    summary = job.exporter.export(loaded, result, staging)
    return {
        "checkpoint_dir": str(staging),
        "plan": plan.to_json(),
        "plan_details": _jsonable(plan.details),
        "quantize_seconds": round(quantize_seconds, 3),
        "plan_seconds": round(plan_seconds, 3),
        "details": _jsonable(result.details),
        "export": _jsonable(summary),
        "work_area": work_key,
    }


def clear_work_area(ref: JobRef, key: str | None) -> None:
    """The run is registered: its finished blocks are no longer needed."""
    if key is not None:
        ref.job().storage.work_area(key).clear()


def upload_step(ref: JobRef, checkpoint_dir: str) -> dict[str, Any]:
    """Store the checkpoint (and publish it, when the recipe asks); returns only once every
    object is confirmed, so what it returns may be registered."""
    job = ref.job()
    stored = job.storage.put_tree(Path(checkpoint_dir))
    result: dict[str, Any] = {
        "uri": stored.uri, "sha256": stored.sha256, "size_bytes": stored.size_bytes,
        "details": job.storage.location_details(), "transfer": job.storage.transfer_report(),
        "published": None,
    }
    if job.publish_to is not None:
        target = as_uri(job.publish_to)
        publisher = Backends(like=job.storage).for_location(target, {})
        published = publisher.publish(Path(checkpoint_dir), target)
        if published.sha256 != stored.sha256:
            raise QuantmillError(f"the published copy at {published.uri} does not hash like "
                                 "the stored checkpoint; nothing was registered")
        result["published"] = {"uri": published.uri, "details": publisher.location_details()}
    return result


def register_step(
    ref: JobRef, run_id: int, stored: dict[str, Any], quantized: dict[str, Any],
    base_id: int, evaluations: list[dict[str, Any]], dataset_ids: dict[str, int],
) -> int:
    """Record the checkpoint, its metrics and the new base-model metrics in one transaction."""
    job = ref.job()
    metrics: list[NewMetric] = []
    for ev in evaluations:
        if ev["reused_from_run"] is not None:
            continue
        target = {"artifact_id": base_id} if ev["target"] == "base" else {
            "artifact_sha256": stored["sha256"]}
        dataset_id = dataset_ids.get(ev["dataset"]) if ev["dataset"] else None
        for name, value in ev["metrics"].items():
            metrics.append(NewMetric(
                **target, evaluator=ev["evaluator"], name=name, value=float(value),
                unit=ev["units"].get(name, ""), protocol=ev["protocol"],
                dataset_artifact_id=dataset_id,
            ))
    with ref.registry() as reg:
        if reg.get_run(run_id).status == "succeeded":  # a retry after a committed attempt
            return reg.get_artifact(stored["sha256"]).id
        base_sha256 = reg.get_artifact(base_id).sha256
        locations = [NewLocation(stored["uri"], "stored", stored["details"])]
        if stored.get("published"):
            locations.append(NewLocation(stored["published"]["uri"], "published",
                                         stored["published"]["details"]))
        reg.finish_run(run_id, outputs=[NewArtifact(
            kind="checkpoint", name=job.recipe.name, sha256=stored["sha256"],
            size_bytes=stored["size_bytes"], uri=stored["uri"], format=job.exporter.format_name,
            role="quantized_checkpoint",
            metadata=checkpoint_metadata(job, quantized, base_sha256),
            locations=tuple(locations),
        )], metrics=metrics, details={"upload": stored.get("transfer", {}),
                                      "plan": quantized["plan"],
                                      "plan_details": quantized.get("plan_details", {}),
                                      "quantize_seconds": quantized["quantize_seconds"],
                                      "plan_seconds": quantized.get("plan_seconds"),
                                      "quantizer": quantized["details"]})
        return reg.get_artifact(stored["sha256"]).id


def checkpoint_metadata(job: Job, quantized: dict[str, Any], base_sha256: str) -> dict[str, Any]:
    """The checkpoint's searchable facts (``quantmill registry search --method --bits``).

    ``bits``/``group_size`` come from the executed plan when every module got the same one (the
    uniform allocator applies the quantizer's default spec); a mixed-precision plan has no
    single width, so it records the widths it used as ``bits_mixed`` instead of claiming the
    default it did not apply. Codebook methods have no group size.
    """
    metadata: dict[str, Any] = {"export": quantized["export"], "method": job.quantizer.name,
                                "base_model_sha256": base_sha256}
    specs = list(quantized["plan"].values())
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


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # outside a flow run (unit tests of the step bodies)
        return None


# ---------------------------------------------------------------------------------------------
# Prefect tasks
# ---------------------------------------------------------------------------------------------

_common = {"cache_policy": NO_CACHE, "persist_result": False}
register_inputs = task(register_inputs_step, name="register-inputs", retries=2,
                       retry_delay_seconds=2, **_common)
calibrate = task(calibrate_step, name="calibrate", **_common)
quantize = task(quantize_step, name="quantize", **_common)
evaluate = task(evaluate_step, name="evaluate", task_run_name="evaluate-{evaluator_index}",
                **_common)
upload = task(upload_step, name="upload", retries=2, retry_delay_seconds=2, **_common)
register = task(register_step, name="register", retries=2, retry_delay_seconds=2, **_common)
