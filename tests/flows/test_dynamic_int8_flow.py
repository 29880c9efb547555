"""A ``dynamic_int8`` recipe with ``compressed-tensors`` export runs end to end on a tiny Llama;
the checkpoint is measured from the written files; bad recipes stop before any work."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.registry import Registry

runner = CliRunner()


def test_dynamic_int8_recipe_runs_end_to_end(quantmill_home: Path, tiny_recipe) -> None:
    recipe = tiny_recipe(name="tiny-int8.yaml", calibration=None, quantization={
        "method": "dynamic_int8", "bits": None, "group_size": None, "sym": None},
        export={"format": "compressed-tensors"})
    # the merged dict still has rtn-only keys; drop them the way a user would write the recipe
    text = recipe.read_text()
    for line in ("  bits: null\n", "  group_size: null\n", "  sym: null\n"):
        text = text.replace(line, "")
    recipe.write_text(text)
    result = runner.invoke(app, ["run", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"

    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        [run] = [r for r in reg.list_runs() if r.kind == "quantization"]
        metrics = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
        base = next(a for a in reg.list_artifacts(kind="model"))
        assert reg.list_artifacts(kind="calibration_set") == []  # no calibration needed
        base_metrics = {m.name: m.value for m in reg.metrics_for_artifact(base.id)}
    assert ckpt.format == "compressed-tensors" and ckpt.metadata["method"] == "dynamic_int8"
    export = ckpt.metadata["export"]
    assert export["quantization_config"]["format"] == "int-quantized"
    assert export["ignore"] == ["lm_head"] and export["quantized_modules"] == 14
    scheme = run.details["quantizer"]["scheme"]
    assert "per token" in scheme["activations"] and "per output channel" in scheme["weights"]
    assert all(p["bits"] == 8 and p["group_size"] == -1 for p in run.details["plan"].values())
    # int8 with per-token activations barely moves a model's perplexity
    assert abs(metrics["perplexity"] / base_metrics["perplexity"] - 1) < 0.02
    assert 8.0 < metrics["bits_per_weight"] < 8.5
    assert metrics["disk_bytes"] < base_metrics["disk_bytes"]

    from quantmill.plugins.formats.compressed_tensors import CompressedTensorsSource
    from quantmill.plugins.models.int8_linear import Int8DynamicLinear
    from quantmill.storage.local import LocalStorage

    loaded = CompressedTensorsSource().load(LocalStorage().fetch(ckpt.uri), torch.device("cpu"))
    assert sum(isinstance(m, Int8DynamicLinear) for m in loaded.model.modules()) == 14
    assert torch.isfinite(loaded.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_bad_dynamic_int8_recipes_stop_before_any_work(quantmill_home: Path,
                                                       tiny_recipe) -> None:
    recipe = tiny_recipe(name="bits.yaml", quantization={"method": "dynamic_int8"},
                         export={"format": "compressed-tensors"})
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code != 0
    assert "unknown key 'quantization.bits'" in result.stderr  # int8 has no bits to choose

    recipe = tiny_recipe(name="four.yaml", export={"format": "compressed-tensors"})
    result = runner.invoke(app, ["run", str(recipe)])  # rtn 4-bit cannot be written as W8A8
    assert result.exit_code != 0
    assert "W8A8 int8 only" in result.stderr and "4-bit" in result.stderr
    with Registry.open() as reg:
        assert reg.list_artifacts(kind="checkpoint") == []
