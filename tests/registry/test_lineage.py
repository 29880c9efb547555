"""Lineage graphs (recursive CTE) on SQLite and PostgreSQL.

The history built here is a real compression job:

    wikitext-train ─┐
    base model ─────┴─(calibration run)─> calibration set ─┐
    base model ──────────────────────────────────────────────┼─(quantization run)─> checkpoint
    wikitext-test (eval data) ───────────────────────────────┘
    checkpoint ─(report run)─> report
"""

import hashlib
import json
from collections.abc import Callable
from typing import Any, Protocol

import pytest

from quantmill.registry import (
    ArtifactNotFound,
    LineageGraph,
    NewArtifact,
    NewMetric,
    Registry,
    RunEdge,
)

PROTOCOL = {"seq_len": 512, "windows": 40}


class CreatesDatabases(Protocol):
    """The ``databases`` fixture (conftest), as far as these tests use it."""

    def create(self, backend: str) -> str: ...


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def new_artifact(label: str, kind: str, fmt: str, role: str) -> NewArtifact:
    return NewArtifact(
        kind=kind,
        name=label,
        sha256=sha(label),
        size_bytes=100 + len(label),
        uri=f"file:///store/{label}",
        format=fmt,
        role=role,
    )


def build_history(registry: Registry) -> dict[str, int]:
    """Record the job above; return the ids by short name."""

    def put(label: str, kind: str, fmt: str) -> int:
        return registry.upsert_artifact(
            kind=kind,
            name=label,
            sha256=sha(label),
            size_bytes=100,
            uri=f"file:///{label}",
            format=fmt,
        ).id

    ids = {
        "base": put("smollm2-135m", "model", "gguf"),
        "raw": put("wikitext-train", "dataset", "text"),
        "eval": put("wikitext-test", "dataset", "text"),
    }
    calibration = registry.start_run(
        job_id="job-7",
        kind="calibration",
        name="calibrate",
        recipe={"samples": 128},
        plugins={"text-file": "0.1"},
        versions={"quantmill": "0.1.0"},
        inputs=[(ids["base"], "base_model"), (ids["raw"], "calibration_data")],
    )
    registry.finish_run(
        calibration.id,
        outputs=[
            new_artifact(
                "calib-128", "calibration_set", "safetensors-token-ids", "calibration_set"
            ),
        ],
    )
    ids["calib"] = registry.get_artifact(sha("calib-128")).id
    quantization = registry.start_run(
        job_id="job-7",
        kind="quantization",
        name="rtn-4bit",
        recipe={"bits": 4},
        plugins={"rtn": "0.1"},
        versions={"quantmill": "0.1.0"},
        inputs=[
            (ids["base"], "base_model"),
            (ids["calib"], "calibration_set"),
            (ids["eval"], "eval_data"),
        ],
    )
    registry.finish_run(
        quantization.id,
        outputs=[new_artifact("ckpt-rtn4", "checkpoint", "gptq", "quantized_checkpoint")],
        metrics=[
            NewMetric(
                evaluator="perplexity",
                name="perplexity",
                value=27.9,
                protocol=PROTOCOL,
                artifact_sha256=sha("ckpt-rtn4"),
                dataset_artifact_id=ids["eval"],
            ),
            NewMetric(
                evaluator="perplexity",
                name="perplexity",
                value=25.61,
                protocol=PROTOCOL,
                artifact_id=ids["base"],
                dataset_artifact_id=ids["eval"],
            ),
        ],
    )
    ids["ckpt"] = registry.get_artifact(sha("ckpt-rtn4")).id
    report = registry.start_run(
        job_id="job-8",
        kind="report",
        name="report",
        recipe={},
        plugins={},
        versions={},
        inputs=[(ids["ckpt"], "quantized_checkpoint")],
    )
    registry.finish_run(report.id, outputs=[new_artifact("report-1", "report", "text", "report")])
    ids["report"] = registry.get_artifact(sha("report-1")).id
    ids["run_calibration"] = calibration.id
    ids["run_quantization"] = quantization.id
    ids["run_report"] = report.id
    return ids


def test_upstream_of_the_checkpoint_is_the_whole_job(registry: Registry) -> None:
    ids = build_history(registry)
    graph = registry.upstream(ids["ckpt"])

    assert graph.root_id == ids["ckpt"] and graph.direction == "upstream"
    assert dict(graph.depths) == {
        ids["ckpt"]: 0,
        ids["base"]: 1,
        ids["calib"]: 1,
        ids["eval"]: 1,
        ids["raw"]: 2,
    }
    assert set(graph.artifacts) == set(graph.depths)
    assert graph.artifacts[ids["calib"]].kind == "calibration_set"
    assert set(graph.runs) == {ids["run_calibration"], ids["run_quantization"]}
    cal, quant = ids["run_calibration"], ids["run_quantization"]
    assert list(graph.edges) == sorted(
        [
            RunEdge(cal, ids["base"], "input", "base_model"),
            RunEdge(cal, ids["raw"], "input", "calibration_data"),
            RunEdge(cal, ids["calib"], "output", "calibration_set"),
            RunEdge(quant, ids["base"], "input", "base_model"),
            RunEdge(quant, ids["calib"], "input", "calibration_set"),
            RunEdge(quant, ids["eval"], "input", "eval_data"),
            RunEdge(quant, ids["ckpt"], "output", "quantized_checkpoint"),
        ],
        key=lambda e: (e.run_id, e.direction, e.artifact_id, e.role),
    )
    assert [(m.artifact_id, m.value) for m in graph.metrics] == [
        (ids["ckpt"], 27.9),
        (ids["base"], 25.61),
    ]


