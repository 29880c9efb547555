"""The store API on SQLite and PostgreSQL: artifacts, runs, edges, metrics, transactions."""

import dataclasses
import hashlib
from datetime import UTC

import pytest

from quantmill.registry import (
    AmbiguousReference,
    Artifact,
    ArtifactConflict,
    ArtifactNotFound,
    NewArtifact,
    NewMetric,
    Registry,
    RunEdge,
    RunNotFound,
    RunStateError,
)

RECIPE = {"model": "smollm2-135m", "quantizer": {"name": "rtn", "bits": 4, "group_size": 128}}
PLUGINS = {"rtn": "0.1.0", "perplexity": "0.1.0"}
VERSIONS = {"quantmill": "0.1.0", "torch": "2.13.0", "python": "3.11"}


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def add_artifact(registry: Registry, label: str, kind: str = "model") -> Artifact:
    return registry.upsert_artifact(
        kind=kind,
        name=label,
        sha256=sha(label),
        size_bytes=len(label),
        uri=f"file:///store/{label}",
        format="gguf",
        metadata={"label": label},
    )


def start(registry: Registry, inputs: list[tuple[int, str]] = ()) -> int:  # type: ignore[assignment]
    run = registry.start_run(
        job_id="job-1",
        kind="quantization",
        name="rtn-4bit",
        recipe=RECIPE,
        plugins=PLUGINS,
        versions=VERSIONS,
        inputs=inputs,
    )
    return run.id


def test_upsert_artifact_is_idempotent_by_sha256(registry: Registry) -> None:
    first = add_artifact(registry, "base")
    again = registry.upsert_artifact(
        kind="checkpoint",
        name="another name",
        sha256=sha("base").upper(),
        size_bytes=len("base"),
        uri="s3://elsewhere",
        format="hf-safetensors",
    )
    assert again == first
    assert again.name == "base" and again.kind == "model" and again.metadata == {"label": "base"}
    assert [a.id for a in registry.list_artifacts()] == [first.id]
    assert first.created_at.tzinfo is UTC


def test_upsert_artifact_refuses_the_same_hash_with_another_size(registry: Registry) -> None:
    add_artifact(registry, "base")
    with pytest.raises(ArtifactConflict):
        registry.upsert_artifact(
            kind="model", name="x", sha256=sha("base"), size_bytes=999, uri="u", format="gguf"
        )


def test_upsert_artifact_rejects_a_malformed_hash(registry: Registry) -> None:
    with pytest.raises(ValueError, match="not a sha256"):
        registry.upsert_artifact(
            kind="model", name="x", sha256="abc", size_bytes=1, uri="u", format="gguf"
        )


def test_entities_are_frozen(registry: Registry) -> None:
    artifact = add_artifact(registry, "base")
    with pytest.raises(dataclasses.FrozenInstanceError):
        artifact.name = "changed"  # type: ignore[misc]


def test_list_artifacts_newest_first_with_filter_and_paging(registry: Registry) -> None:
    ids = [
        add_artifact(registry, f"a{i}", kind="dataset" if i % 2 else "model").id for i in range(5)
    ]
    assert [a.id for a in registry.list_artifacts()] == ids[::-1]
    assert [a.id for a in registry.list_artifacts(kind="dataset")] == [ids[3], ids[1]]
    assert [a.id for a in registry.list_artifacts(limit=2, offset=1)] == [ids[3], ids[2]]


