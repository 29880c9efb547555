"""``QuantizationResult.float_overrides``: every built-in exporter writes the overriding float
tensors in place of the model's (and the reader gets them back), and refuses overrides it
could only drop or mangle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from quantmill.plugins.base import (
    Exporter,
    LoadedModel,
    ModuleQuantSpec,
    QuantizationResult,
    QuantPlan,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.formats.compressed_tensors import CompressedTensorsExporter
from quantmill.plugins.formats.dequantized import DequantizedExporter
from quantmill.plugins.formats.gptq import GPTQExporter
from quantmill.plugins.formats.lut import LUTExporter
from quantmill.plugins.quantizers.clustering.algorithm import cluster_weight
from quantmill.plugins.quantizers.dynamic_int8.algorithm import quantize_weight
from quantmill.plugins.quantizers.rtn.algorithm import quantize_groups

NORMS = ("model.norm.weight", "model.layers.1.post_attention_layernorm.weight")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def result_for(model: torch.nn.Module, fmt: str, names: list[str],
               overrides: dict[str, torch.Tensor]) -> QuantizationResult:
    modules = dict(model.named_modules())
    weights, specs = {}, {}
    for name in names:
        w = modules[name].weight
        if fmt == "lut":
            weights[name], specs[name] = (cluster_weight(w, 4, iterations=3),
                                          ModuleQuantSpec(4, -1, False, "clustering"))
        elif fmt == "compressed-tensors":
            weights[name], specs[name] = quantize_weight(w), ModuleQuantSpec(8, -1, True, "x")
        else:
            weights[name], specs[name] = (quantize_groups(w, 4, 32, sym=False),
                                          ModuleQuantSpec(4, 32, False, "rtn"))
    return QuantizationResult(weights, QuantPlan(specs), {"method": "test"},
                              float_overrides=overrides)


EXPORTERS: dict[str, type[Exporter]] = {
    "gptq": GPTQExporter, "lut": LUTExporter, "dequantized": DequantizedExporter,
    "compressed-tensors": CompressedTensorsExporter}


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_every_builtin_exporter_writes_the_overrides(tmp_path: Path, fmt: str) -> None:
    model = tiny_llama()
    state = model.state_dict()
    overrides = {key: torch.rand_like(state[key]) + 2.0 for key in NORMS}
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    exporter = EXPORTERS[fmt]()
    assert exporter.accepts_float_overrides
    exporter.export(LoadedModel(model, None, tmp_path, "hf"),
                    result_for(model, fmt, names, overrides), tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    for key, value in overrides.items():
        assert torch.equal(tensors[key], value.half())
        assert not torch.equal(model.state_dict()[key], value)  # the model kept its own
    untouched = "model.layers.0.input_layernorm.weight"
    assert torch.equal(tensors[untouched], state[untouched].half())


def test_third_party_exporters_do_not_accept_overrides_by_default() -> None:
    assert Exporter.accepts_float_overrides is False


@pytest.mark.parametrize(("key", "value", "message"), [
    ("model.nowhere.weight", torch.ones(64), "names no tensor of the model"),
    ("lm_head.weight", torch.ones(128, 64), "tied to the input embedding"),
    ("model.layers.0.mlp.up_proj.weight", torch.ones(96, 64), "belongs to a quantized module"),
    ("model.norm.weight", torch.ones(32), r"has shape \(32,\), the model's tensor \(64,\)"),
    ("model.norm.weight", torch.full((64,), 1e6), "does not fit in fp16"),
])
def test_overrides_that_cannot_be_written_are_refused(
        tmp_path: Path, key: str, value: torch.Tensor, message: str) -> None:
    model = tiny_llama()
    result = result_for(model, "compressed-tensors", ["model.layers.0.mlp.up_proj"],
                        {key: value})
    with pytest.raises(QuantmillError, match=message):
        CompressedTensorsExporter().export(LoadedModel(model, None, tmp_path, "hf"), result,
                                           tmp_path / "out")
    assert not (tmp_path / "out").exists()
