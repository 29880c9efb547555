"""GPTQ checkpoints: write a tiny quantized Llama, read it back, compare exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from quantmill.plugins.base import (
    LoadedModel,
    ModuleQuantSpec,
    QuantizationResult,
    QuantizedWeight,
    QuantPlan,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.formats import gptq
from quantmill.plugins.formats.gptq import (
    GPTQExporter,
    load_gptq_checkpoint,
    write_gptq_checkpoint,
)
from quantmill.plugins.models.quant_linear import GPTQLinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- helpers -------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    settings = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():  # non-trivial norms and biases so a lost tensor shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def rtn(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest per group (min/max), scales rounded to fp16: a test-only quantizer."""
    out_features, in_features = w.shape
    maxq = 2**bits - 1
    if g_idx is None:
        g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, out_features)
    zeros = torch.empty(groups, out_features, dtype=torch.int32)
    intweight = torch.empty(out_features, in_features, dtype=torch.uint8)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols].float()  # [out, cols in group]
        lo = wg.amin(dim=1).clamp(max=0)
        hi = wg.amax(dim=1).clamp(min=0)
        if sym:
            scale = (2 * torch.maximum(lo.abs(), hi) / maxq).clamp_min(1e-6)
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            scale = ((hi - lo) / maxq).clamp_min(1e-6)
        scale = scale.half().float()
        if not sym:
            zero = torch.round(-lo / scale).clamp(0, maxq)
        q = torch.clamp(torch.round(wg / scale[:, None]) + zero[:, None], 0, maxq)
        scales[g] = scale
        zeros[g] = zero.to(torch.int32)
        intweight[:, cols] = q.to(torch.uint8)
    return QuantizedWeight(intweight, scales, zeros, g_idx, bits, group_size, sym)


def quantize_model(
    model: torch.nn.Module,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = True,
    bits_for: dict[str, int] | None = None,
    permute: bool = False,
) -> QuantizationResult:
    weights: dict[str, QuantizedWeight] = {}
    specs: dict[str, ModuleQuantSpec] = {}
    for name, module in model.named_modules():
        if not name.endswith(PROJECTIONS):
            continue
        b = (bits_for or {}).get(name.rsplit(".", 1)[-1], bits)
        g_idx = None
        if permute:  # act-order style: groups of a shuffled column order
            order = torch.randperm(module.in_features, generator=torch.Generator().manual_seed(1))
            g_idx = torch.empty(module.in_features, dtype=torch.int32)
            g_idx[order] = torch.arange(module.in_features, dtype=torch.int32) // group_size
        qw = rtn(module.weight.detach(), b, group_size, sym, g_idx)
        if module.bias is not None:
            qw.bias = module.bias.detach().clone()
        weights[name] = qw
        specs[name] = ModuleQuantSpec(b, group_size, sym, "rtn")
    return QuantizationResult(weights, QuantPlan(specs), {"damp_percent": 0.01})


