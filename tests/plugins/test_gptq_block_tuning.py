"""Block tuning after GPTQ (``block_tuning``): it lowers each block's output error against the
float model and the model's logits error, its results stay in GPTQ's format (integer codes in
range, fp16 scales, the same zero points), a tuning that cannot help leaves GPTQ's result as it
was, and tuned norm weights reach the checkpoint."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantmill.plugins.base import CalibrationSet, LoadedModel, ModuleQuantSpec, QuantPlan
from quantmill.plugins.blockwise.pipeline import PipelineOptions, run_blockwise
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.formats.gptq import write_gptq_checkpoint
from quantmill.plugins.models.modules import block_output, quantizable_linears
from quantmill.plugins.models.sources import GPTQCheckpointSource
from quantmill.plugins.quantizers.gptq.block_tuning import (
    TuningSettings,
    _split,
    _split_kwargs,
    round_ste,
    tune_block,
)
from quantmill.plugins.quantizers.gptq.layerwise import GPTQBlocks, LayerwiseOptions
from quantmill.plugins.quantizers.gptq.plugin import GPTQQuantizer
from quantmill.plugins.quantizers.rtn.algorithm import quantize_groups


@pytest.fixture(scope="module")
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 256, (12, 48), generator=torch.Generator().manual_seed(1))


def quantize(model: torch.nn.Module, ids: torch.Tensor, **tuning: object):
    q = GPTQQuantizer.from_options({"bits": 3, "group_size": 32, "batch_size": 4,
                                    "block_tuning": tuning})
    plan = QuantPlan({n: q.default_spec() for n in quantizable_linears(model, q.skip_patterns())})
    return q.quantize(model, plan, CalibrationSet(ids, {}))


def quantized_copy(model: torch.nn.Module, result) -> torch.nn.Module:
    work = copy.deepcopy(model)
    modules = dict(work.named_modules())
    state = work.state_dict()
    with torch.no_grad():
        for name, qw in result.weights.items():
            modules[name].weight.copy_(qw.dequantize())
        for key, value in result.float_overrides.items():
            state[key].copy_(value)
    return work


def logits_error(model: torch.nn.Module, result, ids: torch.Tensor) -> float:
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        return float((quantized_copy(model, result)(input_ids=ids).logits - reference)
                     .pow(2).mean())


def test_round_ste_rounds_forward_and_passes_gradients() -> None:
    x = torch.tensor([0.2, 1.6, -2.4], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0, -2.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_tuning_lowers_block_and_model_error(tiny_llama, calib_ids) -> None:
    plain = quantize(tiny_llama, calib_ids)
    tuned = quantize(tiny_llama, calib_ids, epochs=8, lr=3e-3, norms=True)
    losses = tuned.details["block_tuning_losses"]
    assert set(losses) == {"model.layers.0", "model.layers.1"}
    for block in losses.values():
        assert block["kept"] and block["after"] < block["before"]
    assert "block_tuning_losses" not in plain.details
    ids = calib_ids[:, :32]
    assert logits_error(tiny_llama, tuned, ids) < logits_error(tiny_llama, plain, ids)
    # the norms moved and come back as float overrides (the model itself is untouched)
    assert set(tuned.float_overrides) == {
        f"model.layers.{i}.{n}.weight" for i in (0, 1)
        for n in ("input_layernorm", "post_attention_layernorm")}
    key = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(tuned.float_overrides[key], tiny_llama.state_dict()[key])


def test_tuned_weights_stay_in_gptq_format(tiny_llama, calib_ids) -> None:
    plain = quantize(tiny_llama, calib_ids)
    tuned = quantize(tiny_llama, calib_ids, epochs=4, lr=3e-3, codes_lr=0.05)
    assert all(b["kept"] for b in tuned.details["block_tuning_losses"].values())
    changed_codes = changed_scales = 0
    for name, qw in tuned.weights.items():
        ref = plain.weights[name]
        assert qw.intweight.dtype == ref.intweight.dtype
        assert int(qw.intweight.min()) >= 0 and int(qw.intweight.max()) <= 7
        assert torch.equal(qw.scales, qw.scales.half().float())  # what fp16 stores exactly
        if name.startswith("model.layers.0."):  # later blocks see another (tuned) stream
            assert torch.equal(qw.zeros, ref.zeros) and torch.equal(qw.g_idx, ref.g_idx)
        changed_codes += int((qw.intweight != ref.intweight).sum())
        changed_scales += int((qw.scales != ref.scales).sum())
    assert changed_codes > 0 and changed_scales > 0
    # codes frozen (codes_lr 0): only the scales move (block 0: the same inputs as plain GPTQ)
    scales_only = quantize(tiny_llama, calib_ids, epochs=2)
    first = [n for n in scales_only.weights if n.startswith("model.layers.0.")]
    assert len(first) == 7
    assert all(torch.equal(scales_only.weights[n].intweight, plain.weights[n].intweight)
               for n in first)
    assert any(not torch.equal(scales_only.weights[n].scales, plain.weights[n].scales)
               for n in first)


def test_tuning_that_cannot_help_keeps_gptq_result(tiny_llama) -> None:
    """Targets the block already meets exactly: the loss cannot go down, GPTQ's weights stand."""
    block = copy.deepcopy(tiny_llama.model.layers[0])
    weights = {name: quantize_groups(block.get_submodule(name).weight.detach(), 4, 32,
                                     sym=False)
               for name in ("self_attn.q_proj", "mlp.down_proj")}
    with torch.no_grad():
        for name, qw in weights.items():
            block.get_submodule(name).weight.copy_(qw.dequantize())
    torch.manual_seed(2)
    x = torch.randn(4, 8, 64)
    position = torch.arange(8).unsqueeze(0)
    kwargs = {"position_embeddings": tiny_llama.model.rotary_emb(x, position)}
    with torch.no_grad():
        out = block(x, **kwargs)
        target = out[0] if isinstance(out, tuple) else out
    tuned = tune_block(block, weights, [x], [target], [kwargs],
                       TuningSettings(epochs=3, lr=1e-2, batch_size=2))
    assert not tuned.stats.kept and tuned.stats.loss_before < 1e-10
    assert tuned.norms == {} and tuned.dense == {}
    assert all(tuned.weights[n] is weights[n] for n in weights)


