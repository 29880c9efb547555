"""A recipe with ``method: trellis`` runs end to end on the tiny model (the quantmill-trellis
checkpoint, or fp16 through ``dequantized``), and recipes the method cannot serve are refused at
validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.plugins.formats.trellis import TrellisCheckpointSource, TrellisLinear
from quantmill.plugins.hadamard import split_dimension
from quantmill.registry import Registry
from quantmill.storage.local import LocalStorage

runner = CliRunner()


def _trellis_recipe(tiny_recipe, name: str, quantization: dict, **overrides) -> Path:
    """The tiny recipe with exactly this quantization section (not merged into rtn's)."""
    path = tiny_recipe(name=name, **overrides)
    recipe = yaml.safe_load(path.read_text())
    recipe["quantization"] = {"method": "trellis", **quantization}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_trellis_recipe_runs_end_to_end(quantmill_home: Path, tiny_recipe) -> None:
    recipe = _trellis_recipe(tiny_recipe, "tiny-trellis.yaml", {"bits": 3, "state_bits": 8},
                             export={"format": "trellis"})
    result = runner.invoke(app, ["run", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        [run] = [r for r in reg.list_runs() if r.kind == "quantization"]
        metrics = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
        base = next(a for a in reg.upstream(ckpt.id).artifacts.values() if a.kind == "model")
        base_ppl = next(m.value for m in reg.metrics_for_artifact(base.id)
                        if m.name == "perplexity")
    details = run.details["quantizer"]
    assert details["method"] == "trellis" and details["rotation"] == "hadamard"
    assert len(details["layers"]) == 14
    # what the weights cost stored as trellis paths: 3 bits, one fp16 scale per row and per
    # input column of each module, and each module's rotation
    plan = run.details["plan"]
    assert {p["rotation_seed"] for p in plan.values()} == {0}
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    bits = numel = 0
    for out, inp in shapes.values():
        m, _ = split_dimension(inp)
        bits += 2 * (3 * out * inp + 16 * (out + inp) + 8 * inp + 32 * m * m)
        numel += 2 * out * inp
    assert details["trellis_bits_per_weight"] == bits / numel
    # the checkpoint holds the paths: the size evaluator measures what the quantizer reported
    assert metrics["bits_per_weight"] == pytest.approx(bits / numel, rel=1e-12)
    assert ckpt.format == "trellis"
    # 3-bit paths at L=8 on a random tiny model barely move its function; broken paths would
    # (random weights) multiply it
    assert abs(metrics["perplexity"] / base_ppl - 1) < 0.02
    loaded = TrellisCheckpointSource().load(LocalStorage().fetch(ckpt.uri), torch.device("cpu"))
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, TrellisLinear)


def test_trellis_recipes_the_method_cannot_serve_are_refused(quantmill_home: Path,
                                                           tiny_recipe) -> None:
    recipe = _trellis_recipe(tiny_recipe, "gptq.yaml", {"bits": 3})  # export: gptq
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code != 0
    assert "cannot write the trellis weights that method 'trellis' produces" in result.output
    recipe = _trellis_recipe(tiny_recipe, "bad.yaml", {"bits": 8, "state_bits": 8},
                             export={"format": "dequantized"})
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code != 0
    assert "bits (8) must be below state_bits (8)" in result.output


@pytest.mark.slow
def test_mixed_precision_plans_trellis_formats(quantmill_home: Path, tiny_recipe) -> None:
    """The allocator costs trellis formats as the quantizer stores them (paths, scales and
    rotations), so the plan's average bits are what the weights cost."""
    candidates = [{"bits": b, "group_size": 128} for b in (2, 3, 4)]
    recipe = _trellis_recipe(
        tiny_recipe, "tiny-trellis-mixed.yaml",
        {"bits": 3, "state_bits": 8, "allocator": "mixed_precision",
         "allocator_options": {"avg_bits": 4.0, "candidates": candidates, "num_samples": 4,
                               "fisher_samples": 2}},
        export={"format": "dequantized"})
    result = runner.invoke(app, ["run", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    with Registry.open() as reg:
        [run] = [r for r in reg.list_runs() if r.kind == "quantization"]
    plan, details = run.details["plan"], run.details["plan_details"]
    assert details["weight_kind"] == "trellis"
    assert len({p["bits"] for p in plan.values()}) > 1  # a budget between formats
    assert details["achieved_avg_bits"] <= 4.0
    assert details["achieved_avg_bits"] == pytest.approx(
        run.details["quantizer"]["trellis_bits_per_weight"], rel=1e-12)
    assert {m["bits"] for m in run.details["quantizer"]["layers"].values()} == \
        {p["bits"] for p in plan.values()}