def reference_model(model: torch.nn.Module, result: QuantizationResult) -> torch.nn.Module:
    """The float model the checkpoint stands for: other tensors through fp16, dequantized W."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for param in ref.parameters():
            param.copy_(param.half().float())
        for name, qw in result.weights.items():  # a new Parameter: a quantized lm_head unties
            ref.get_submodule(name).weight = torch.nn.Parameter(qw.dequantize())
    return ref


def loaded(model: torch.nn.Module) -> LoadedModel:
    return LoadedModel(model, None, Path("/nonexistent"), "hf-safetensors")


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = (torch.arange(14) * 17 % 64).reshape(2, 7)  # [batch 2, seq 7]
    with torch.no_grad():
        return model(input_ids=ids).logits


def gptq_modules(model: torch.nn.Module) -> dict[str, GPTQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GPTQLinear)}


def assert_round_trip(model: torch.nn.Module, result: QuantizationResult, out: Path) -> None:
    back = load_gptq_checkpoint(out).model
    modules = gptq_modules(back)
    assert set(modules) == set(result.weights)
    for name, qw in result.weights.items():
        assert modules[name].bits == qw.bits
        assert torch.equal(modules[name].dequantize_weight(), qw.dequantize()), name
    torch.testing.assert_close(logits(back), logits(reference_model(model, result)),
                               rtol=1e-5, atol=1e-6)


# -- tests ---------------------------------------------------------------------------------------


def test_symmetric_writes_v1_and_round_trips(tmp_path: Path) -> None:
    model = tiny_llama()
    result = quantize_model(model, bits=4, group_size=32, sym=True)
    out = tmp_path / "ckpt"
    summary = write_gptq_checkpoint(loaded(model), result, out)
    assert summary["checkpoint_format"] == "gptq"
    assert {"model.safetensors", "config.json", "quantize_config.json"} <= set(summary["files"])
    assert summary["bits"]["model.layers.0.self_attn.q_proj"] == 4
    assert_round_trip(model, result, out)

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        name = "model.layers.1.mlp.down_proj"  # in=128, out=64
        assert f.get_tensor(f"{name}.qweight").shape == (128 * 4 // 32, 64)
        assert f.get_tensor(f"{name}.qweight").dtype == torch.int32
        assert f.get_tensor(f"{name}.qzeros").shape == (4, 64 * 4 // 32)
        assert f.get_tensor(f"{name}.scales").dtype == torch.float16
        assert f.get_tensor(f"{name}.g_idx").dtype == torch.int32
        # v1 stores zero - 1: every symmetric 4-bit zero is 8, so every nibble is 7
        assert (f.get_tensor(f"{name}.qzeros") == 0x77777777).all()
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
    assert "lm_head.weight" not in keys  # tied: written once, as the embedding
    assert "model.embed_tokens.weight" in keys
    assert not any(k.endswith(".weight") and k.rsplit(".", 2)[-2] in PROJECTIONS for k in keys)
    assert not any("rotary" in k for k in keys)

    back = load_gptq_checkpoint(out).model
    assert back.lm_head.weight is back.model.embed_tokens.weight
    # non-persistent buffers are rebuilt, not left empty
    assert torch.equal(back.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert back.model.embed_tokens.weight.dtype == torch.float32
    assert not back.training


def test_config_files(tmp_path: Path) -> None:
    model = tiny_llama()
    result = quantize_model(model, bits=4, group_size=32, sym=True)
    out = tmp_path / "ckpt"
    write_gptq_checkpoint(loaded(model), result, out)
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32 and qcfg["sym"] is True
    assert qcfg["desc_act"] is False and qcfg["lm_head"] is False
    assert qcfg["quant_method"] == "gptq" and qcfg["checkpoint_format"] == "gptq"
    assert qcfg["pack_dtype"] == "int32" and qcfg["static_groups"] is False
    assert qcfg["true_sequential"] is True and qcfg["damp_percent"] == 0.01
    assert qcfg["meta"]["quantizer"][0].startswith("quantmill:")
    assert qcfg["meta"]["uri"] == "https://github.com/quantmill/quantmill"
    assert "dynamic" not in qcfg and "quantmill_note" not in qcfg
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == qcfg
    assert config["dtype"] == "float16" and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert (out / "generation_config.json").is_file()


def test_asymmetric_writes_v2_with_bias_and_short_last_group(tmp_path: Path) -> None:
    model = tiny_llama(seed=1, attention_bias=True, mlp_bias=True)
    with torch.no_grad():  # an all-positive weight gets zero points of 0
        model.model.layers[0].self_attn.q_proj.weight.abs_()
    result = quantize_model(model, bits=3, group_size=48, sym=False)  # 64 = 48 + 16
    assert any(int(qw.zeros.min()) == 0 for qw in result.weights.values())  # v1 could not
    out = tmp_path / "ckpt"
    summary = write_gptq_checkpoint(loaded(model), result, out)
    assert summary["checkpoint_format"] == "gptq_v2"
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["checkpoint_format"] == "gptq_v2" and qcfg["sym"] is False
    assert qcfg["group_size"] == 48 and qcfg["desc_act"] is False
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").shape == (2, 64)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").dtype == torch.float16
    assert_round_trip(model, result, out)
    assert gptq_modules(load_gptq_checkpoint(out).model)[
        "model.layers.0.self_attn.q_proj"
    ].zero_offset == 0


def test_forced_formats(tmp_path: Path) -> None:
    model = tiny_llama()
    sym = quantize_model(model, sym=True)
    summary = write_gptq_checkpoint(
        loaded(model), sym, tmp_path / "v2", checkpoint_format="gptq_v2"
    )
    assert summary["checkpoint_format"] == "gptq_v2"
    assert_round_trip(model, sym, tmp_path / "v2")
    asym = quantize_model(model, sym=False)
    with pytest.raises(QuantmillError, match="gptq_v2"):
        write_gptq_checkpoint(loaded(model), asym, tmp_path / "v1", checkpoint_format="gptq")
    assert not (tmp_path / "v1").exists()


def test_mixed_sym_and_asym_uses_v2(tmp_path: Path) -> None:
    model = tiny_llama()
    result = quantize_model(model, sym=True)
    name = "model.layers.0.mlp.up_proj"
    result.weights[name] = rtn(model.get_submodule(name).weight.detach(), 4, 32, sym=False)
    summary = write_gptq_checkpoint(loaded(model), result, tmp_path / "ckpt")
    assert summary["checkpoint_format"] == "gptq_v2"
    qcfg = summary["quantize_config"]
    assert qcfg["sym"] is True
    assert qcfg["dynamic"] == {gptq.dynamic_key(name): {"bits": 4, "group_size": 32, "sym": False}}
    assert_round_trip(model, result, tmp_path / "ckpt")


def test_mixed_bits_listed_in_dynamic(tmp_path: Path) -> None:
    model = tiny_llama(tie_word_embeddings=False)
    result = quantize_model(model, bits=4, bits_for={"down_proj": 8, "v_proj": 8})
    out = tmp_path / "ckpt"
    write_gptq_checkpoint(loaded(model), result, out)
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["bits"] == 4
    overridden = {n for n, qw in result.weights.items() if qw.bits == 8}
    assert len(overridden) == 4
    assert qcfg["dynamic"] == {
        f"+:^{n.replace('.', chr(92) + '.')}$": {"bits": 8, "group_size": 32} for n in overridden
    }
    assert_round_trip(model, result, out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" in f.keys()  # untied: both embeddings are written
    assert gptq.module_spec("model.layers.1.mlp.down_proj", qcfg) == (8, 32)
    assert gptq.module_spec("model.layers.1.mlp.up_proj", qcfg) == (4, 32)


def test_quantized_tied_lm_head_unties(tmp_path: Path) -> None:
    model = tiny_llama()
    result = quantize_model(model)
    result.weights["lm_head"] = rtn(model.lm_head.weight.detach(), 8, 32, sym=True)
    out = tmp_path / "ckpt"
    write_gptq_checkpoint(loaded(model), result, out)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["lm_head"] is True
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.qweight" in f.keys() and "model.embed_tokens.weight" in f.keys()
    assert_round_trip(model, result, out)


def test_unusual_bits_are_written_with_a_note(tmp_path: Path) -> None:
    model = tiny_llama()
    result = quantize_model(model, bits=5, group_size=32, sym=True)
    out = tmp_path / "ckpt"
    write_gptq_checkpoint(loaded(model), result, out)
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["bits"] == 5 and "5" in qcfg["quantmill_note"]
    assert_round_trip(model, result, out)


def test_act_order_g_idx_sets_desc_act(tmp_path: Path) -> None:
    model = tiny_llama()
    result = quantize_model(model, bits=4, group_size=32, sym=True, permute=True)
    out = tmp_path / "ckpt"
    write_gptq_checkpoint(loaded(model), result, out)
    assert json.loads((out / "quantize_config.json").read_text())["desc_act"] is True
    assert_round_trip(model, result, out)


def test_loaded_memory_is_close_to_file_size(tmp_path: Path) -> None:
    # Linear-dominated: hidden 128, intermediate 256, a 64-token vocabulary.
    model = tiny_llama(hidden_size=128, intermediate_size=256, vocab_size=64)
    result = quantize_model(model, bits=4, group_size=32)
    out = tmp_path / "ckpt"
    write_gptq_checkpoint(loaded(model), result, out)
    back = load_gptq_checkpoint(out).model
    held = sum(t.numel() * t.element_size() for t in back.parameters())
    held += sum(t.numel() * t.element_size() for t in back.buffers())
    file_size = (out / "model.safetensors").stat().st_size
    assert held <= 1.3 * file_size, (held, file_size)
    # no module keeps a float copy of a quantized weight
    assert not any(isinstance(m, torch.nn.Linear) and n in result.weights
                   for n, m in back.named_modules())


def test_gptq_linear_forward_in_half_and_meta_construction() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64).abs()  # all positive: asymmetric zero points of 0
    qw = rtn(w, 4, 32, sym=False)
    qw.bias = torch.randn(32)
    layer = GPTQLinear.from_quantized(qw, "gptq_v2")
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(x, qw.dequantize(), qw.bias.half().float())
    torch.testing.assert_close(layer(x), expected)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    meta = GPTQLinear(64, 32, 4, 32, bias=True, zero_offset=1, device="meta")
    assert meta.qweight.is_meta and meta.qweight.shape == (8, 32)
    with pytest.raises(ValueError, match="gptq_v2"):
        GPTQLinear.from_quantized(qw, "gptq")  # asymmetric zeros include 0


def test_reader_refuses_incomplete_directories(tmp_path: Path) -> None:
    model = tiny_llama()
    out = tmp_path / "ckpt"
    write_gptq_checkpoint(loaded(model), quantize_model(model), out)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(QuantmillError, match="model.safetensors"):
        load_gptq_checkpoint(empty)

    (out / "quantize_config.json").unlink()
    config = json.loads((out / "config.json").read_text())
    assert load_gptq_checkpoint(out).source_format == "gptq"  # config.json's copy suffices
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantmillError, match="quantization_config"):
        load_gptq_checkpoint(out)
    with pytest.raises(QuantmillError, match="not a directory"):
        load_gptq_checkpoint(tmp_path / "missing")


def test_no_partial_output_on_error(tmp_path: Path) -> None:
    class BrokenTokenizer:
        def save_pretrained(self, path: str) -> None:
            (Path(path) / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    model = tiny_llama()
    out = tmp_path / "ckpt"
    with pytest.raises(OSError, match="disk full"):
        write_gptq_checkpoint(
            LoadedModel(model, BrokenTokenizer(), tmp_path, "hf"), quantize_model(model), out
        )
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "other").write_text("x")
    with pytest.raises(QuantmillError, match="not empty"):
        write_gptq_checkpoint(loaded(model), quantize_model(model), out)


def test_exporter_plugin(tmp_path: Path) -> None:
    assert gptq.register_exporters() == [GPTQExporter]
    assert GPTQExporter.name == "gptq" and GPTQExporter.format_name == "gptq"
    with pytest.raises(ValueError):
        GPTQExporter.from_options({"checkpoint_format": "v3"})
    model = tiny_llama()
    out = tmp_path / "ckpt"
    out.mkdir()  # an empty staging directory is fine
    exporter = GPTQExporter.from_options({"checkpoint_format": "gptq_v2"})
    summary = exporter.export(loaded(model), quantize_model(model), out)
    assert summary["checkpoint_format"] == "gptq_v2"
    assert (out / "model.safetensors").is_file()


def test_reader_accepts_shards_and_checks_bits(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    result = quantize_model(model)
    out = tmp_path / "ckpt"
    write_gptq_checkpoint(loaded(model), result, out)
    tensors = load_file(str(out / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(out / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "model.safetensors").unlink()
    assert_round_trip(model, result, out)

    qcfg = json.loads((out / "quantize_config.json").read_text())
    (out / "quantize_config.json").write_text(json.dumps({**qcfg, "bits": 8}))
    with pytest.raises(QuantmillError, match="does not fit a 8-bit"):
        load_gptq_checkpoint(out)


def test_v1_zeros_are_read_word_wise_like_gptqmodel_writes_them() -> None:
    """GPTQModel stores v1 zeros by subtracting 0x11111111 from each packed word; a zero point
    of 0 borrows from its neighbour. Reading adds the constant back word-wise."""
    from quantmill.plugins.formats.packing import pack_cols
    from quantmill.plugins.models.quant_linear import GPTQLinear

    true_zeros = torch.tensor([[0, 5, 15, 0, 1, 8, 0, 3]], dtype=torch.int32)  # [1 group, 8 out]
    words = pack_cols(true_zeros, 4).to(torch.int64) & 0xFFFFFFFF
    stored = (words - 0x11111111) % 2**32
    stored = torch.where(stored >= 2**31, stored - 2**32, stored).to(torch.int32)
    layer = GPTQLinear(32, 8, 4, 32, zero_offset=1)
    layer.qzeros = stored
    assert torch.equal(layer.unpacked_zeros(), true_zeros.to(torch.int64))


# -- rotated checkpoints (quant_method quantmill_rotated_gptq) -------------------------------


def quantize_rotated(model: torch.nn.Module, bits: int = 4, group_size: int = 32,
                     seed: int = 0) -> QuantizationResult:
    """Like ``quantize_model``, on each weight in its randomized Hadamard input basis."""
    from quantmill.plugins.hadamard import InputRotation, rotation_site

    weights: dict[str, QuantizedWeight] = {}
    specs: dict[str, ModuleQuantSpec] = {}
    rotations: dict[str, InputRotation] = {}
    for name, module in model.named_modules():
        if not name.endswith(PROJECTIONS):
            continue
        site = rotation_site(name)
        if site not in rotations:  # one object per site, as GPTQ shares it among q/k/v
            rotations[site] = InputRotation.for_site(module.in_features, seed, site)
        rotation = rotations[site]
        qw = rtn(rotation.apply(module.weight.detach()), bits, group_size, sym=False)
        qw.input_rotation = rotation
        weights[name] = qw
        specs[name] = ModuleQuantSpec(bits, group_size, False, "rtn", rotation_seed=seed)
    return QuantizationResult(weights, QuantPlan(specs), {})


def test_rotated_checkpoint_round_trips_and_names_its_own_method(tmp_path: Path) -> None:
    from quantmill.plugins.evaluators.size import packed_stats
    from quantmill.plugins.hadamard import split_dimension
    from quantmill.plugins.models.quant_linear import ROTATED_GPTQ_METHOD
    from quantmill.plugins.models.sources import GPTQCheckpointSource, HFDirectorySource

    model = tiny_llama(hidden_size=96, intermediate_size=192)  # odd parts 3: a real block
    result = quantize_rotated(model)
    out = tmp_path / "ckpt"
    summary = write_gptq_checkpoint(loaded(model), result, out)
    qcfg = summary["quantize_config"]
    assert qcfg["quant_method"] == ROTATED_GPTQ_METHOD
    assert qcfg["rotation"]["kind"] == "randomized_hadamard"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ROTATED_GPTQ_METHOD
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        signs = f.get_tensor("model.layers.0.mlp.down_proj.input_rotation_signs")
        block = f.get_tensor("model.layers.0.mlp.down_proj.input_rotation_block")
    assert signs.dtype == torch.int8 and signs.shape == (192,)
    assert block.dtype == torch.float32 and block.shape == (3, 3)
    # the reader rotates the inputs and computes with what was stored: the same model
    assert_round_trip(model, result, out)
    back = load_gptq_checkpoint(out).model
    module = back.get_submodule("model.layers.1.self_attn.o_proj")
    assert module.rotated
    x = torch.randn(3, 96)
    expected = x @ result.weights["model.layers.1.self_attn.o_proj"].dequantize().T
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-5)
    # the size evaluator counts the rotation tensors as part of each weight
    quantized, bits, _ = packed_stats(back)
    rotation_bits = sum(8 * qw.in_features + 32 * split_dimension(qw.in_features)[0] ** 2
                        for qw in result.weights.values())
    unrotated = {n: GPTQLinear.from_quantized(replace_rotation(qw), "gptq_v2")
                 for n, qw in result.weights.items()}
    plain_bits = sum(sum(getattr(m, b).numel() * getattr(m, b).element_size() * 8
                         for b in ("qweight", "qzeros", "scales", "g_idx"))
                     for m in unrotated.values())
    assert bits == plain_bits + rotation_bits
    assert quantized == sum(qw.in_features * qw.out_features for qw in result.weights.values())
    # found by the GPTQ source, never taken for a plain Hugging Face directory
    assert GPTQCheckpointSource().accepts(out) and not HFDirectorySource().accepts(out)


def replace_rotation(qw: QuantizedWeight) -> QuantizedWeight:
    from dataclasses import replace

    return replace(qw, input_rotation=None)


def test_rotated_and_plain_tensors_must_match_the_method(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_llama(hidden_size=96, intermediate_size=192)
    out = tmp_path / "rotated"
    write_gptq_checkpoint(loaded(model), quantize_rotated(model), out)
    tensors = load_file(str(out / "model.safetensors"))

    # the method says rotated, but one module lost its rotation
    missing = tmp_path / "missing"
    shutil_copy(out, missing)
    save_file({k: v for k, v in tensors.items()
               if not k.startswith("model.layers.0.mlp.up_proj.input_rotation")},
              str(missing / "model.safetensors"))
    with pytest.raises(QuantmillError, match="model.layers.0.mlp.up_proj' lacks input rotation"):
        load_gptq_checkpoint(missing)

    # rotation tensors under plain "gptq": runtimes would ignore them and run it wrong
    plain = tmp_path / "plain"
    shutil_copy(out, plain)
    for name in ("quantize_config.json", "config.json"):
        data = json.loads((plain / name).read_text())
        section = data.get("quantization_config", data) if name == "config.json" else data
        section["quant_method"] = "gptq"
        (plain / name).write_text(json.dumps(data))
    with pytest.raises(QuantmillError, match="has input rotation tensors but quant_method is "
                                             "'gptq'"):
        load_gptq_checkpoint(plain)

    # a block that is not orthogonal is refused, not run
    bad = tmp_path / "bad"
    shutil_copy(out, bad)
    broken = dict(tensors)
    broken["model.layers.1.mlp.down_proj.input_rotation_block"] = 2 * torch.eye(3)
    save_file(broken, str(bad / "model.safetensors"))
    with pytest.raises(QuantmillError, match="bad input rotation of checkpoint module "
                                             "'model.layers.1.mlp.down_proj'.*not orthogonal"):
        load_gptq_checkpoint(bad)


def shutil_copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_rotated_checkpoint_reads_onto_every_device(tmp_path: Path, device: str) -> None:
    """The reader checks and applies the rotations where the tensors are loaded (a GPU)."""
    model = tiny_llama(hidden_size=96, intermediate_size=192)
    result = quantize_rotated(model)
    write_gptq_checkpoint(loaded(model), result, tmp_path / "ckpt")
    back = load_gptq_checkpoint(tmp_path / "ckpt", device=device).model
    ids = (torch.arange(14) * 17 % 64).reshape(2, 7).to(device)
    with torch.no_grad():
        got = back(input_ids=ids).logits.cpu()
    torch.testing.assert_close(got, logits(reference_model(model, result)), rtol=1e-4,
                               atol=1e-5)


def test_rtn_rotated_result_round_trips_and_exports_dequantized(tmp_path: Path) -> None:
    """The rtn plugin's rotated weights, through the GPTQ checkpoint and through the plain fp16
    export (what any runtime loads)."""
    from quantmill.plugins.formats.dequantized import write_dequantized_checkpoint
    from quantmill.plugins.quantizers.rtn.plugin import RTNQuantizer

    model = tiny_llama(hidden_size=96, intermediate_size=192)
    quantizer = RTNQuantizer.from_options({"bits": 4, "group_size": 32, "rotation": "hadamard"})
    names = [n for n, m in model.named_modules() if n.endswith(PROJECTIONS)]
    result = quantizer.quantize(model, QuantPlan(dict.fromkeys(names,
                                                               quantizer.default_spec())), None)
    write_gptq_checkpoint(loaded(model), result, tmp_path / "gptq")
    assert_round_trip(model, result, tmp_path / "gptq")
    write_dequantized_checkpoint(loaded(model), result, tmp_path / "fp16")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "fp16", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(plain), logits(reference_model(model, result)),
                               rtol=2e-2, atol=2e-3)  # fp16 weights


def test_writers_refuse_what_they_cannot_hold(tmp_path: Path) -> None:
    from dataclasses import replace

    from quantmill.plugins.formats.compressed_tensors import write_compressed_tensors_checkpoint

    model = tiny_llama(hidden_size=96, intermediate_size=192)
    result = quantize_rotated(model)
    name = "model.layers.1.mlp.up_proj"
    half = QuantizationResult({**result.weights, name: replace(result.weights[name],
                                                               input_rotation=None)},
                              result.plan, {})
    with pytest.raises(QuantmillError, match="needs every module rotated; "
                                             "model.layers.1.mlp.up_proj are not"):
        write_gptq_checkpoint(loaded(model), half, tmp_path / "half")
    assert not (tmp_path / "half").exists()
    with pytest.raises(QuantmillError, match="cannot write module .* input rotation"):
        write_compressed_tensors_checkpoint(loaded(model), result, tmp_path / "ct")


def test_reader_names_a_missing_or_misshapen_rotation_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_llama(hidden_size=96, intermediate_size=192)
    out = tmp_path / "rotated"
    write_gptq_checkpoint(loaded(model), quantize_rotated(model), out)
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj"
    for label, change, message in [
        ("no-block", lambda t: t.pop(f"{name}.input_rotation_block"),
         f"'{name}' is rotated but lacks tensor {name}.input_rotation_block"),
        ("short-signs", lambda t: t.update({f"{name}.input_rotation_signs":
                                            t[f"{name}.input_rotation_signs"][:48]}),
         f"{name}.input_rotation_signs has shape \\(48,\\); the module has 96 inputs"),
    ]:
        broken = dict(tensors)
        change(broken)
        target = tmp_path / label
        shutil_copy(out, target)
        save_file(broken, str(target / "model.safetensors"))
        with pytest.raises(QuantmillError, match=message):
            load_gptq_checkpoint(target)
