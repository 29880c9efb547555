"""SmoothQuant for dynamic int8: the factors, the float identity it must be, the int8 error it
must lower, the groups it finds (and refuses), and the quantizer's contract (model untouched,
norm changes as float overrides, tied embeddings intact, checkpoint equal to the in-memory
model)."""

from __future__ import annotations

import copy
import gc
import json
import math
import re
import weakref
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from quantmill.plugins.base import CalibrationSet, LoadedModel, QuantPlan
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.formats.compressed_tensors import (
    load_compressed_tensors_checkpoint,
    write_compressed_tensors_checkpoint,
)
from quantmill.plugins.models.int8_linear import Int8DynamicLinear
from quantmill.plugins.models.modules import quantizable_linears
from quantmill.plugins.quantizers.dynamic_int8.algorithm import (
    dynamic_int8_matmul_reference,
    quantize_weight,
    signed_weight,
)
from quantmill.plugins.quantizers.dynamic_int8.groups import (
    activation_absmax,
    activation_stats,
    find_groups,
    norm_scales_linearly,
)
from quantmill.plugins.quantizers.dynamic_int8.plugin import (
    DynamicInt8Quantizer,
    apply_smoothing,
    plan_smoothing,
    smoothing_changes,
)
from quantmill.plugins.quantizers.dynamic_int8.smoothing import (
    ALPHA_GRID,
    SCALE_MAX,
    SCALE_MIN,
    check_alpha,
    search_alpha,
    smoothed_tensors,
    smoothing_scales,
    w8a8_error,
)

OUTLIERS = [3, 17, 40]  # hidden channels made ~30x louder than the rest


def outlier_llama(vocab_size: int = 256, seed: int = 0, bias: bool = False
                  ) -> LlamaForCausalLM:
    """A tiny random Llama whose norms give a few hidden channels outlier magnitudes (as trained
    LLMs have) and whose other norm weights (and biases) vary, so a lost or misplaced factor
    shows."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
                param[OUTLIERS] *= 30
            elif name.endswith(".bias"):
                param.copy_(torch.randn_like(param) * 0.5)
    return model


def calibration(samples: int = 6, seq_len: int = 32, vocab: int = 256) -> CalibrationSet:
    ids = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(1))
    return CalibrationSet(input_ids=ids, description={"source": "random"})


def all_linears(model: torch.nn.Module) -> set[str]:
    return set(quantizable_linears(model, ["*embed*"]))


def with_tensors(model: torch.nn.Module, changed: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` holding ``changed`` (an untied lm_head where lm_head changed)."""
    model = copy.deepcopy(model)
    if "lm_head.weight" in changed:
        model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features,
                                        bias=False)
    state = model.state_dict()
    state.update(changed)
    model.load_state_dict(state)
    return model


def quantized_in_memory(model: torch.nn.Module, result) -> torch.nn.Module:
    """The quantized model without files: float overrides applied, linears int8, other float
    tensors rounded through fp16 as a checkpoint stores them."""
    model = copy.deepcopy(model)
    if "lm_head" in result.weights:
        model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features,
                                        bias=False)  # untied, as in the checkpoint
    state = model.state_dict()
    state.update(result.float_overrides)
    model.load_state_dict(state)
    with torch.no_grad():
        for param in model.parameters():  # not the buffers: a reader rebuilds rotary's own
            param.copy_(param.half().float())
    for name, qw in result.weights.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8DynamicLinear.from_quantized(qw))
    return model


IDS = torch.tensor([[1, 5, 9, 200, 3, 17, 42, 7, 11, 90], [8, 8, 120, 4, 99, 250, 0, 6, 2, 1]])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the factors ---------------------------------------------------------------------------------