def test_start_and_finish_run_record_edges_and_metrics(registry: Registry) -> None:
    base = add_artifact(registry, "base")
    eval_data = add_artifact(registry, "wikitext", kind="dataset")
    run = registry.start_run(
        job_id="job-1",
        kind="quantization",
        name="rtn-4bit",
        recipe=RECIPE,
        plugins=PLUGINS,
        versions=VERSIONS,
        flow_run_id="flow-123",
        details={"note": "first"},
        inputs=[(base.id, "base_model"), (eval_data.id, "eval_data")],
    )
    assert run.status == "running" and run.finished_at is None
    assert run.host and run.started_by
    assert run.recipe == RECIPE and len(run.recipe_sha256) == 64
    assert run.flow_run_id == "flow-123"

    checkpoint = NewArtifact(
        kind="checkpoint",
        name="base-rtn4",
        sha256=sha("ckpt"),
        size_bytes=4096,
        uri="file:///store/ckpt",
        format="gptq",
        role="quantized_checkpoint",
        metadata={"bits": 4},
    )
    protocol = {"windows": 40, "seq_len": 512}
    finished = registry.finish_run(
        run.id,
        outputs=[checkpoint],
        metrics=[
            NewMetric(
                evaluator="perplexity",
                name="perplexity",
                value=27.5,
                protocol=protocol,
                artifact_sha256=sha("ckpt"),
                dataset_artifact_id=eval_data.id,
            ),
            NewMetric(
                evaluator="size", name="size", value=4096, unit="bytes", artifact_sha256=sha("ckpt")
            ),
            NewMetric(
                evaluator="perplexity",
                name="perplexity",
                value=25.61,
                protocol=protocol,
                artifact_id=base.id,
                dataset_artifact_id=eval_data.id,
            ),
        ],
        details={"plan": {"model.layers.0.mlp": {"bits": 4, "group_size": 128}}},
    )
    assert finished.status == "succeeded"
    assert finished.finished_at is not None and finished.finished_at >= finished.started_at
    assert finished.details == {
        "note": "first",
        "plan": {"model.layers.0.mlp": {"bits": 4, "group_size": 128}},
    }
    assert registry.get_run(run.id) == finished

    ckpt = registry.get_artifact(sha("ckpt"))
    assert (ckpt.kind, ckpt.format, ckpt.metadata) == ("checkpoint", "gptq", {"bits": 4})
    assert registry.run_edges(run.id) == [
        RunEdge(run.id, base.id, "input", "base_model"),
        RunEdge(run.id, eval_data.id, "input", "eval_data"),
        RunEdge(run.id, ckpt.id, "output", "quantized_checkpoint"),
    ]
    ckpt_metrics = registry.metrics_for_artifact(ckpt.id)
    assert [(m.name, m.value, m.unit) for m in ckpt_metrics] == [
        ("perplexity", 27.5, None),
        ("size", 4096.0, "bytes"),
    ]
    assert ckpt_metrics[0].dataset_artifact_id == eval_data.id
    assert ckpt_metrics[0].protocol == protocol
    assert [m.value for m in registry.metrics_for_artifact(base.id)] == [25.61]
    assert len(registry.metrics_for_run(run.id)) == 3


def test_finish_run_accepts_existing_artifacts_as_outputs(registry: Registry) -> None:
    base = add_artifact(registry, "base")
    report = add_artifact(registry, "report", kind="report")
    run_id = start(registry, [(base.id, "base_model")])
    registry.finish_run(
        run_id,
        outputs=[(report.id, "report")],
        metrics=[
            NewMetric(evaluator="size", name="size", value=1.0, artifact_sha256=report.sha256)
        ],
    )
    assert RunEdge(run_id, report.id, "output", "report") in registry.run_edges(run_id)


def test_failing_finish_run_stores_nothing_and_fail_run_marks_it(registry: Registry) -> None:
    base = add_artifact(registry, "base")
    run_id = start(registry, [(base.id, "base_model")])
    new_output = NewArtifact(
        kind="checkpoint",
        name="ckpt",
        sha256=sha("ckpt"),
        size_bytes=10,
        uri="file:///c",
        format="gptq",
        role="quantized_checkpoint",
    )
    with pytest.raises(ArtifactNotFound, match=sha("nowhere")):
        registry.finish_run(
            run_id,
            outputs=[new_output],
            metrics=[
                NewMetric(evaluator="size", name="size", value=10, artifact_sha256=sha("ckpt")),
                NewMetric(evaluator="size", name="size", value=1, artifact_sha256=sha("nowhere")),
            ],
            details={"plan": "should not be stored"},
        )

    # Nothing of the failed call was committed: no artifact, no output edge, no metric.
    assert [a.id for a in registry.list_artifacts()] == [base.id]
    with pytest.raises(ArtifactNotFound):
        registry.get_artifact(sha("ckpt"))
    assert registry.metrics_for_run(run_id) == []
    assert [e.direction for e in registry.run_edges(run_id)] == ["input"]
    still = registry.get_run(run_id)
    assert still.status == "running" and still.finished_at is None and still.details == {}

    failed = registry.fail_run(run_id, "metric refers to an unknown artifact")
    assert failed.status == "failed"
    assert failed.error == "metric refers to an unknown artifact"
    assert failed.finished_at is not None
    assert registry.list_runs(status="failed") == [failed]


def test_runs_cannot_be_finished_twice(registry: Registry) -> None:
    run_id = start(registry)
    registry.finish_run(run_id)
    with pytest.raises(RunStateError, match="succeeded"):
        registry.finish_run(run_id)
    with pytest.raises(RunStateError):
        registry.fail_run(run_id, "late failure")
    with pytest.raises(RunNotFound):
        registry.fail_run(run_id + 100, "nope")


def test_start_run_with_an_unknown_input_stores_nothing(registry: Registry) -> None:
    with pytest.raises(ArtifactNotFound, match="12345"):
        start(registry, [(12345, "base_model")])
    assert registry.list_runs() == []


