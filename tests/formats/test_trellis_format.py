"""The quantmill-trellis checkpoint: written from the trellis quantizer's result, read back as
TrellisLinear modules that compute exactly what was measured, sized as the allocator costs it,
and refused clearly when broken."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from quantmill.plugins.base import CalibrationSet, LoadedModel, QuantPlan
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.evaluators.size import packed_stats
from quantmill.plugins.formats.trellis import (
    TABLE_KEY,
    TrellisCheckpointSource,
    TrellisLinear,
    load_trellis_checkpoint,
    write_trellis_checkpoint,
)
from quantmill.plugins.models.sources import HFDirectorySource
from quantmill.plugins.quantizers.trellis.plugin import TrellisQuantizer


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=True)).eval()
    quantizer = TrellisQuantizer.from_options({"bits": 3, "state_bits": 8})
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
    plan = {n: quantizer.default_spec() for n in names}
    plan["model.layers.1.mlp.down_proj"] = type(quantizer.default_spec())(
        4, -1, True, "trellis", 0)  # one module at another width
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    result = quantizer.quantize(model, QuantPlan(plan), CalibrationSet(ids, {}))
    return model, result


def _reference(model: torch.nn.Module, result) -> torch.nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for param in ref.parameters():
            param.copy_(param.half().float())
        for name, weight in result.weights.items():
            ref.get_submodule(name).weight = torch.nn.Parameter(weight.dequantize())
    return ref


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=(torch.arange(14) * 17 % 128).reshape(2, 7)).logits


def test_checkpoint_runs_what_was_measured_at_the_planned_size(quantized, tmp_path: Path) -> None:
    model, result = quantized
    out = tmp_path / "ckpt"
    summary = write_trellis_checkpoint(LoadedModel(model, None, Path("/x"), "hf"), result, out)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "quantmill_trellis" and qcfg["state_bits"] == 8
    assert qcfg["modules"]["model.layers.1.mlp.down_proj"] == {"bits": 4}
    assert summary["bits"]["model.layers.0.self_attn.q_proj"] == 3
    loaded = TrellisCheckpointSource().load(out, torch.device("cpu"))
    modules = {n: m for n, m in loaded.model.named_modules() if isinstance(m, TrellisLinear)}
    assert set(modules) == set(result.weights)
    for name, weight in result.weights.items():
        assert torch.equal(modules[name].dequantize_weight(), weight.dequantize()), name
    torch.testing.assert_close(_logits(loaded.model), _logits(_reference(model, result)),
                               rtol=1e-4, atol=1e-5)
    quantized_weights, bits, _ = packed_stats(loaded.model)
    assert bits / quantized_weights == pytest.approx(
        result.details["trellis_bits_per_weight"], rel=1e-12)
    assert TrellisCheckpointSource().accepts(out) and not HFDirectorySource().accepts(out)


def test_broken_checkpoints_are_refused(quantized, tmp_path: Path) -> None:
    model, result = quantized
    out = tmp_path / "ckpt"
    write_trellis_checkpoint(LoadedModel(model, None, Path("/x"), "hf"), result, out)
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj"
    cases = [
        ("no-table", lambda t: t.pop(TABLE_KEY), "quantmill_trellis.table is missing"),
        ("no-scales", lambda t: t.pop(f"{name}.row_scales"),
         f"'{name}' lacks tensor {name}.row_scales"),
        ("short-paths", lambda t: t.update({f"{name}.trellis_paths":
                                            t[f"{name}.trellis_paths"][:, :3].contiguous()}),
         f"{name}.trellis_paths has shape"),
        ("bad-rotation", lambda t: t.update({f"{name}.input_rotation_block": 2 * torch.eye(3)}),
         "not orthogonal"),
    ]
    for label, change, message in cases:
        broken = dict(tensors)
        change(broken)
        target = tmp_path / label
        shutil.copytree(out, target)
        save_file(broken, str(target / "model.safetensors"))
        with pytest.raises(QuantmillError, match=message):
            load_trellis_checkpoint(target)
    with pytest.raises(QuantmillError, match="not a quantmill-trellis checkpoint"):
        load_trellis_checkpoint(_plain_dir(tmp_path))


def _plain_dir(tmp_path: Path) -> Path:
    path = tmp_path / "plain"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_readers_swap_modules_by_name_and_refuse_unknown_ones() -> None:
    from quantmill.plugins.formats.common import swap_quantized_module

    model = torch.nn.Sequential()
    model.add_module("block", torch.nn.Sequential())
    model.block.add_module("proj", torch.nn.Linear(4, 2))
    seen = []
    new = swap_quantized_module(model, "block.proj",
                                lambda module: seen.append(module) or torch.nn.Identity())
    assert isinstance(seen[0], torch.nn.Linear) and model.block.proj is new
    with pytest.raises(QuantmillError, match="quantizes 'block.gone', which the model lacks"):
        swap_quantized_module(model, "block.gone", lambda module: module)