def test_scales_follow_the_formula_with_guards() -> None:
    act = torch.tensor([4.0, 1.0, 0.0, 9.0, 1e12])
    w1 = torch.tensor([[1.0, 0.25, 1.0, 0.0, 1.0]])
    w2 = torch.tensor([[-0.5, -1.0, 2.0, 0.0, 1e-12]])  # the maximum is over both consumers
    s = smoothing_scales(act, [w1, w2], alpha=0.5)
    assert torch.allclose(s[:2], torch.tensor([4.0**0.5 / 1.0**0.5, 1.0 / 1.0]))
    assert s[2] == 1.0 and s[3] == 1.0  # dead activation channel, dead weight column
    assert s[4] == SCALE_MAX  # clamped
    s = smoothing_scales(torch.tensor([1e-12]), [torch.tensor([[1e6]])], alpha=0.5)
    assert s[0] == SCALE_MIN
    s8 = smoothing_scales(act[:2], [w1[:, :2], w2[:, :2]], alpha=0.8)
    assert torch.allclose(s8, torch.tensor([4.0**0.8, 1.0]))
    with pytest.raises(ValueError, match="different widths"):
        smoothing_scales(act, [w1, torch.ones(2, 3)], 0.5)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_bad_alpha_is_refused(alpha: float) -> None:
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        check_alpha(alpha)
    with pytest.raises(ValidationError, match="strictly between 0 and 1"):
        DynamicInt8Quantizer.from_options({"smooth": True, "smooth_alpha": alpha})


@pytest.mark.parametrize("alpha", ["high", "0.5", True, None])
def test_alpha_must_be_a_number_or_auto(alpha: object) -> None:
    with pytest.raises(ValidationError, match="number strictly between 0 and 1, or 'auto'"):
        DynamicInt8Quantizer.from_options({"smooth": True, "smooth_alpha": alpha})
    assert DynamicInt8Quantizer.from_options({"smooth_alpha": "auto"}).config.smooth_alpha == (
        "auto")
    with pytest.raises(ValidationError, match="smoothing"):  # unknown keys stay refused
        DynamicInt8Quantizer.from_options({"smoothing": True})


def test_smoothed_tensors_are_new_and_compose() -> None:
    norm, w = torch.rand(8) + 0.5, torch.randn(4, 8)
    s = torch.rand(8) + 0.5
    out = smoothed_tensors(s, {"n": norm}, {"w": w})
    assert torch.allclose(out["n"], norm / s) and torch.allclose(out["w"], w * s)
    assert out["w"].data_ptr() != w.data_ptr()
    x = torch.randn(5, 8)
    assert torch.allclose((x * out["n"]) @ out["w"].T, (x * norm) @ w.T, rtol=1e-5, atol=1e-6)
    rows = smoothed_tensors(s[:4], {"up": w}, {})["up"]  # a linear producer: rows divided
    assert torch.allclose(rows, w / s[:4, None])


def test_smoothing_lowers_the_int8_error_of_outlier_channels() -> None:
    """Per-token int8 activations with a few loud channels: smoothing (a float identity) cuts
    the W8A8 output error several times over, at the default alpha and at a larger one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g)
    x[:, [5, 60, 99]] *= 40.0
    w = torch.randn(96, 128, generator=g) * 0.05
    exact = x.double() @ w.double().T

    def reference_error(x: torch.Tensor, w: torch.Tensor) -> float:
        qw = quantize_weight(w)
        y = dynamic_int8_matmul_reference(x, signed_weight(qw), qw.scales[0])
        return rel(y, exact)

    plain = reference_error(x, w)
    errors = {}
    for alpha in (0.5, 0.8):
        s = smoothing_scales(x.abs().amax(0), [w], alpha)
        assert torch.allclose((x / s).double() @ (w * s).double().T, exact, rtol=1e-4,
                              atol=1e-4 * float(exact.abs().max()))
        errors[alpha] = reference_error(x / s, w * s)
    assert errors[0.5] < plain / 3 and errors[0.8] < plain / 1.5, (plain, errors)

    # the float simulation used to compare alphas is the runtime's arithmetic
    assert w8a8_error(x, [w]) == pytest.approx(plain**2, rel=1e-4)
    best, tried = search_alpha(x, x.abs().amax(0), [w])
    assert set(tried) == set(ALPHA_GRID) and tried[best] == min(tried.values())
    assert tried[0.5] == pytest.approx(errors[0.5]**2, rel=1e-4)
    assert tried[best] < plain**2 / 9


# -- the groups ----------------------------------------------------------------------------------


def test_groups_of_a_llama() -> None:
    model = outlier_llama()
    groups, refused = find_groups(model)
    assert refused == {}
    by_name = {g.name: g for g in groups}
    assert list(by_name) == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.1.mlp.down_proj",
        "lm_head"]
    attn = by_name["model.layers.0.self_attn"]
    assert attn.producer == "model.layers.0.input_layernorm" and attn.producer_kind == "norm"
    assert attn.consumers == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    down = by_name["model.layers.1.mlp.down_proj"]
    assert (down.producer, down.producer_kind, down.consumers) == (
        "model.layers.1.mlp.up_proj", "linear", ("model.layers.1.mlp.down_proj",))
    assert by_name["lm_head"].producer == "model.norm"
    assert all(not c.endswith("o_proj") for g in groups for c in g.consumers)


class OnePlusNorm(torch.nn.Module):
    """Gemma-style RMSNorm: ``(1 + weight)`` cannot absorb a factor."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_norms_that_cannot_absorb_a_factor_are_refused() -> None:
    model = outlier_llama()
    assert norm_scales_linearly(model.model.norm)
    assert norm_scales_linearly(torch.nn.LayerNorm(8))
    model.model.layers[1].input_layernorm = OnePlusNorm(64)
    assert not norm_scales_linearly(model.model.layers[1].input_layernorm)
    groups, refused = find_groups(model)
    assert "model.layers.1.self_attn" not in {g.name for g in groups}
    assert "does not scale linearly" in refused["model.layers.1.self_attn"]
    _, details = smoothing_changes(model, all_linears(model), calibration().input_ids, 0.5)
    assert "model.layers.1.self_attn" in details["skipped_groups"]
    assert len(details["smoothed_groups"]) == 6