def test_upstream_respects_max_depth(registry: Registry) -> None:
    ids = build_history(registry)

    one = registry.upstream(ids["ckpt"], max_depth=1)
    assert set(one.artifacts) == {ids["ckpt"], ids["base"], ids["calib"], ids["eval"]}
    assert set(one.runs) == {ids["run_quantization"]}
    assert {e.run_id for e in one.edges} == {ids["run_quantization"]}
    assert len(one.edges) == 4

    zero = registry.upstream(ids["ckpt"], max_depth=0)
    assert set(zero.artifacts) == {ids["ckpt"]}
    assert zero.runs == {} and zero.edges == ()
    assert [m.artifact_id for m in zero.metrics] == [ids["ckpt"]]

    with pytest.raises(ValueError):
        registry.upstream(ids["ckpt"], max_depth=-1)


def test_downstream_of_the_base_model_reaches_the_checkpoint(registry: Registry) -> None:
    ids = build_history(registry)
    graph = registry.downstream(ids["base"])
    assert dict(graph.depths) == {
        ids["base"]: 0,
        ids["calib"]: 1,
        ids["ckpt"]: 1,
        ids["report"]: 2,
    }
    assert set(graph.runs) == {ids["run_calibration"], ids["run_quantization"], ids["run_report"]}
    # Inputs that are not downstream of the base model (raw text, eval data) are not included.
    assert ids["raw"] not in {e.artifact_id for e in graph.edges}
    assert ids["eval"] not in {e.artifact_id for e in graph.edges}

    shallow = registry.downstream(ids["base"], max_depth=1)
    assert set(shallow.artifacts) == {ids["base"], ids["calib"], ids["ckpt"]}
    assert ids["run_report"] not in shallow.runs


def test_leaf_and_unknown_artifacts(registry: Registry) -> None:
    ids = build_history(registry)
    leaf = registry.downstream(ids["report"])
    assert set(leaf.artifacts) == {ids["report"]} and leaf.runs == {}
    with pytest.raises(ArtifactNotFound, match="4242"):
        registry.upstream(4242)


def test_a_cycle_terminates(registry: Registry) -> None:
    """A run that outputs its own input (e.g. a no-op conversion) must not loop forever."""
    artifact = registry.upsert_artifact(
        kind="model", name="m", sha256=sha("m"), size_bytes=1, uri="u", format="gguf"
    )
    run = registry.start_run(
        job_id="j",
        kind="convert",
        name="noop",
        recipe={},
        plugins={},
        versions={},
        inputs=[(artifact.id, "base_model")],
    )
    registry.finish_run(run.id, outputs=[(artifact.id, "converted")])
    graph = registry.upstream(artifact.id, max_depth=50)
    assert dict(graph.depths) == {artifact.id: 0}
    assert set(graph.runs) == {run.id} and len(graph.edges) == 2


def _without_timestamps(value: Any) -> Any:
    """Drop fields that legitimately differ between two recordings of the same history."""
    if isinstance(value, dict):
        return {
            k: _without_timestamps(v)
            for k, v in value.items()
            if k not in {"created_at", "started_at", "finished_at"}
        }
    if isinstance(value, list):
        return [_without_timestamps(v) for v in value]
    return value


def _graphs(registry: Registry) -> list[LineageGraph]:
    ids = build_history(registry)
    return [
        registry.upstream(ids["ckpt"]),
        registry.upstream(ids["ckpt"], max_depth=1),
        registry.downstream(ids["base"]),
    ]


@pytest.mark.postgres
def test_sqlite_and_postgresql_give_the_same_graphs(
    databases: CreatesDatabases, open_registry: Callable[[str], Registry]
) -> None:
    on_sqlite = _graphs(open_registry(databases.create("sqlite")))
    on_postgresql = _graphs(open_registry(databases.create("postgresql")))
    as_json = [json.dumps(_without_timestamps(g.to_json()), sort_keys=True) for g in on_sqlite]
    assert as_json == [
        json.dumps(_without_timestamps(g.to_json()), sort_keys=True) for g in on_postgresql
    ]
    assert len(on_sqlite[0].artifacts) == 5
