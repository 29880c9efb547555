"""Recipes with ``allocator: mixed_precision`` run end to end on the tiny model (RTN and GPTQ):
the registry keeps the plan with its sensitivity table, the checkpoint holds the planned bits per
module, and the size evaluator's bits per weight stays within the budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.plugins.formats.gptq import module_spec
from quantmill.plugins.models.quant_linear import GPTQLinear
from quantmill.plugins.models.sources import GPTQCheckpointSource
from quantmill.registry import Registry
from quantmill.storage.local import LocalStorage

runner = CliRunner()
CANDIDATES = [{"bits": 2, "group_size": 32}, {"bits": 4, "group_size": 32},
              {"bits": 8, "group_size": 32}]
TIES = ["self_attn.q_proj|self_attn.k_proj|self_attn.v_proj"]


def _run(recipe: Path) -> None:
    result = runner.invoke(app, ["run", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


def _check_run(avg_bits: float, method: str) -> None:
    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        [run] = [r for r in reg.list_runs() if r.kind == "quantization"]
        metrics = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
    plan = run.details["plan"]
    details = run.details["plan_details"]
    assert len(plan) == 14 and {p["method"] for p in plan.values()} == {method}
    assert len({p["bits"] for p in plan.values()}) > 1  # a budget between formats: mixed
    # the sensitivity table, one row per module with a damage per candidate
    table = details["sensitivity"]
    assert set(table) == set(plan)
    assert all(set(row["damage"]) == {"w2g32", "w4g32", "w8g32"} for row in table.values())
    assert all(row["chosen"] == f"w{plan[n]['bits']}g32" for n, row in table.items())
    assert details["budget"] == {"avg_bits": avg_bits}
    assert details["achieved_avg_bits"] <= avg_bits
    # what was written is what was planned, and it is within budget as the size evaluator sees
    assert metrics["bits_per_weight"] <= avg_bits
    assert metrics["bits_per_weight"] == details["achieved_avg_bits"]
    quantize_config = ckpt.metadata["export"]["quantize_config"]
    for name, spec in plan.items():
        assert module_spec(name, quantize_config) == (spec["bits"], spec["group_size"])
    loaded = GPTQCheckpointSource().load(LocalStorage().fetch(ckpt.uri), torch.device("cpu"))
    for name, spec in plan.items():
        module = loaded.model.get_submodule(name)
        assert isinstance(module, GPTQLinear) and module.bits == spec["bits"]
    for block in (0, 1):
        qkv = {plan[f"model.layers.{block}.self_attn.{p}_proj"]["bits"] for p in "qkv"}
        assert len(qkv) == 1  # tied


@pytest.mark.slow
def test_mixed_precision_with_rtn_end_to_end(quantmill_home: Path, tiny_recipe) -> None:
    recipe = tiny_recipe(quantization={
        "method": "rtn", "allocator": "mixed_precision",
        "allocator_options": {"avg_bits": 4.6, "candidates": CANDIDATES, "tie": TIES,
                              "num_samples": 4, "fisher_samples": 2}})
    _run(recipe)
    _check_run(4.6, "rtn")


@pytest.mark.slow
def test_mixed_precision_with_gptq_end_to_end(quantmill_home: Path, tiny_recipe) -> None:
    recipe = tiny_recipe(name="tiny-gptq-mixed.yaml", quantization={
        "method": "gptq", "allocator": "mixed_precision",
        "allocator_options": {"avg_bits": 5.6, "candidates": CANDIDATES, "tie": TIES,
                              "num_samples": 4, "fisher_samples": 2}})
    _run(recipe)
    _check_run(5.6, "gptq")


def test_recipe_without_calibration_is_refused_before_running(quantmill_home: Path,
                                                               tiny_recipe) -> None:
    recipe = tiny_recipe(quantization={"method": "rtn", "allocator": "mixed_precision",
                                       "allocator_options": {"avg_bits": 4.0}})
    text = recipe.read_text()
    start = text.index("calibration:")
    end = text.index("quantization:")
    recipe.write_text(text[:start] + text[end:])
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code != 0
    assert "allocator 'mixed_precision' needs a 'calibration' section" in result.output


def test_bad_budget_is_refused_at_validation(quantmill_home: Path, tiny_recipe) -> None:
    recipe = tiny_recipe(quantization={"method": "rtn", "allocator": "mixed_precision",
                                       "allocator_options": {"avg_bits": -2}})
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code != 0
    assert "quantization.allocator_options.avg_bits" in result.output
    assert "greater than 0" in result.output


@pytest.mark.slow
def test_mixed_precision_with_rotated_gptq_end_to_end(quantmill_home: Path, tiny_recipe) -> None:
    """``rotation: hadamard``: the allocator measures and costs the rotated weights, the plan
    records the seed, and the checkpoint's linears rotate their inputs as planned."""
    recipe = tiny_recipe(name="tiny-gptq-rotated.yaml", quantization={
        "method": "gptq", "rotation": "hadamard", "rotation_seed": 7,
        "allocator": "mixed_precision",
        "allocator_options": {"avg_bits": 5.6, "candidates": CANDIDATES, "tie": TIES,
                              "num_samples": 4, "fisher_samples": 2}})
    _run(recipe)
    _check_run(5.6, "gptq")  # bits per weight measured on the checkpoint == planned (rotations
    #                          counted in both)
    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        [run] = [r for r in reg.list_runs() if r.kind == "quantization"]
    assert {p["rotation_seed"] for p in run.details["plan"].values()} == {7}
    assert run.details["plan_details"]["rotation_seed"] == 7
    assert ckpt.metadata["export"]["quantize_config"]["quant_method"] == "quantmill_rotated_gptq"
    assert ckpt.metadata["rotation"] == {"kind": "randomized_hadamard", "seeds": [7]}
    loaded = GPTQCheckpointSource().load(LocalStorage().fetch(ckpt.uri), torch.device("cpu"))
    modules = [m for m in loaded.model.modules() if isinstance(m, GPTQLinear)]
    assert len(modules) == 14 and all(m.rotated for m in modules)


def test_rotation_is_refused_by_a_format_without_rotations(quantmill_home: Path,
                                                           tiny_recipe) -> None:
    recipe = tiny_recipe(quantization={"method": "rtn", "bits": 8, "group_size": -1,
                                       "sym": True, "rotation": "hadamard"},
                         export={"format": "compressed-tensors"})
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code != 0
    assert "cannot write what method 'rtn' produces" in result.output
    assert "no input rotations" in result.output