def test_list_runs_filters(registry: Registry) -> None:
    first = start(registry)
    second = registry.start_run(
        job_id="job-2", kind="calibration", name="c", recipe={}, plugins={}, versions={}
    ).id
    assert [r.id for r in registry.list_runs()] == [second, first]
    assert [r.id for r in registry.list_runs(job_id="job-1")] == [first]
    assert [r.id for r in registry.list_runs(kind="calibration")] == [second]
    assert registry.list_runs(status="succeeded") == []


def test_get_artifact_by_id_prefix_and_errors(registry: Registry) -> None:
    # Two hashes sharing a 6-character prefix, one with a different prefix.
    shared = "abcdef"
    first = registry.upsert_artifact(
        kind="model", name="one", sha256=shared + "0" * 58, size_bytes=1, uri="u1", format="gguf"
    )
    second = registry.upsert_artifact(
        kind="model", name="two", sha256=shared + "1" * 58, size_bytes=1, uri="u2", format="gguf"
    )

    assert registry.get_artifact(first.id) == first
    assert registry.get_artifact(first.sha256) == first
    assert registry.get_artifact(shared + "1") == second
    assert registry.get_artifact((shared + "0").upper()) == first

    with pytest.raises(AmbiguousReference, match=shared):
        registry.get_artifact(shared)
    with pytest.raises(ArtifactNotFound, match="999"):
        registry.get_artifact(999)
    with pytest.raises(ArtifactNotFound, match="123456"):
        registry.get_artifact("123456")
    with pytest.raises(ArtifactNotFound, match="at least|6 to 64"):
        registry.get_artifact("abc")
    with pytest.raises(ArtifactNotFound, match="not-hex"):
        registry.get_artifact("not-hex-at-all")


def test_find_metrics_reuses_identical_measurements(registry: Registry) -> None:
    base = add_artifact(registry, "base")
    wiki = add_artifact(registry, "wikitext", kind="dataset")
    other_data = add_artifact(registry, "c4", kind="dataset")
    protocol = {"seq_len": 512, "windows": 40}
    run_id = start(registry, [(base.id, "base_model")])
    registry.finish_run(
        run_id,
        metrics=[
            NewMetric(
                evaluator="perplexity",
                name="perplexity",
                value=25.61,
                protocol=protocol,
                artifact_id=base.id,
                dataset_artifact_id=wiki.id,
            ),
            NewMetric(
                evaluator="perplexity",
                name="perplexity",
                value=30.0,
                protocol={"seq_len": 256, "windows": 40},
                artifact_id=base.id,
                dataset_artifact_id=wiki.id,
            ),
            NewMetric(
                evaluator="latency",
                name="latency",
                value=0.5,
                unit="s",
                protocol=protocol,
                artifact_id=base.id,
            ),
        ],
    )
    # Same protocol written with another key order: same canonical hash.
    found = registry.find_metrics(
        artifact_id=base.id,
        evaluator="perplexity",
        protocol={"windows": 40, "seq_len": 512},
        dataset_artifact_id=wiki.id,
    )
    assert [m.value for m in found] == [25.61]
    assert found[0].run_id == run_id

    assert (
        registry.find_metrics(
            artifact_id=base.id,
            evaluator="perplexity",
            protocol=protocol,
            dataset_artifact_id=other_data.id,
        )
        == []
    )
    assert (
        registry.find_metrics(artifact_id=base.id, evaluator="perplexity", protocol=protocol) == []
    )
    latency = registry.find_metrics(artifact_id=base.id, evaluator="latency", protocol=protocol)
    assert [(m.value, m.unit) for m in latency] == [(0.5, "s")]


def test_new_metric_validates_its_reference_and_value() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        NewMetric(evaluator="e", name="n", value=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        NewMetric(evaluator="e", name="n", value=1.0, artifact_id=1, artifact_sha256=sha("x"))
    with pytest.raises(ValueError, match="non-finite"):
        NewMetric(evaluator="e", name="n", value=float("nan"), artifact_id=1)


def test_to_json_is_json_ready(registry: Registry) -> None:
    import json

    artifact = add_artifact(registry, "base")
    payload = json.loads(json.dumps(artifact.to_json()))
    assert payload["sha256"] == sha("base")
    assert payload["created_at"].endswith("+00:00")
    run = registry.get_run(start(registry, [(artifact.id, "base_model")]))
    assert json.loads(json.dumps(run.to_json()))["recipe"] == RECIPE


def test_concurrent_upserts_of_the_same_content_give_one_artifact(registry: Registry) -> None:
    """ON CONFLICT DO NOTHING + re-select: racing writers all get the one row, none fails."""
    from concurrent.futures import ThreadPoolExecutor

    def register(worker: int) -> int:
        return registry.upsert_artifact(
            kind="model",
            name=f"w{worker}",
            sha256=sha("same"),
            size_bytes=4,
            uri="u",
            format="gguf",
        ).id

    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = list(pool.map(register, range(16)))
    assert len(set(ids)) == 1
    assert len(registry.list_artifacts()) == 1