def _one_block_case(tiny_llama, bits: int = 3):
    """Block 0 of the tiny model with RTN weights, random inputs, float targets."""
    block = copy.deepcopy(tiny_llama.model.layers[0])
    target_block = tiny_llama.model.layers[0]
    weights = {name: quantize_groups(block.get_submodule(name).weight.detach(), bits, 32,
                                     sym=False)
               for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    with torch.no_grad():
        for name, qw in weights.items():
            block.get_submodule(name).weight.copy_(qw.dequantize())
    x = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(3))
    kwargs = {"position_embeddings": tiny_llama.model.rotary_emb(x, torch.arange(8)[None])}
    with torch.no_grad():
        target = block_output(target_block(x, **kwargs))
    return block, weights, x, target, kwargs


def test_a_non_finite_loss_is_not_kept(tiny_llama) -> None:
    """A NaN loss (a diverging step, or a NaN in the data) compares false with everything, so
    "not lower" must be said explicitly: GPTQ's result stands."""
    block, weights, x, target, kwargs = _one_block_case(tiny_llama)
    target = target.clone()
    target[0, 0, 0] = float("nan")
    tuned = tune_block(block, weights, [x], [target], [kwargs],
                       TuningSettings(epochs=2, lr=1e-2, batch_size=4))
    assert math.isnan(tuned.stats.loss_after)
    assert not tuned.stats.kept and all(tuned.weights[n] is weights[n] for n in weights)


def test_kept_tuning_returns_what_the_block_should_run(tiny_llama) -> None:
    block, weights, x, target, kwargs = _one_block_case(tiny_llama)
    tuned = tune_block(block, weights, [x], [target], [kwargs],
                       TuningSettings(epochs=10, lr=1e-2, batch_size=2))
    assert tuned.stats.kept and tuned.stats.loss_after < tuned.stats.loss_before
    for name, dense in tuned.dense.items():
        assert torch.equal(dense, tuned.weights[name].dequantize())


def test_norms_requested_on_a_block_without_them_is_an_error(tiny_llama) -> None:
    block, weights, x, target, kwargs = _one_block_case(tiny_llama)
    block.input_layernorm = torch.nn.Sequential(block.input_layernorm)  # renamed parameter
    with pytest.raises(QuantmillError, match="norms: true"):
        tune_block(block, weights, [x], [target], [kwargs],
                   TuningSettings(epochs=1, norms=True))


