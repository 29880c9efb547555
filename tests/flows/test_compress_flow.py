"""End to end through Prefect's embedded server: a recipe on a tiny random Llama runs
calibrate -> quantize -> evaluate -> upload -> register; reruns reuse what they can; a third-party
plugin installed as a real distribution runs from a recipe; a failing step registers nothing."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.registry import Registry

runner = CliRunner()
THIRD_PARTY_SRC = Path(__file__).parent / "thirdparty"


def _run_cli(*args: str) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    return result.stdout


@pytest.fixture(scope="module")
def third_party_plugin(tmp_path_factory: pytest.TempPathFactory):
    """Build and install the example plugin distribution into a private target directory and
    put it on sys.path, the way a site-packages install would be seen."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    for name in ("pyproject.toml", "qm_example_absmax.py"):
        (build / name).write_bytes((THIRD_PARTY_SRC / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(build)],
                   check=True, capture_output=True)
    assert list(target.glob("qm_example_absmax-0.3.1.dist-info"))
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("qm_example_absmax", None)
    importlib.invalidate_caches()


def test_recipe_runs_end_to_end(quantmill_home: Path, tiny_recipe,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)
    recipe = tiny_recipe()
    out = _run_cli("run", "--lineage", str(recipe))
    assert "perplexity" in out and "bits_per_weight" in out
    # the CLI quiets Prefect's console only: processes started from this one later (a test's
    # workers, a Dask LocalCluster) still send INFO lines to their runs' pages
    assert "PREFECT_LOGGING_LEVEL" not in os.environ
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert consoles and all(h.level == logging.WARNING for h in consoles)

    with Registry.open() as reg:
        checkpoints = reg.list_artifacts(kind="checkpoint")
        assert len(checkpoints) == 1
        ckpt = checkpoints[0]
        assert ckpt.format == "gptq" and ckpt.size_bytes > 0
        graph = reg.upstream(ckpt.id)
        kinds = {a.kind for a in graph.artifacts.values()}
        assert {"checkpoint", "model", "calibration_set", "dataset"} <= kinds
        assert {r.kind for r in graph.runs.values()} == {"quantization", "calibration"}
        assert all(r.status == "succeeded" and r.flow_run_id for r in graph.runs.values())
        run = next(r for r in graph.runs.values() if r.kind == "quantization")
        assert run.versions["torch"] == torch.__version__.split("+")[0] or run.versions["torch"]
        plan = run.details["plan"]
        assert len(plan) == 14 and all(p["bits"] == 4 for p in plan.values())  # 7 linears x 2
        ckpt_metrics = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
        base = next(a for a in graph.artifacts.values() if a.kind == "model")
        base_metrics = {m.name: m.value for m in reg.metrics_for_artifact(base.id)}
    assert ckpt_metrics["perplexity"] > 1 and base_metrics["perplexity"] > 1
    assert 4.0 < ckpt_metrics["bits_per_weight"] < 6.0 and "bits_per_weight" not in base_metrics
    assert ckpt_metrics["disk_bits_per_param"] < base_metrics["disk_bits_per_param"]
    assert ckpt_metrics["disk_bytes"] < base_metrics["disk_bytes"]
    assert "calibration_set" in out and "run #" in out  # the lineage tree was printed
    assert not (quantmill_home / "work").exists() or not any((quantmill_home / "work").iterdir())

    # the stored checkpoint loads as a runnable quantized model
    from quantmill.plugins.models.quant_linear import GPTQLinear
    from quantmill.plugins.models.sources import GPTQCheckpointSource
    from quantmill.storage.local import LocalStorage

    path = LocalStorage().fetch(ckpt.uri)
    loaded = GPTQCheckpointSource().load(path, torch.device("cpu"))
    assert sum(isinstance(m, GPTQLinear) for m in loaded.model.modules()) == 14
    logits = loaded.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()

    # the Prefect table artifact was published
    # (prefect 3.8.8's own read_artifacts sends nulls its server rejects: post the filter)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client._client.post("/artifacts/filter", json={
            "artifacts": {"key": {"any_": ["compress-tiny-rtn"]}}, "sort": "CREATED_DESC",
            "limit": 1, "offset": 0})  # newest: other tests' jobs may share the key
    [found] = response.json()
    assert found["type"] == "table" and "perplexity" in str(found["data"])

    # a rerun reuses the calibration set, the base-model metrics, and (RTN being deterministic)
    # finds the identical checkpoint
    _run_cli("run", str(recipe))
    with Registry.open() as reg:
        assert len(reg.list_artifacts(kind="checkpoint")) == 1
        assert len(reg.list_artifacts(kind="calibration_set")) == 1
        runs = reg.list_runs()
        assert sum(r.kind == "quantization" and r.status == "succeeded" for r in runs) == 2
        assert sum(r.kind == "calibration" for r in runs) == 1  # the set was reused, no new run
        assert len([m for m in reg.metrics_for_artifact(base.id) if m.name == "perplexity"]) == 1
        assert len([m for m in reg.metrics_for_artifact(ckpt.id) if m.name == "perplexity"]) == 2

    listing = _run_cli("artifacts", "list", "--kind", "checkpoint")
    assert f"│ {ckpt.id} " in listing and ckpt.sha256[:12] in listing
    shown = _run_cli("artifacts", "show", str(ckpt.id))
    assert ckpt.sha256 in shown


