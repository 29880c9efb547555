"""The quantmill-lut checkpoint (LUTLinear, writer, reader, source) and the dequantized
exporter: write a clustered tiny Llama, read it back, compare exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from quantmill.plugins.base import (
    ClusteredWeight,
    LoadedModel,
    ModuleQuantSpec,
    QuantizationResult,
    QuantPlan,
)
from quantmill.plugins.catalog import Catalog
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.evaluators.size import SizeEvaluator
from quantmill.plugins.formats.dequantized import DequantizedExporter
from quantmill.plugins.formats.lut import (
    LUTCheckpointSource,
    LUTExporter,
    load_lut_checkpoint,
    write_lut_checkpoint,
)
from quantmill.plugins.manager import get_plugin_manager
from quantmill.plugins.models.lut_linear import LUTLinear
from quantmill.plugins.models.sources import HFDirectorySource
from quantmill.plugins.quantizers.clustering.algorithm import cluster_weight

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    settings = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                    max_position_embeddings=64, tie_word_embeddings=True)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():  # non-trivial norms and biases so a lost tensor shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS]


def clustered(model: torch.nn.Module, bits_of, rows_per_codebook: int = 1,
              names: list[str] | None = None) -> QuantizationResult:
    modules = dict(model.named_modules())
    names = names if names is not None else linear_names(model)
    weights, specs = {}, {}
    for name in names:
        bits = bits_of(name)
        cw = cluster_weight(modules[name].weight, bits, rows_per_codebook=rows_per_codebook,
                            iterations=5)
        bias = getattr(modules[name], "bias", None)
        cw.bias = bias.detach().clone() if bias is not None else None
        weights[name], specs[name] = cw, ModuleQuantSpec(bits, -1, False, "clustering")
    return QuantizationResult(weights, QuantPlan(specs),
                              {"method": "clustering", "rows_per_codebook": rows_per_codebook})


def with_weights(model: torch.nn.Module, result: QuantizationResult) -> torch.nn.Module:
    """The model with every clustered weight replaced by its dequantized value (in place)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, cw in result.weights.items():
            modules[name].weight.copy_(cw.dequantize())
            if cw.bias is not None:
                modules[name].bias.copy_(cw.bias.half().float())
    return model


def mixed_bits(name: str) -> int:
    return {"q_proj": 2, "k_proj": 3, "v_proj": 4, "o_proj": 8}.get(name.rsplit(".", 1)[-1], 3)


# -- LUTLinear ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "rows_per_codebook", "in_features"), [
    (2, 1, 64), (3, 1, 40), (4, 3, 96), (8, 2, 33)])