def test_consumers_reading_something_else_are_caught() -> None:
    """Wiring the names suggest but the model contradicts (here: the MLP of layer 0 reads a
    changed copy of its norm's output) is seen on the first batch and not smoothed."""
    model = outlier_llama()
    model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    groups, _ = find_groups(model)
    absmax, bad = activation_absmax(model, groups, calibration().input_ids, batch_size=2)
    assert set(bad) == {"model.layers.0.mlp"}
    assert "does not read the output of 'model.layers.0.post_attention_layernorm'" in bad[
        "model.layers.0.mlp"]
    assert set(absmax) == {g.name for g in groups} - set(bad)
    assert all(not h for m in model.modules() for h in (m._forward_hooks,))  # hooks removed


def test_activation_maxima_are_over_every_batch() -> None:
    model = outlier_llama()
    groups, _ = find_groups(model)
    ids = calibration(samples=5).input_ids
    whole, _ = activation_absmax(model, groups, ids, batch_size=5)
    batched, _ = activation_absmax(model, groups, ids, batch_size=2)  # 2 + 2 + 1
    assert whole.keys() == batched.keys() and len(whole) == 7
    for name in whole:
        assert torch.allclose(whole[name], batched[name], rtol=1e-5)
    # the final norm's maxima cover every position, not only those logits were computed for
    seen = []
    handle = model.model.norm.register_forward_hook(
        lambda module, args, out: seen.append(out.abs().amax(dim=(0, 1))))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    assert torch.allclose(whole["lm_head"], seen[0], rtol=1e-5)
    assert float(whole["model.layers.0.self_attn"][OUTLIERS].min()) > 5 * float(
        whole["model.layers.0.self_attn"].median())

    # samples for smooth_alpha auto: the requested number of real activation rows, and a
    # group's sample does not depend on which other groups are recorded
    stats = activation_stats(model, groups, ids, batch_size=2, sample_tokens=40)
    alone = activation_stats(model, groups[-1:], ids, batch_size=2, sample_tokens=40)
    assert {k: tuple(v.shape) for k, v in stats.samples.items()} == {
        g.name: (40, 128 if g.producer_kind == "linear" else 64) for g in groups}
    assert torch.equal(stats.samples["lm_head"], alone.samples["lm_head"])
    assert torch.all(stats.samples["lm_head"].abs() <= whole["lm_head"] + 1e-6)


# -- smoothing a model ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_smoothing_is_an_identity_in_float(bias: bool) -> None:
    """Every group smoothed, lm_head included: the float model's logits stay the same (with
    biases too: up_proj's bias is divided with its rows)."""
    model = outlier_llama(bias=bias)
    changed, details = smoothing_changes(model, all_linears(model), calibration().input_ids,
                                         0.5, batch_size=4)
    assert len(details["smoothed_groups"]) == 7 and details["skipped_groups"] == {}
    assert "model.norm.weight" in changed and "lm_head.weight" in changed
    assert ("model.layers.0.mlp.up_proj.bias" in changed) == bias
    assert not any("o_proj" in key or "embed" in key for key in changed)
    smoothed = with_tensors(model, changed)
    with torch.no_grad():
        before, after = model(IDS).logits, smoothed(IDS).logits
    assert rel(after, before) < 1e-4
    # and the activations the int8 layers will see are flatter
    new_max, _ = activation_absmax(smoothed, find_groups(smoothed)[0], calibration().input_ids,
                                   batch_size=4)
    old_max, _ = activation_absmax(model, find_groups(model)[0], calibration().input_ids,
                                   batch_size=4)
    name = "model.layers.1.self_attn"
    ratio = [float(m.max() / m.median()) for m in (old_max[name], new_max[name])]
    assert ratio[1] < ratio[0] / 3


