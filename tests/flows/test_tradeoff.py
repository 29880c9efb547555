"""The trade-off batch: bad batch files are refused before any work; a tiny batch runs end to end
through the CLI (each point a registered compress run), writes JSON, markdown and PNG whose
numbers are the registry's, reports a failing point and goes on, and a rerun skips what is
registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.plugins.reporting.pareto import pareto_front
from quantmill.registry import Registry

runner = CliRunner()


def _base(tiny_model_dir: Path, wikitext_dir: Path) -> dict:
    return {
        "model": {"path": str(tiny_model_dir), "source": "hf"},
        "calibration": {"source": "text", "path": str(wikitext_dir / "valid.txt"),
                        "num_samples": 4, "seq_len": 32, "seed": 0},
        "evaluation": [{"evaluator": "perplexity", "dataset": str(wikitext_dir / "test.txt"),
                        "seq_len": 64, "max_windows": 4, "batch_size": 2},
                       {"evaluator": "size"}],
        "export": {"format": "gptq"},
        "device": "cpu",
    }


def _write(tmp_path: Path, batch: dict) -> Path:
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(batch, sort_keys=False))
    return path


RTN_POINT = {"label": "rtn-w4", "quantization": {"method": "rtn", "bits": 4, "group_size": 32}}

BAD_BATCHES = [
    ("unknown top-level key", lambda b: {**b, "pointz": []}, "unknown key 'pointz'"),
    ("unknown base key", lambda b: {**b, "base": {**b["base"], "modell": {}}},
     "unknown key 'base.modell'"),
    ("quantization in base", lambda b: {**b, "base": {**b["base"], "quantization": {}}},
     "unknown key 'base.quantization'"),
    ("unknown method", lambda b: {**b, "points": [
        RTN_POINT, {"label": "x", "quantization": {"method": "nope", "bits": 4}}]},
     "batch point 'x': unknown quantizer 'nope'"),
    ("bad option in a later point", lambda b: {**b, "points": [
        RTN_POINT, {"label": "rtn-bad", "quantization": {"method": "rtn", "bitz": 4}}]},
     "batch point 'rtn-bad': unknown key 'quantization.bitz'"),
    ("empty points", lambda b: {**b, "points": []}, "it has no points"),
    ("duplicate labels", lambda b: {**b, "points": [RTN_POINT, RTN_POINT]},
     "two points are labelled 'rtn-w4'"),
    ("bad label", lambda b: {**b, "points": [{**RTN_POINT, "label": "a b"}]},
     "invalid 'points.0.label'"),
    ("mixed method not in methods", lambda b: {**b, "matrix": {
        "bits": [4], "methods": {"rtn": {}},
        "mixed_precision": {"method": "gptq", "budgets": [3.0]}}},
     "matrix.mixed_precision.method 'gptq' is not one of matrix.methods (rtn)"),
    ("budget in allocator options", lambda b: {**b, "matrix": {
        "methods": {"rtn": {}},
        "mixed_precision": {"method": "rtn", "budgets": [3.0],
                            "allocator_options": {"avg_bits": 3}}}},
     "allocator_options sets 'avg_bits'"),
    ("bits in a matrix method", lambda b: {**b, "matrix": {
        "bits": [4], "methods": {"rtn": {"quantization": {"bits": 3}}}}},
     "matrix.methods.rtn.quantization sets 'bits'"),
    ("negative budget", lambda b: {**b, "matrix": {
        "methods": {"rtn": {}}, "mixed_precision": {"method": "rtn", "budgets": [-1.0]}}},
     "invalid 'matrix.mixed_precision.budgets.0'"),
    ("codebooks into the gptq format", lambda b: {**b, "points": [
        {"label": "c3", "quantization": {"method": "clustering", "bits": 3}}]},
     "batch point 'c3': export format 'gptq' cannot write the codebook weights"),
]


@pytest.mark.parametrize("case", BAD_BATCHES, ids=[c[0] for c in BAD_BATCHES])
def test_bad_batch_is_refused_before_any_work(case, quantmill_home: Path, tmp_path: Path,
                                              tiny_model_dir: Path, wikitext_dir: Path) -> None:
    _, mutate, message = case
    batch = mutate({"name": "tiny", "base": _base(tiny_model_dir, wikitext_dir)})
    if "points" not in batch and "matrix" not in batch:
        batch["points"] = [RTN_POINT]
    out = tmp_path / "report"
    result = runner.invoke(app, ["tradeoff", str(_write(tmp_path, batch)), "--out", str(out)],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one clear line
    assert not out.exists()
    with Registry.open() as reg:
        assert reg.list_runs() == [] and reg.list_artifacts() == []


def test_missing_or_non_mapping_batch_file(quantmill_home: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["tradeoff", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "batch file not found" in result.stderr
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    result = runner.invoke(app, ["tradeoff", str(tmp_path / "list.yaml")])
    assert result.exit_code == 2 and "must be a mapping" in result.stderr


def _check_against_registry(report: dict) -> None:
    with Registry.open() as reg:
        for row in report["points"]:
            if row["status"] == "failed":
                continue
            run = reg.get_run(row["run_id"])
            assert run.status == "succeeded" and run.recipe_sha256 == row["recipe_sha256"]
            edges = {(e.direction, e.role): e.artifact_id for e in reg.run_edges(run.id)}
            ckpt = edges[("output", "quantized_checkpoint")]
            assert row["checkpoint_id"] == ckpt
            stored = {m.name: m.value for m in reg.metrics_for_run(run.id)
                      if m.artifact_id == ckpt}
            assert row["perplexity"] == stored["perplexity"] > 1
            assert row["size_mb"] == stored["disk_mb"] > 0
            assert row["bits_per_weight"] == stored["bits_per_weight"]
            assert row["quantize_s"] == run.details["quantize_seconds"]
            duration = (run.finished_at - run.started_at).total_seconds()
            assert row["wall_s"] == pytest.approx(duration, abs=1e-3)
        ref = report["reference"]
        base = {m.name: m.value for m in reg.metrics_for_artifact(ref["base_model_id"])}
    assert ref["perplexity"] == base["perplexity"]
    assert ref["size_mb"] == pytest.approx(base["param_count"] * 2 / 1e6)


@pytest.mark.slow
def test_tiny_batch_end_to_end_and_rerun(quantmill_home: Path, tmp_path: Path,
                                         tiny_model_dir: Path, wikitext_dir: Path) -> None:
    batch = {
        "name": "tiny",
        "base": _base(tiny_model_dir, wikitext_dir),
        "matrix": {"bits": [4], "methods": {"rtn": {"quantization": {"group_size": 32}}},
                   # 1 bit per weight is below any candidate: fails when the plan is made
                   "mixed_precision": {"method": "rtn", "budgets": [1.0]}},
        "points": [{"label": "gptq-w3",
                    "quantization": {"method": "gptq", "bits": 3, "group_size": 32}}],
    }
    path = _write(tmp_path, batch)
    out = tmp_path / "report"
    result = runner.invoke(app, ["tradeoff", str(path), "--out", str(out)],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 1, f"{result.output}\n{result.exception!r}"  # one point failed
    assert "1 point(s) failed: rtn-mixed-1" in result.stderr
    for label in ("base model", "rtn-w4", "rtn-mixed-1", "gptq-w3", "Pareto front"):
        assert label in result.stdout

    report = json.loads((out / "tradeoff.json").read_text())
    rows = {r["label"]: r for r in report["points"]}
    assert [r["label"] for r in report["points"]] == ["rtn-w4", "rtn-mixed-1", "gptq-w3"]
    assert [r["status"] for r in report["points"]] == ["succeeded", "failed", "succeeded"]
    assert "below the minimum" in rows["rtn-mixed-1"]["error"]
    assert rows["rtn-mixed-1"]["budget"] == 1.0 and rows["rtn-w4"]["bits"] == 4
    assert 4.0 < rows["rtn-w4"]["bits_per_weight"] < 6.0
    assert 3.0 < rows["gptq-w3"]["bits_per_weight"] < 5.0
    assert rows["rtn-w4"]["measured_base"] and not rows["gptq-w3"]["measured_base"]
    _check_against_registry(report)

    # the front is the one of the measured points, and the plot drew those points
    measured = [r for r in report["points"] if r["status"] != "failed"]
    front = {measured[i]["label"]
             for i in pareto_front([(r["size_mb"], r["perplexity"]) for r in measured])}
    assert set(report["pareto_front"]) == front and front
    assert all(r["pareto"] == (r["label"] in front) for r in report["points"])
    assert report["plot"]["points"] == 2 and report["plot"]["left_out"] == ["rtn-mixed-1"]
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    markdown = (out / "tradeoff.md").read_text()
    assert f"Command: `quantmill tradeoff {path} --out {out}`" in markdown
    assert "| base model |" in markdown and "![perplexity against size](tradeoff.png)" \
        in markdown
    assert "## Failed points" in markdown and "- rtn-mixed-1: " in markdown

    with Registry.open() as reg:
        runs = reg.list_runs(kind="quantization")
        assert sorted(r.status for r in runs) == ["failed", "succeeded", "succeeded"]
        assert {r.job_id for r in runs} == {report["job_id"]}  # one job: the batch
        [failed] = [r for r in runs if r.status == "failed"]
        assert rows["rtn-mixed-1"]["run_id"] == failed.id and "below the minimum" in failed.error

    # a rerun (here without the failing budget) takes the registered points from the registry:
    # nothing runs again, and the report is the same
    del batch["matrix"]["mixed_precision"]
    _write(tmp_path, batch)
    again = runner.invoke(app, ["tradeoff", str(path), "--out", str(out)],
                          env={"COLUMNS": "300"})
    assert again.exit_code == 0, f"{again.output}\n{again.exception!r}"
    second = json.loads((out / "tradeoff.json").read_text())
    assert [r["status"] for r in second["points"]] == ["reused", "reused"]
    first = [r for r in report["points"] if r["status"] == "succeeded"]
    for before, after in zip(first, second["points"], strict=True):
        for key in ("label", "run_id", "perplexity", "size_mb", "wall_s", "pareto"):
            assert after[key] == before[key]
    assert second["reference"]["perplexity"] == report["reference"]["perplexity"]
    with Registry.open() as reg:
        statuses = sorted(r.status for r in reg.list_runs(kind="quantization"))
    assert statuses == ["failed", "succeeded", "succeeded"]


def test_shipped_batch_expands_to_the_issue_matrix() -> None:
    from quantmill.flows.batch import batch_from_text, expand, load_batch_text, plan_batch
    from quantmill.flows.recipe import build_plugin
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager

    path = Path(__file__).resolve().parents[2] / "examples" / "batches" / "tradeoff-smollm2.yaml"
    catalog = Catalog(get_plugin_manager(load_entrypoints=False))
    plan = plan_batch(load_batch_text(path), path, catalog, resolve=False)  # no demo model here
    assert [p.label for p in plan.points] == [
        f"{m}-w{b}" for m in ("rtn", "gptq", "clustering") for b in (2, 3, 4)
    ] + [f"gptq-mixed-{b}" for b in ("2.5", "3", "3.5", "4", "4.5")]
    assert [p.budget for p in plan.points[9:]] == [2.5, 3.0, 3.5, 4.0, 4.5]
    assert len({p.recipe_sha256 for p in plan.points}) == 14
    # every point's plugins accept their settings, and each exporter takes its quantizer's weights
    for label, recipe, _ in expand(batch_from_text(load_batch_text(path), path)):
        q = recipe["quantization"]
        options = {k: v for k, v in q.items() if k not in ("method", "allocator",
                                                            "allocator_options")}
        quantizer = build_plugin(catalog.quantizers, q["method"], options, label, path.parent)
        allocator = build_plugin(catalog.bit_allocators, q.get("allocator", "uniform"),
                                 q.get("allocator_options", {}), label, path.parent)
        export = dict(recipe["export"])
        exporter = build_plugin(catalog.exporters, export.pop("format"), export, label,
                                path.parent)
        assert quantizer.weight_kind in exporter.accepts_weight_kinds, label
        assert allocator.name == ("mixed_precision" if "mixed" in label else "uniform")
        assert quantizer.default_spec().bits == q["bits"]
