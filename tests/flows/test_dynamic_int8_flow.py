"""A ``dynamic_int8`` recipe with ``compressed-tensors`` export runs end to end on a tiny Llama;
the checkpoint is measured from the written files; bad recipes stop before any work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.registry import Registry

runner = CliRunner()



def write_int8_recipe(tiny_recipe, name: str, options: dict, **sections) -> Path:
    """A dynamic_int8 recipe without the base recipe's rtn-only keys (bits, group_size, sym),
    as a user would write it."""
    recipe = tiny_recipe(name=name, quantization={"method": "dynamic_int8", **options},
                         export={"format": "compressed-tensors"}, **sections)
    text = recipe.read_text()
    for key in ("bits", "group_size", "sym"):
        text = re.sub(rf"^  {key}: .*\n", "", text, flags=re.MULTILINE)
    recipe.write_text(text)
    return recipe


def run_int8_recipe(tiny_recipe, name: str, options: dict, **sections) -> None:
    """Write a dynamic_int8 recipe and run it through the CLI."""
    recipe = write_int8_recipe(tiny_recipe, name, options, **sections)
    result = runner.invoke(app, ["run", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


@pytest.mark.slow
def test_dynamic_int8_recipe_runs_end_to_end(quantmill_home: Path, tiny_recipe) -> None:
    run_int8_recipe(tiny_recipe, "tiny-int8.yaml", {"smooth": False,
                                                     "skip": ["lm_head", "*embed*"]},
                    calibration=None)

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

    # smoothing (the default) needs calibration: the error says how to do without
    recipe = write_int8_recipe(tiny_recipe, "no-calibration.yaml", {}, calibration=None)
    result = runner.invoke(app, ["run", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code != 0
    message = " ".join(result.stderr.split())
    assert "method 'dynamic_int8' needs a 'calibration' section" in message
    assert "smooth: false" in message
    with Registry.open() as reg:
        assert reg.list_artifacts(kind="checkpoint") == []


@pytest.mark.slow
def test_smoothed_int8_recipe_with_int8_lm_head(quantmill_home: Path, tiny_recipe,
                                                tiny_model_dir: Path, wikitext_dir: Path
                                                ) -> None:
    """The defaults (SmoothQuant, alpha per group, int8 lm_head) through the whole job:
    calibration is drawn and registered, the registry says what was smoothed, the checkpoint
    computes what the in-memory quantized model computes, and the tied input embedding keeps
    its values."""
    run_int8_recipe(tiny_recipe, "tiny-int8-smooth.yaml", {"batch_size": 2})

    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        [run] = [r for r in reg.list_runs() if r.kind == "quantization"]
        assert len(reg.list_artifacts(kind="calibration_set")) == 1
        metrics = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
        base = next(a for a in reg.list_artifacts(kind="model"))
        base_metrics = {m.name: m.value for m in reg.metrics_for_artifact(base.id)}
    smoothing = run.details["quantizer"]["smoothing"]
    assert smoothing["used"] and smoothing["alpha"] == "auto" and len(smoothing["alphas"]) == 7
    assert len(smoothing["smoothed_groups"]) == 7 and "lm_head" in smoothing["smoothed_groups"]
    assert ckpt.metadata["export"]["ignore"] == [] and ckpt.metadata["export"][
        "quantized_modules"] == 15
    assert abs(metrics["perplexity"] / base_metrics["perplexity"] - 1) < 0.02

    from quantmill.plugins.base import QuantPlan
    from quantmill.plugins.calibration.text import TextCalibrationSource
    from quantmill.plugins.formats.compressed_tensors import CompressedTensorsSource
    from quantmill.plugins.models.int8_linear import Int8DynamicLinear
    from quantmill.plugins.models.modules import quantizable_linears
    from quantmill.plugins.models.sources import HFDirectorySource
    from quantmill.plugins.quantizers.dynamic_int8.plugin import DynamicInt8Quantizer
    from quantmill.storage.local import LocalStorage

    loaded = CompressedTensorsSource().load(LocalStorage().fetch(ckpt.uri), torch.device("cpu"))
    assert isinstance(loaded.model.lm_head, Int8DynamicLinear)
    assert loaded.model.config.tie_word_embeddings is False
    base_model = HFDirectorySource().load(tiny_model_dir, torch.device("cpu"))
    assert torch.equal(loaded.model.model.embed_tokens.weight,
                       base_model.model.model.embed_tokens.weight.half().float())

    # the same job in memory: same calibration ids, same quantizer settings
    calibration = TextCalibrationSource.from_options({
        "path": wikitext_dir / "valid.txt", "num_samples": 4, "seq_len": 32, "seed": 0,
    }).build(base_model.tokenizer)
    quantizer = DynamicInt8Quantizer.from_options({"batch_size": 2})
    names = quantizable_linears(base_model.model, quantizer.skip_patterns())
    quantized = quantizer.quantize(base_model.model, QuantPlan(
        {n: quantizer.default_spec() for n in names}), calibration)
    model = base_model.model
    model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features,
                                    bias=False)
    state = model.state_dict()
    state.update(quantized.float_overrides)
    model.load_state_dict(state)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    for name, qw in quantized.weights.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8DynamicLinear.from_quantized(qw))
    ids = torch.tensor([[1, 2, 3, 4, 50, 60, 70, 80]])
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, loaded.model(input_ids=ids).logits
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_an_exporter_that_cannot_write_float_overrides_is_refused_up_front(
        quantmill_home: Path, tiny_recipe, monkeypatch) -> None:
    """Smoothing changes norms that only ``float_overrides`` carry: an exporter that does not
    declare it writes them would produce a checkpoint that is not the quantized model. The
    quantizer says so from its settings, so the recipe is refused before any work; without
    smoothing the same exporter is fine."""
    from quantmill.plugins.formats.compressed_tensors import CompressedTensorsExporter

    monkeypatch.setattr(CompressedTensorsExporter, "accepts_float_overrides", False)
    recipe = write_int8_recipe(tiny_recipe, "no-overrides.yaml", {})
    result = runner.invoke(app, ["validate", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code != 0
    message = " ".join(result.stderr.split())
    assert ("method 'dynamic_int8' with these settings changes float tensors (e.g. norm "
            "weights) that export format 'compressed-tensors' cannot write") in message

    recipe = write_int8_recipe(tiny_recipe, "no-smoothing.yaml", {"smooth": False})
    result = runner.invoke(app, ["validate", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output


def test_undeclared_float_overrides_are_still_refused_before_export(
        quantmill_home: Path, tiny_recipe, monkeypatch) -> None:
    """A (third-party) quantizer that returns overrides without declaring
    ``changes_float_tensors`` passes the recipe check; the job then stops after quantizing,
    before writing anything (the step functions in the flow's order, no Prefect server)."""
    from quantmill.flows import tasks
    from quantmill.flows.context import JobRef, RunContext
    from quantmill.plugins.errors import QuantmillError
    from quantmill.plugins.formats.compressed_tensors import CompressedTensorsExporter
    from quantmill.plugins.quantizers.dynamic_int8.plugin import DynamicInt8Quantizer

    monkeypatch.setattr(CompressedTensorsExporter, "accepts_float_overrides", False)
    # the declaration is set per instance in __init__: make it read False whatever is set
    monkeypatch.setattr(DynamicInt8Quantizer, "changes_float_tensors",
                        property(lambda self: False, lambda self, value: None))
    recipe = write_int8_recipe(tiny_recipe, "undeclared.yaml", {})
    ctx = RunContext.of(JobRef(recipe.read_text(), str(recipe), "job-no-overrides", None))
    inputs = tasks.register_inputs_step(ctx)
    calibration = tasks.calibrate_step(ctx, inputs)
    plan = tasks.plan_step(ctx, calibration)
    with pytest.raises(QuantmillError, match=r"changed 5 float tensor\(s\).*'compressed-tensors'"
                                             r" cannot write"):
        tasks.quantize_and_export(ctx, inputs, calibration, plan)
    assert not (ctx.work_dir / "checkpoint").exists()
    ctx.close()