def test_groups_with_float_members_are_left_alone() -> None:
    model = outlier_llama()
    names = all_linears(model) - {"model.layers.0.self_attn.v_proj", "lm_head",
                                  "model.layers.1.mlp.up_proj"}
    changed, details = smoothing_changes(model, names, calibration().input_ids, 0.5)
    assert details["skipped_groups"] == {
        "lm_head": "lm_head not quantized",
        "model.layers.0.self_attn": "model.layers.0.self_attn.v_proj not quantized",
        "model.layers.1.mlp": "model.layers.1.mlp.up_proj not quantized",
        "model.layers.1.mlp.down_proj": "model.layers.1.mlp.up_proj not quantized",
    }
    assert all(key.removesuffix(".weight") in names for key in changed if "norm" not in key)
    assert "model.norm.weight" not in changed
    assert rel(with_tensors(model, changed)(IDS).logits.detach(),
               model(IDS).logits.detach()) < 1e-4


def _block(key: str) -> float:
    found = re.match(r"model\.layers\.(\d+)\.", key)
    return int(found.group(1)) if found else math.inf


def test_smoothed_tensors_stream_out_and_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantizer consumes ``apply_smoothing``: every changed tensor comes once, when no
    later group changes it (the values of the all-at-once result), block by block, and the
    stream keeps no reference to what it gave, so one block's float copies are alive at a
    time, not the whole model's."""
    model = outlier_llama(bias=True)
    ids = calibration().input_ids
    plan = plan_smoothing(model, all_linears(model), ids, 0.5, batch_size=4)
    # reference, independent of the streaming code: every group applied in turn to one dict
    state = dict(model.state_dict())
    together: dict[str, torch.Tensor] = {}
    for group, scales in plan.steps:
        producer = {k: together.get(k, state[k]) for k in
                    (f"{group.producer}.weight", f"{group.producer}.bias") if k in state}
        consumers = {f"{c}.weight": together.get(f"{c}.weight", state[f"{c}.weight"])
                     for c in group.consumers}
        together.update(smoothed_tensors(scales, producer, consumers))
    from quantmill.plugins.quantizers.dynamic_int8 import plugin

    groups_done = []
    real = plugin.smoothed_tensors
    monkeypatch.setattr(plugin, "smoothed_tensors",
                        lambda *args: groups_done.append(1) or real(*args))
    keys, given_before_block_1, alive_at_block_1, done_at_first = [], [], None, None
    for key, tensor in apply_smoothing(model, plan):
        done_at_first = len(groups_done) if done_at_first is None else done_at_first
        assert torch.equal(tensor, together[key]), key
        if _block(key) >= 1 and alive_at_block_1 is None:
            gc.collect()
            alive_at_block_1 = [k for k, ref in given_before_block_1 if ref() is not None]
        if _block(key) == 0:
            given_before_block_1.append((key, weakref.ref(tensor)))
        keys.append(key)
        del tensor
    assert sorted(keys) == sorted(together) and len(keys) == len(set(keys))
    assert [_block(k) for k in keys] == sorted(_block(k) for k in keys)
    # up_proj's rows are changed by the down_proj group, after its columns (MLP group)
    assert keys.index("model.layers.0.mlp.up_proj.weight") > keys.index(
        "model.layers.0.mlp.gate_proj.weight")
    assert len(given_before_block_1) > 5 and alive_at_block_1 == []
    assert done_at_first == 1 and len(groups_done) == len(plan.steps) == 7  # made as it goes
    del together


# -- the quantizer -------------------------------------------------------------------------------


def quantize(model: torch.nn.Module, skip: list[str], smooth: bool,
             alpha: float | str = 0.5):
    quantizer = DynamicInt8Quantizer.from_options(
        {"skip": skip, "smooth": smooth, "smooth_alpha": alpha, "batch_size": 4})
    names = quantizable_linears(model, quantizer.skip_patterns())
    plan = QuantPlan({n: quantizer.default_spec() for n in names})
    return quantizer.quantize(model, plan, calibration() if smooth else None)