@pytest.mark.slow
def test_gptq_recipe_runs_end_to_end(quantmill_home: Path, tiny_recipe) -> None:
    recipe = tiny_recipe(name="tiny-gptq", quantization={
        "method": "gptq", "bits": 3, "group_size": 32, "desc_act": True, "damp_percent": 0.02,
        "block_tuning": {"epochs": 2, "norms": True}})
    _run_cli("run", str(recipe))
    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        [run] = [r for r in reg.list_runs() if r.kind == "quantization"]
        metrics = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
        [calib] = reg.list_artifacts(kind="calibration_set")
        inputs = {e.role: e.artifact_id for e in reg.run_edges(run.id) if e.direction == "input"}
    assert inputs["calibration_set"] == calib.id
    evaluation_file = reg.get_artifact(inputs["evaluation_data"])  # provenance of the metrics
    assert evaluation_file.kind == "dataset" and evaluation_file.name.endswith(".txt")
    assert run.details["quantizer"]["method"] == "gptq"
    layers = run.details["quantizer"]["layers"]
    assert len(layers) == 14 and all(v["damp_used"] >= 0.02 for v in layers.values())
    assert 3.0 < metrics["bits_per_weight"] < 4.5 and metrics["perplexity"] > 1
    assert ckpt.metadata["export"]["quantize_config"]["desc_act"] is True
    # block tuning ran on both blocks, and its losses are in the run's record
    tuning = run.details["quantizer"]["block_tuning_losses"]
    assert sorted(tuning) == ["model.layers.0", "model.layers.1"]
    assert all(t["kept"] and t["after"] < t["before"] for t in tuning.values())
    assert run.details["quantizer"]["block_tuning"]["norms"] is True


@pytest.mark.slow
def test_third_party_plugin_runs_from_recipe(quantmill_home: Path, tiny_recipe,
                                             third_party_plugin: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    stage_log = tmp_path / "stages.log"
    monkeypatch.setenv("QM_EXAMPLE_STAGE_LOG", str(stage_log))
    listing = _run_cli("plugins", "list")
    row = next(line for line in listing.splitlines() if " absmax " in line)
    assert "quantizer" in row and "qm-example-absmax 0.3.1" in row
    recipe = tiny_recipe(quantization={"method": "absmax", "bits": 8, "group_size": None,
                                       "sym": None})
    # the merged dict still has rtn-only keys; drop them the way a user would write the recipe
    text = recipe.read_text().replace("  group_size: null\n", "").replace("  sym: null\n", "")
    recipe.write_text(text)
    _run_cli("run", str(recipe))
    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        run = [r for r in reg.list_runs() if r.kind == "quantization"][0]
        metrics = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
    assert ckpt.metadata["method"] == "absmax"
    # the plugin's notification hooks saw every stage, then the recorded checkpoint
    lines = stage_log.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["register-inputs", "calibrate", "evaluate-base",
                                               "plan", "quantize", "evaluate", "publish",
                                               "register", "artifact"]
    assert all(ln.split()[1] in ("succeeded", "checkpoint") for ln in lines)
    assert any("qm_example_absmax" in k and v == "0.3.1" for k, v in run.plugins.items())
    assert 8.0 < metrics["bits_per_weight"] < 9.0


def test_failed_step_registers_nothing(quantmill_home: Path, tiny_recipe,
                                       third_party_plugin: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    stage_log = tmp_path / "stages.log"
    monkeypatch.setenv("QM_EXAMPLE_STAGE_LOG", str(stage_log))
    recipe = tiny_recipe(quantization={"method": "absmax", "fail_after": 3})
    text = recipe.read_text()
    for line in ("  bits: 4\n", "  group_size: 32\n", "  sym: false\n"):
        text = text.replace(line, "")
    recipe.write_text(text)
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code != 0
    with Registry.open() as reg:
        assert reg.list_artifacts(kind="checkpoint") == []
        runs = [r for r in reg.list_runs() if r.kind == "quantization"]
        assert [r.status for r in runs] == ["failed"]
        assert "absmax gave up" in runs[0].error
        assert reg.metrics_for_run(runs[0].id) == []
    assert stage_log.read_text().splitlines()[-1] == f"quantize failed {runs[0].id}"
    assert not (quantmill_home / "work").exists() or not any((quantmill_home / "work").iterdir())
