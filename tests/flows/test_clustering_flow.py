"""Clustering from a recipe, end to end through the compress flow on a tiny random Llama: the
``lut`` checkpoint is registered, measured from its files and loads as LUTLinear modules; the
``dequantized`` export is registered as a plain fp16 model labelled with what it came from;
impossible combinations and bad settings are refused before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.registry import Registry

runner = CliRunner()
CLUSTERING = {"method": "clustering", "bits": 3, "iterations": 5, "batch_size": 2}


def _recipe(tiny_recipe, quantization: dict, export: dict, name: str = "recipe.yaml") -> Path:
    """The tiny recipe with its quantization section replaced (not merged: rtn's group_size
    and sym are no clustering settings)."""
    path = tiny_recipe(name=name, export=export)
    data = yaml.safe_load(path.read_text())
    data["quantization"] = quantization
    data["name"] = f"tiny-clustering-{export['format']}"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run_cli(*args: str) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    return result.stdout


@pytest.mark.slow
def test_clustering_recipe_with_lut_export(quantmill_home: Path, tiny_recipe) -> None:
    _run_cli("run", str(_recipe(tiny_recipe, CLUSTERING, {"format": "lut"})))
    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        [run] = [r for r in reg.list_runs() if r.kind == "quantization"]
        metrics = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
    assert ckpt.format == "lut" and ckpt.metadata["method"] == "clustering"
    assert run.details["quantizer"]["compensate"] is True
    assert len(run.details["plan"]) == 14 and all(p["bits"] == 3
                                                   for p in run.details["plan"].values())
    qcfg = ckpt.metadata["export"]["quantization_config"]
    assert qcfg["quant_method"] == "quantmill_lut" and len(qcfg["modules"]) == 14
    # 3-bit indices plus one 8-entry fp16 codebook per row (inputs 64 or 128 wide)
    assert 3.0 + 128 / 128 <= metrics["bits_per_weight"] <= 3.0 + 128 / 64
    assert metrics["perplexity"] > 1

    from quantmill.plugins.formats.lut import LUTCheckpointSource
    from quantmill.plugins.models.lut_linear import LUTLinear
    from quantmill.storage.local import LocalStorage

    loaded = LUTCheckpointSource().load(LocalStorage().fetch(ckpt.uri), torch.device("cpu"))
    assert sum(isinstance(m, LUTLinear) for m in loaded.model.modules()) == 14
    assert torch.isfinite(loaded.model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
def test_clustering_recipe_with_dequantized_export(quantmill_home: Path, tiny_recipe) -> None:
    quantization = {**CLUSTERING, "bits": 2, "compensate": False}
    _run_cli("run", str(_recipe(tiny_recipe, quantization, {"format": "dequantized"})))
    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        metrics = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
    assert ckpt.format == "hf"
    export = ckpt.metadata["export"]
    assert export["dequantized"] is True
    assert export["dequantized_from"] == {"weight_kinds": ["codebook"], "bits": 2,
                                          "method": "clustering",
                                          "label": export["label"]}
    assert export["label"] == "fp16 weights dequantized from 2-bit codebook weights (clustering)"
    # read back by the plain hf source: no packed weights, so no bits_per_weight
    assert metrics["perplexity"] > 1 and "bits_per_weight" not in metrics


@pytest.mark.parametrize(("quantization", "export", "message"), [
    (CLUSTERING, {"format": "gptq"},
     "export format 'gptq' cannot write the codebook weights that method 'clustering' "
     "produces (it writes: uniform)"),
    ({"method": "rtn", "bits": 4, "group_size": 32}, {"format": "lut"},
     "export format 'lut' cannot write the uniform weights that method 'rtn' produces"),
    ({**CLUSTERING, "bits": 5}, {"format": "lut"}, "clustering bits must be one of 2, 3, 4, 8"),
    ({**CLUSTERING, "bits": 1}, {"format": "lut"}, "clustering bits must be one of 2, 3, 4, 8"),
    ({**CLUSTERING, "rows_per_codebook": 0}, {"format": "lut"},
     "quantization.rows_per_codebook"),
    # a spec the format cannot hold is refused before quantizing, not at export time
    ({"method": "rtn", "bits": 4, "group_size": 32}, {"format": "compressed-tensors"},
     "export format 'compressed-tensors' cannot write what method 'rtn' produces: it writes "
     "W8A8 int8 only (8-bit symmetric per-channel weights), not 4-bit asymmetric weights with "
     "group size 32"),
    ({"method": "rtn", "bits": 8, "group_size": -1, "sym": True,
      "allocator": "mixed_precision", "allocator_options": {"avg_bits": 6.0}},
     {"format": "compressed-tensors"}, "not 2-bit symmetric weights with group size 128"),
])
def test_refused_at_validation(tiny_recipe, quantization: dict, export: dict,
                               message: str) -> None:
    result = runner.invoke(app, ["validate", str(_recipe(tiny_recipe, quantization, export))])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_rtn_may_export_dequantized(tiny_recipe) -> None:
    quantization = {"method": "rtn", "bits": 4, "group_size": 32}
    result = runner.invoke(app, ["validate", str(_recipe(tiny_recipe, quantization,
                                                         {"format": "dequantized"}))])
    assert result.exit_code == 0, result.output