def test_quantizer_smooths_without_touching_the_model() -> None:
    model = outlier_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert DynamicInt8Quantizer.from_options({"smooth": True}).needs_calibration
    assert not DynamicInt8Quantizer.from_options({"smooth": False}).needs_calibration
    result = quantize(model, ["*embed*"], smooth=True, alpha=0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is untouched
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert "lm_head" in result.weights
    # the norms come back as float overrides; smoothed linears are in the quantized weights
    assert sorted(result.float_overrides) == sorted(
        [f"model.layers.{i}.{n}.weight" for i in range(2)
         for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm.weight"])
    smoothing = result.details["smoothing"]
    assert smoothing["used"] and smoothing["alpha"] == 0.5
    assert len(smoothing["smoothed_groups"]) == 7 and smoothing["skipped_groups"] == {}
    assert "o_proj" in smoothing["note"] and smoothing["calibration_tokens"] == 6 * 32
    json.dumps(result.details)  # the registry stores it
    plain = quantize(model, ["*embed*"], smooth=False)
    assert plain.float_overrides == {} and plain.details["smoothing"] == {"used": False}


def test_smoothing_lowers_the_quantized_model_error() -> None:
    model = outlier_llama()
    with torch.no_grad():
        exact = model(IDS).logits
        errors = {smooth: rel(quantized_in_memory(model, quantize(model, ["*embed*"],
                                                                   smooth))(IDS).logits, exact)
                  for smooth in (False, True)}
    assert errors[True] < errors[False] / 2, errors


def test_auto_alpha_is_chosen_per_group_and_reported() -> None:
    model = outlier_llama()
    result = quantize(model, ["*embed*"], smooth=True, alpha="auto")
    smoothing = result.details["smoothing"]
    assert smoothing["alpha"] == "auto" and len(smoothing["alphas"]) == 7
    assert set(smoothing["alphas"].values()) <= set(ALPHA_GRID)
    assert smoothing["alpha_grid"] == list(ALPHA_GRID)
    json.dumps(result.details)
    with torch.no_grad():
        exact = model(IDS).logits
        auto = rel(quantized_in_memory(model, result)(IDS).logits, exact)
        plain = rel(quantized_in_memory(model, quantize(model, ["*embed*"], False))(IDS).logits,
                    exact)
    assert auto < plain / 2, (auto, plain)


def test_smoothing_needs_a_calibration_set() -> None:
    model = outlier_llama()
    quantizer = DynamicInt8Quantizer.from_options({"smooth": True})
    plan = QuantPlan({n: quantizer.default_spec()
                      for n in quantizable_linears(model, quantizer.skip_patterns())})
    with pytest.raises(QuantmillError, match="needs a calibration set"):
        quantizer.quantize(model, plan, None)


def test_checkpoint_reloads_as_the_in_memory_model_with_embeddings_intact(
        tmp_path: Path) -> None:
    """Smoothed W8A8 with lm_head int8 written as compressed-tensors: the files compute what
    the in-memory quantized model computes, the norms in the file are the smoothed ones, and
    the tied embedding keeps its original values (lm_head gets its own int8 weight)."""
    model = outlier_llama()
    result = quantize(model, ["*embed*"], smooth=True)
    out = tmp_path / "ckpt"
    write_compressed_tensors_checkpoint(LoadedModel(model, None, tmp_path, "hf"), result, out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = load_file(out / "model.safetensors")
    assert tensors["lm_head.weight"].dtype == torch.int8
    assert torch.equal(tensors["model.embed_tokens.weight"],
                       model.model.embed_tokens.weight.detach().half())
    for key, value in result.float_overrides.items():
        assert torch.equal(tensors[key], value.half())
        assert not torch.allclose(tensors[key].float(), model.state_dict()[key], rtol=1e-2)

    loaded = load_compressed_tensors_checkpoint(out)
    assert isinstance(loaded.model.lm_head, Int8DynamicLinear)
    assert loaded.model.lm_head.weight is not loaded.model.model.embed_tokens.weight
    with torch.no_grad():
        from_files = loaded.model(IDS).logits
        in_memory = quantized_in_memory(model, result)(IDS).logits
        exact = model(IDS).logits
    assert rel(from_files, in_memory) < 1e-5
    assert rel(from_files, exact) < 0.05  # and it is still the model