def test_lut_linear_forward_is_x_w_t_plus_b(bits: int, rows_per_codebook: int,
                                              in_features: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(10, in_features)
    cw = cluster_weight(w, bits, rows_per_codebook=rows_per_codebook, iterations=5)
    cw.bias = torch.randn(10).half().float()
    layer = LUTLinear.from_clustered(cw, rows_per_codebook)
    assert layer.qindices.dtype == torch.int32 and layer.codebook.dtype == torch.float16
    assert layer.codebook.shape == (-(-10 // rows_per_codebook), 2**bits)
    assert torch.equal(layer.dequantize_weight(), cw.dequantize())
    assert torch.equal(layer.indices(), cw.indices.long())
    x = torch.randn(3, 5, in_features)
    expected = x @ cw.dequantize().T + cw.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_lut_linear_refuses_what_it_cannot_store() -> None:
    cw = cluster_weight(torch.randn(4, 32), 3)
    with pytest.raises(ValueError, match="do not share one codebook"):
        LUTLinear.from_clustered(cw, rows_per_codebook=2)
    odd = ClusteredWeight(cw.indices, cw.codebook + 1e-4, 3)  # not fp16 values
    with pytest.raises(ValueError, match="not fp16 values"):
        LUTLinear.from_clustered(odd)


# -- writer and reader -------------------------------------------------------------------------


@pytest.mark.parametrize("rows_per_codebook", [1, 4])
def test_mixed_bit_round_trip_is_exact(tmp_path: Path, rows_per_codebook: int) -> None:
    model = tiny_llama(attention_bias=True)  # biases on q/k/v/o
    result = clustered(model, mixed_bits, rows_per_codebook)
    out = tmp_path / "ckpt"
    summary = write_lut_checkpoint(LoadedModel(model, None, tmp_path, "hf"), result, out)
    assert summary["bits"]["model.layers.0.self_attn.o_proj"] == 8
    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "quantmill_lut" and qcfg["format_version"] == 1
    assert qcfg["bits"] == 3 and qcfg["rows_per_codebook"] == rows_per_codebook
    assert qcfg["modules"]["model.layers.1.self_attn.q_proj"]["bits"] == 2
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.v_proj.codebook").dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert "lm_head.weight" not in keys  # tied: stored once, as the embedding

    loaded = load_lut_checkpoint(out)
    modules = dict(loaded.model.named_modules())
    for name, cw in result.weights.items():
        layer = modules[name]
        assert isinstance(layer, LUTLinear) and layer.bits == cw.bits
        assert layer.rows_per_codebook == rows_per_codebook
        assert torch.equal(layer.dequantize_weight(), cw.dequantize()), name
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = with_weights(tiny_llama(attention_bias=True), result)
    reference.model.embed_tokens.weight.data = reference.model.embed_tokens.weight.half().float()
    for param in reference.parameters():  # the checkpoint stores floats in fp16
        param.data = param.data.half().float()
    torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits,
                               rtol=1e-4, atol=1e-4)


def test_quantized_tied_head_unties(tmp_path: Path) -> None:
    model = tiny_llama()
    result = clustered(model, lambda n: 4, names=["lm_head", "model.layers.0.mlp.up_proj"])
    out = tmp_path / "ckpt"
    write_lut_checkpoint(LoadedModel(model, None, tmp_path, "hf"), result, out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = load_lut_checkpoint(out)
    assert isinstance(loaded.model.lm_head, LUTLinear)
    assert torch.equal(loaded.model.lm_head.dequantize_weight(),
                       result.weights["lm_head"].dequantize())
    torch.testing.assert_close(loaded.model.model.embed_tokens.weight,
                               model.model.embed_tokens.weight.half().float())


def test_size_evaluator_counts_indices_and_codebooks(tmp_path: Path) -> None:
    model = tiny_llama()
    result = clustered(model, lambda n: 3)
    out = tmp_path / "ckpt"
    write_lut_checkpoint(LoadedModel(model, None, tmp_path, "hf"), result, out)
    loaded = LUTCheckpointSource().load(out, torch.device("cpu"))
    metrics = SizeEvaluator().evaluate(loaded, out).as_dict()
    weights = sum(cw.out_features * cw.in_features for cw in result.weights.values())
    books = sum(cw.out_features * 8 * 16 for cw in result.weights.values())
    assert metrics["quantized_weights"] == weights
    assert metrics["bits_per_weight"] == pytest.approx((3 * weights + books) / weights)


def test_rows_per_codebook_comes_from_the_quantizer_details(tmp_path: Path) -> None:
    model = tiny_llama()
    result = clustered(model, lambda n: 2, rows_per_codebook=8)
    result.details["rows_per_codebook"] = 3  # lies: rows 0..2 do not share one codebook
    with pytest.raises(QuantmillError, match="do not share one codebook"):
        write_lut_checkpoint(LoadedModel(model, None, tmp_path, "hf"), result, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_reader_refuses_damaged_checkpoints(tmp_path: Path) -> None:
    model = tiny_llama()
    out = tmp_path / "ckpt"
    write_lut_checkpoint(LoadedModel(model, None, tmp_path, "hf"), clustered(model, mixed_bits),
                         out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["modules"]["model.layers.0.self_attn.k_proj"]["bits"] = 4
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantmillError, match="k_proj.qindices has shape"):
        load_lut_checkpoint(out)
    config["quantization_config"]["quant_method"] = "gptq"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantmillError, match="not a quantmill-lut checkpoint"):
        LUTCheckpointSource().check(out)
    assert not LUTCheckpointSource().accepts(out)


# -- plugins -----------------------------------------------------------------------------------


def test_exporters_and_source_are_registered(tmp_path: Path) -> None:
    catalog = Catalog(get_plugin_manager(load_entrypoints=False))
    assert catalog.exporters.get("lut") is LUTExporter
    assert catalog.exporters.get("dequantized") is DequantizedExporter
    assert catalog.model_sources.get("lut") is LUTCheckpointSource
    assert LUTExporter.format_name == "lut" and LUTExporter.accepts_weight_kinds == {"codebook"}
    assert DequantizedExporter.format_name == "hf"
    assert DequantizedExporter.accepts_weight_kinds == {"uniform", "codebook", "trellis"}
    # "source: auto" picks the lut reader for a lut checkpoint, never the plain hf one
    model = tiny_llama()
    out = tmp_path / "ckpt"
    LUTExporter().export(LoadedModel(model, None, tmp_path, "hf"),
                         clustered(model, lambda n: 2), out)
    chosen = catalog.pm.hook.select_model_source(path=str(out),
                                                 candidates=catalog.model_sources.classes())
    assert chosen == "lut"


def test_dequantized_export_loads_as_plain_hf(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = HFDirectorySource()
    loaded = source.load(tiny_model_dir, torch.device("cpu"))
    result = clustered(loaded.model, mixed_bits)
    out = tmp_path / "plain"
    summary = DequantizedExporter().export(loaded, result, out)
    assert summary["format"] == "hf" and summary["dequantized"] is True
    assert summary["dequantized_from"]["weight_kinds"] == ["codebook"]
    assert summary["label"] == ("fp16 weights dequantized from mixed 2-8-bit codebook weights "
                                "(clustering)")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["quantmill_dequantized_from"]["label"] == summary["label"]
    assert (out / "tokenizer.json").is_file()
    back = source.load(out, torch.device("cpu"))  # the plain reader, no quantmill modules
    modules = dict(back.model.named_modules())
    for name, cw in result.weights.items():
        assert type(modules[name]) is torch.nn.Linear
        assert torch.equal(modules[name].weight, cw.dequantize().half().float())
    assert not LUTCheckpointSource().accepts(out)
