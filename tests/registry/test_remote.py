"""``record_run``: a whole finished run in one transaction, on SQLite and PostgreSQL."""

import copy
import hashlib
from typing import Any

import pytest

from quantmill.registry import ArtifactConflict, ArtifactNotFound, Registry
from quantmill.registry.remote import InvalidRun, ended_run_from_dict, record_run


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def base_model(registry: Registry) -> int:
    return registry.upsert_artifact(kind="model", name="base", sha256=sha("base"), size_bytes=4,
                                    uri="file:///base", format="gguf").id


def run_body(base_ref: int | str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": "remote-job-1",
        "kind": "quantization",
        "name": "rtn-4bit",
        "recipe": {"quantization": {"method": "rtn", "bits": 4}},
        "plugins": {"rtn": "0.1.0"},
        "versions": {"quantmill": "0.1.0"},
        "details": {"worker": "w-3"},
        "host": "gpu-node-7",
        "inputs": [{"artifact": base_ref, "role": "model"}],
        "outputs": [{"kind": "checkpoint", "name": "base-rtn4", "sha256": sha("ckpt"),
                     "size_bytes": 10, "uri": "s3://bucket/ckpt", "format": "gptq",
                     "role": "checkpoint", "metadata": {"method": "rtn", "bits": 4}}],
        "metrics": [{"evaluator": "perplexity", "name": "perplexity", "value": 27.5,
                     "protocol": {"windows": 40}, "artifact_sha256": sha("ckpt")}],
        "completion": {"status": "succeeded", "details": {"seconds": 12.5}},
    }
    body.update(changes)
    return body


def counts(registry: Registry) -> tuple[Any, ...]:
    return (registry.head(), len(registry.list_runs()), len(registry.list_artifacts()))


def test_records_a_complete_run_with_its_lineage(registry: Registry) -> None:
    base = base_model(registry)
    run = record_run(registry, run_body(base), started_by="token:worker-1")
    assert (run.status, run.started_by, run.host, run.error) == (
        "succeeded", "token:worker-1", "gpu-node-7", None)
    assert run.details == {"worker": "w-3", "seconds": 12.5}
    checkpoint = registry.get_artifact(sha("ckpt"))
    assert [(e.direction, e.artifact_id, e.role) for e in registry.run_edges(run.id)] == [
        ("input", base, "model"), ("output", checkpoint.id, "checkpoint")]
    [metric] = registry.metrics_for_artifact(checkpoint.id)
    assert (metric.run_id, metric.value) == (run.id, 27.5)
    assert sorted(registry.upstream(checkpoint.id).artifacts) == [base, checkpoint.id]
    assert registry.verify().ok


def test_inputs_by_sha256_prefix_and_a_dataclass_work_too(registry: Registry) -> None:
    base_model(registry)
    run = record_run(registry, ended_run_from_dict(run_body(sha("base")[:10])), "token:w")
    assert [e.direction for e in registry.run_edges(run.id)] == ["input", "output"]


def test_a_failed_run_records_its_error(registry: Registry) -> None:
    base = base_model(registry)
    body = run_body(base, outputs=[], metrics=[],
                    completion={"status": "failed", "error": "CUDA out of memory"})
    run = record_run(registry, body, "token:w")
    assert (run.status, run.error) == ("failed", "CUDA out of memory")
    assert registry.verify().ok


def _broken(case: str, base: int) -> dict[str, Any]:
    body = run_body(base)
    changed = copy.deepcopy(body)
    if case == "unknown key":
        changed["stated_by"] = "root"
    elif case == "missing key":
        del changed["recipe"]
    elif case == "unknown nested key":
        changed["outputs"][0]["colour"] = "red"
    elif case == "bad sha256":
        changed["outputs"][0]["sha256"] = "' OR 1=1 --"
    elif case == "negative size":
        changed["outputs"][0]["size_bytes"] = -1
    elif case == "huge size":
        changed["outputs"][0]["size_bytes"] = 2**64
    elif case == "nan metric":
        changed["metrics"][0]["value"] = float("nan")
    elif case == "nan in recipe":
        changed["recipe"] = {"lr": float("inf")}
    elif case == "long job id":
        changed["job_id"] = "j" * 65
    elif case == "empty name":
        changed["name"] = " "
    elif case == "NUL in a name":
        changed["outputs"][0]["name"] = "ckpt\x00"
    elif case == "failed with outputs":
        changed["completion"] = {"status": "failed", "error": "boom"}
    elif case == "failed without error":
        changed["outputs"], changed["metrics"] = [], []
        changed["completion"] = {"status": "failed"}
    elif case == "error on success":
        changed["completion"] = {"status": "succeeded", "error": "boom"}
    elif case == "bad status":
        changed["completion"] = {"status": "running"}
    elif case == "plugin version not text":
        changed["plugins"] = {"rtn": 1}
    elif case == "metric names two artifacts":
        changed["metrics"][0]["artifact_id"] = base
    elif case == "huge artifact id":
        changed["inputs"][0]["artifact"] = 2**40
    else:
        raise ValueError(case)
    return changed


@pytest.mark.parametrize("case", [
    "unknown key", "missing key", "unknown nested key", "bad sha256", "negative size",
    "huge size", "nan metric", "nan in recipe", "long job id", "empty name", "NUL in a name",
    "failed with outputs", "failed without error", "error on success", "bad status",
    "plugin version not text", "metric names two artifacts", "huge artifact id",
])
def test_malformed_runs_are_refused_before_anything_is_written(
    registry: Registry, case: str
) -> None:
    base = base_model(registry)
    before = counts(registry)
    with pytest.raises(InvalidRun):
        record_run(registry, _broken(case, base), "token:w")
    assert counts(registry) == before


def test_a_late_failure_rolls_back_the_whole_run(registry: Registry) -> None:
    """The metric names an artifact that does not exist: found only after the run, its edges
    and its output were inserted, and none of them may stay."""
    base = base_model(registry)
    before = counts(registry)
    body = run_body(base)
    body["metrics"][0]["artifact_sha256"] = sha("nowhere")
    with pytest.raises(ArtifactNotFound, match="neither an output of this run nor registered"):
        record_run(registry, body, "token:w")
    assert counts(registry) == before
    with pytest.raises(ArtifactNotFound):
        registry.get_artifact(sha("ckpt"))
    assert registry.verify().ok


def test_unknown_inputs_and_conflicting_outputs_store_nothing(registry: Registry) -> None:
    base = base_model(registry)
    before = counts(registry)
    with pytest.raises(ArtifactNotFound):
        record_run(registry, run_body(999), "token:w")
    conflicting = run_body(base)
    conflicting["outputs"][0]["sha256"] = sha("base")  # registered with 4 bytes, not 10
    with pytest.raises(ArtifactConflict):
        record_run(registry, conflicting, "token:w")
    assert counts(registry) == before


def test_lone_surrogates_and_deep_nesting_are_refused_before_sql() -> None:
    """What cannot be stored or hashed as UTF-8 JSON is refused by name (the API's models
    catch it too; record_run is also called directly by workers and scripts)."""
    from quantmill.registry.remote import MAX_JSON_DEPTH, InvalidRun, _json

    with pytest.raises(InvalidRun, match="lone surrogate"):
        _json("recipe", {"name": "bad \ud800"})
    with pytest.raises(InvalidRun, match="lone surrogate"):
        _json("recipe", {"bad \udfff": 1})
    nested: object = 1
    for _ in range(MAX_JSON_DEPTH + 2):
        nested = [nested]
    with pytest.raises(InvalidRun, match="nested deeper than"):
        _json("details", nested)