def test_steps_slice_per_sample_arguments_only() -> None:
    """A [n, 1, s, s] mask is cut with its batch; batch-1 rotary tables and 1-d positions of
    length n are shared by every step."""
    n, seq = 4, 4
    batch = torch.randn(n, seq, 8)
    mask = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, seq, seq)
    cos = torch.randn(1, seq, 8)
    positions = torch.arange(seq)  # 1-d, length == n by coincidence
    steps = _split_kwargs([{"attention_mask": mask, "position_embeddings": (cos, cos),
                            "cache_position": positions}], [batch], 3)
    assert [s["attention_mask"].shape[0] for s in steps] == [3, 1]
    assert torch.equal(steps[1]["attention_mask"], mask[3:])
    assert all(s["position_embeddings"][0] is cos and s["cache_position"] is positions
               for s in steps)
    assert [b.shape[0] for b in _split([batch], 3)] == [3, 1]


def test_block_stream_targets_and_tuned_outputs(tiny_llama, calib_ids) -> None:
    """In the block-wise pass: the targets are the float model's hidden states, and after
    a kept tuning the stream holds the tuned block's outputs (what the next block must see)."""
    ids = calib_ids[:8, :32]
    model = tiny_llama
    options = LayerwiseOptions(activation_cache=torch.float32, batch_size=4,
                               tuning=TuningSettings(epochs=4, lr=3e-3))
    seen: dict[str, object] = {}

    class Watched(GPTQBlocks):
        def before_block(self, block):
            if block.index == 0:
                seen["inputs"] = [h.clone() for h in block.hidden]
            super().before_block(block)
            if block.index == 0:
                seen["targets"] = [t.clone() for t in self.float_stream]

        def after_block(self, block):
            super().after_block(block)
            if block.index == 0:
                seen.update(outcome=block.outcome, kwargs=block.kwargs,
                            outputs=[h.clone() for h in block.hidden])

    plan = {n: ModuleQuantSpec(3, 32, False, "gptq") for n in quantizable_linears(model)
            if n.startswith("model.layers.0.")}
    run_blockwise(model, list(plan), ids, Watched(plan, options), PipelineOptions(batch_size=4))
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(torch.cat(seen["targets"]), reference, atol=1e-5)
    outcome = seen["outcome"]
    assert outcome.block_details["tuning"]["kept"]
    tuned_block = copy.deepcopy(model.model.layers[0])
    with torch.no_grad():
        for name, qw in outcome.weights.items():
            local = name.removeprefix("model.layers.0.")
            tuned_block.get_submodule(local).weight.copy_(qw.dequantize())
        expected = [block_output(tuned_block(x, **kw))
                    for x, kw in zip(seen["inputs"], seen["kwargs"], strict=True)]
    assert torch.allclose(torch.cat(seen["outputs"]), torch.cat(expected), atol=1e-5)


def test_tuned_norms_reach_the_checkpoint(tiny_llama, calib_ids, tmp_path: Path) -> None:
    q = GPTQQuantizer.from_options({"bits": 4, "group_size": 32, "batch_size": 4,
                                    "block_tuning": {"epochs": 3, "norms": True}})
    assert q.changes_float_tensors  # recipes pair it only with exporters that write overrides
    assert not GPTQQuantizer.from_options({"block_tuning": {"epochs": 3}}).changes_float_tensors
    plan = QuantPlan({n: q.default_spec()
                      for n in quantizable_linears(tiny_llama, q.skip_patterns())})
    result = q.quantize(tiny_llama, plan, CalibrationSet(calib_ids, {}))
    assert result.float_overrides
    write_gptq_checkpoint(LoadedModel(tiny_llama, None, Path("/nonexistent"), "hf-safetensors"),
                          result, tmp_path / "ckpt")
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for key, value in result.float_overrides.items():
        assert torch.equal(stored[key], value.to(stored[key].dtype))
    reread = GPTQCheckpointSource().load(tmp_path / "ckpt", torch.device("cpu")).model
    ids = calib_ids[:2, :16]
    untuned = copy.deepcopy(result)
    untuned.float_overrides = {}
    with torch.no_grad():
        got = reread(input_ids=ids).logits.float()
        expected = quantized_copy(tiny_llama, result)(input_ids=ids).logits
        without = quantized_copy(tiny_llama, untuned)(input_ids=ids).logits
    # the reader runs the tuned norms (up to the checkpoint's fp16 rounding), not the old ones
    assert (got - expected).abs().mean() < 0.3 * (got - without).abs().mean()


@pytest.mark.parametrize("options,message", [
    ({"epochs": -1}, "epochs"), ({"lr": 0}, "lr"), ({"codes_lr": -0.1}, "codes_lr"),
    ({"batch_size": 0}, "batch_size"), ({"epoch": 3}, "epoch"),
])
def test_bad_block_tuning_config(options, message) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        GPTQQuantizer.from_options({"block_tuning": options})
