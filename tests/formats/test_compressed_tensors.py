"""compressed-tensors W8A8 int8 checkpoints: write a tiny quantized Llama, read it back exactly,
and refuse what the format (or quantmill's reader) cannot hold."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from quantmill.plugins.base import (
    ClusteredWeight,
    LoadedModel,
    QuantizationResult,
    QuantPlan,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.formats.compressed_tensors import (
    CompressedTensorsExporter,
    CompressedTensorsSource,
    load_compressed_tensors_checkpoint,
    write_compressed_tensors_checkpoint,
)
from quantmill.plugins.models.int8_linear import Int8DynamicLinear
from quantmill.plugins.models.modules import quantizable_linears
from quantmill.plugins.models.sources import HFDirectorySource
from quantmill.plugins.quantizers.dynamic_int8.plugin import DynamicInt8Quantizer
from quantmill.plugins.quantizers.rtn.algorithm import quantize_groups


def tiny_llama(bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so a lost tensor shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def quantize(model: torch.nn.Module, skip: list[str] | None = None) -> QuantizationResult:
    quantizer = DynamicInt8Quantizer.from_options(
        {"smooth": False, "skip": ["lm_head", "*embed*"] if skip is None else skip})
    names = quantizable_linears(model, quantizer.skip_patterns())
    return quantizer.quantize(model, QuantPlan({n: quantizer.default_spec() for n in names}),
                              None)


def write(tmp_path: Path, bias: bool = False, skip: list[str] | None = None
          ) -> tuple[LlamaForCausalLM, QuantizationResult, Path, dict]:
    model = tiny_llama(bias)
    result = quantize(model, skip)
    out = tmp_path / "ckpt"
    summary = write_compressed_tensors_checkpoint(
        LoadedModel(model, None, tmp_path, "hf"), result, out)
    return model, result, out, summary


def in_memory_int8(model: LlamaForCausalLM, result: QuantizationResult) -> LlamaForCausalLM:
    """The model with its linears swapped for Int8DynamicLinear in memory (no file), its other
    float tensors rounded through fp16 as a checkpoint stores them."""
    model = copy.deepcopy(model).half().float()
    for name, qw in result.weights.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8DynamicLinear.from_quantized(qw))
    return model


IDS = torch.tensor([[1, 5, 9, 200, 3, 17, 42, 7], [8, 8, 120, 4, 99, 250, 0, 6]])


# -- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_round_trip_is_exact(tmp_path: Path, bias: bool) -> None:
    model, result, out, summary = write(tmp_path, bias)
    assert summary["quantized_modules"] == 14 and summary["ignore"] == ["lm_head"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        name = "model.layers.1.mlp.down_proj"
        assert handle.get_tensor(f"{name}.weight").dtype == torch.int8
        assert handle.get_tensor(f"{name}.weight_scale").shape == (64, 1)
    assert "lm_head.weight" not in keys  # tied to the input embedding, written once
    assert not any(k.endswith(("zero_point", "input_scale", "qweight")) for k in keys)

    loaded = load_compressed_tensors_checkpoint(out)
    modules = dict(loaded.model.named_modules())
    assert sum(isinstance(m, Int8DynamicLinear) for m in modules.values()) == 14
    for name, qw in result.weights.items():
        back = modules[name].to_quantized()  # int8 values and scales exactly as written
        assert torch.equal(back.intweight, qw.intweight)
        assert torch.equal(back.scales, qw.scales)
        if bias:
            assert torch.equal(back.bias, qw.bias.half().float())
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    with torch.no_grad():
        from_file = loaded.model(IDS).logits
        expected = in_memory_int8(model, result)(IDS).logits
        float_logits = model(IDS).logits
    assert torch.allclose(from_file, expected, rtol=1e-5, atol=1e-5)
    assert 0 < float((from_file - float_logits).abs().max()) < 0.1


def test_config_json_has_the_compressed_tensors_w8a8_fields(tmp_path: Path) -> None:
    _, _, out, summary = write(tmp_path)
    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg == summary["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert qcfg["format"] == "int-quantized"
    assert qcfg["quantization_status"] == "compressed"
    assert qcfg["ignore"] == ["lm_head"] and qcfg["kv_cache_scheme"] is None
    assert {"version", "sparsity_config", "transform_config", "global_compression_ratio"} <= set(
        qcfg)
    [group] = qcfg["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["output_activations"] is None
    assert group["weights"] == {"num_bits": 8, "type": "int", "symmetric": True,
                                "group_size": None, "strategy": "channel", "dynamic": False}
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True,
                                          "group_size": None, "strategy": "token",
                                          "dynamic": True}
    assert config["dtype"] == "float16" and config["tie_word_embeddings"] is True


def test_quantized_lm_head_unties(tmp_path: Path) -> None:
    model, result, out, summary = write(tmp_path, skip=["*embed*"])
    assert "lm_head" in result.weights and summary["ignore"] == []
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = load_compressed_tensors_checkpoint(out)
    assert isinstance(loaded.model.lm_head, Int8DynamicLinear)
    assert torch.equal(loaded.model.model.embed_tokens.weight,
                       model.model.embed_tokens.weight.half().float())


def test_source_plugin_and_auto_selection(tmp_path: Path) -> None:
    _, _, out, _ = write(tmp_path)
    source = CompressedTensorsSource()
    assert source.accepts(out) and not HFDirectorySource().accepts(out)
    loaded = source.load(out, torch.device("cpu"))
    assert loaded.source_format == "compressed-tensors"
    assert {p.name for p in loaded.files} == {"model.safetensors", "config.json"}


# -- refusals ------------------------------------------------------------------------------------


def test_exporter_refuses_weights_that_are_not_w8_per_channel(tmp_path: Path) -> None:
    model = tiny_llama()
    result = quantize(model)
    name = "model.layers.0.self_attn.q_proj"
    loaded = LoadedModel(model, None, tmp_path, "hf")
    four_bit = copy.copy(result)
    four_bit.weights = dict(result.weights)
    four_bit.weights[name] = quantize_groups(model.get_submodule(name).weight, 4, 128, True)
    with pytest.raises(QuantmillError, match=r"W8A8 int8 only; module '.*q_proj': weights are "
                                             r"4-bit.*export format 'gptq'"):
        CompressedTensorsExporter().export(loaded, four_bit, tmp_path / "a")
    asym = copy.copy(result)
    asym.weights = {name: quantize_groups(model.get_submodule(name).weight, 8, -1, False)}
    with pytest.raises(QuantmillError, match="asymmetric"):
        CompressedTensorsExporter().export(loaded, asym, tmp_path / "b")
    grouped = copy.copy(result)
    grouped.weights = {name: quantize_groups(model.get_submodule(name).weight, 8, 32, True)}
    with pytest.raises(QuantmillError, match="group size 32"):
        CompressedTensorsExporter().export(loaded, grouped, tmp_path / "c")
    codebook = copy.copy(result)
    codebook.weights = {name: ClusteredWeight(torch.zeros(64, 64, dtype=torch.uint8),
                                              torch.zeros(64, 4), bits=2)}
    with pytest.raises(QuantmillError, match="cannot write the codebook weights"):
        CompressedTensorsExporter().export(loaded, codebook, tmp_path / "d")
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing half-written
    assert CompressedTensorsExporter.accepts_weight_kinds == frozenset({"uniform"})


def _edit_config(out: Path, edit) -> None:
    config = json.loads((out / "config.json").read_text())
    edit(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))


def _group(qcfg: dict) -> dict:
    return qcfg["config_groups"]["group_0"]


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(quant_method="gptq"), "holds a 'gptq' checkpoint"),
    (lambda q: q.update(format="pack-quantized"), "format 'pack-quantized' is not supported"),
    (lambda q: q.update(quantization_status="frozen"), "quantization_status is 'frozen'"),
    (lambda q: _group(q)["weights"].update(type="float"), r"weights: type='float'"),
    (lambda q: _group(q)["weights"].update(strategy="group", group_size=128),
     "strategy='group'"),
    (lambda q: _group(q).update(input_activations=None), "input_activations are None"),
    (lambda q: _group(q)["input_activations"].update(dynamic=False, strategy="tensor"),
     "strategy='tensor'"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), "quantized KV cache"),
])
def test_reader_refuses_other_schemes(tmp_path: Path, edit, message: str) -> None:
    _, _, out, _ = write(tmp_path)
    _edit_config(out, edit)
    with pytest.raises(QuantmillError, match=message):
        load_compressed_tensors_checkpoint(out)
    with pytest.raises(QuantmillError, match=message):
        CompressedTensorsSource().check(out)


def test_reader_refuses_inconsistent_files(tmp_path: Path) -> None:
    _, _, out, _ = write(tmp_path)
    file = out / "model.safetensors"
    original = load_file(str(file))
    name = "model.layers.0.mlp.gate_proj"

    tensors = dict(original)
    del tensors[f"{name}.weight_scale"]
    tensors[f"{name}.weight"] = tensors[f"{name}.weight"].half()
    save_file(tensors, str(file))
    with pytest.raises(QuantmillError, match=f"targets '{name}' but the checkpoint has no int8"):
        load_compressed_tensors_checkpoint(out)

    tensors = dict(original)
    tensors[f"{name}.weight"] = tensors[f"{name}.weight"].to(torch.int16)
    save_file(tensors, str(file))
    with pytest.raises(QuantmillError, match=f"{name}.weight must be int8"):
        load_compressed_tensors_checkpoint(out)

    tensors = dict(original)
    tensors[f"{name}.weight_zero_point"] = torch.ones(128, 1, dtype=torch.int8)
    save_file(tensors, str(file))
    with pytest.raises(QuantmillError, match="weight_zero_point is not zero"):
        load_compressed_tensors_checkpoint(out)

    tensors[f"{name}.weight_zero_point"] = torch.zeros(128, 1, dtype=torch.int8)
    save_file(tensors, str(file))
    load_compressed_tensors_checkpoint(out)  # zero zero points (older writers) are fine

    file.unlink()
    with pytest.raises(QuantmillError, match="no model.safetensors"):
        load_compressed_tensors_checkpoint(out)
    with pytest.raises(QuantmillError, match="not a directory"):
        load_compressed_tensors_checkpoint(out / "config.json")
