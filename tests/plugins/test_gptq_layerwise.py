"""Layer-by-layer GPTQ on a tiny random Llama: the staged single pass gives the same result as
a plain reference (full forwards with hooks, quantized modules swapped in one at a time), the
input model is left untouched, and unsupported architectures are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from quantmill.plugins.base import CalibrationSet, QuantPlan
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models.modules import quantizable_linears
from quantmill.plugins.quantizers.gptq.algorithm import (
    GPTQSettings,
    gptq_quantize,
)
from quantmill.plugins.quantizers.gptq.plugin import GPTQQuantizer
from quantmill.plugins.quantizers.hessian import HessianAccumulator
from quantmill.plugins.quantizers.rtn.plugin import RTNQuantizer

STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@pytest.fixture(scope="module")
def tiny_model(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def calib_ids():
    return torch.randint(0, 256, (12, 48), generator=torch.Generator().manual_seed(1))


def reference_gptq(model, ids, bits, group):
    """Textbook sequential GPTQ: for each stage, a full forward of the partly quantized model
    collects the stage's Hessian; then the stage's weights are replaced."""
    work = copy.deepcopy(model)
    modules = dict(work.named_modules())
    out = {}
    for i in range(len(work.model.layers)):
        for stage in STAGES:
            names = [f"model.layers.{i}.{s}" for s in stage]
            acc = HessianAccumulator(modules[names[0]].in_features)
            first = modules[names[0]]
            handle = first.register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0]))
            with torch.inference_mode():
                for start in range(0, ids.shape[0], 4):
                    work(input_ids=ids[start : start + 4])
            handle.remove()
            h = acc.hessian()
            for n in names:
                # the plugin's defaults: range search and scale refit on
                qw, _ = gptq_quantize(modules[n].weight, h, GPTQSettings(
                    bits=bits, group_size=group, mse_clip=True, refit_scales=True))
                modules[n].weight.data = qw.dequantize()
                out[n] = qw
    return out


def test_staged_pass_matches_reference(tiny_model, calib_ids) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    q = GPTQQuantizer.from_options({"bits": 4, "group_size": 32, "batch_size": 4,
                                    "activation_cache": "float32"})
    plan = QuantPlan({n: q.default_spec() for n in quantizable_linears(tiny_model,
                                                                         q.skip_patterns())})
    result = q.quantize(tiny_model, plan, CalibrationSet(calib_ids, {}))
    reference = reference_gptq(tiny_model, calib_ids, 4, 32)
    assert set(result.weights) == set(reference) and len(reference) == 14
    for name, qw in result.weights.items():
        same = (qw.intweight == reference[name].intweight).float().mean()
        assert same > 0.99, (name, float(same))  # only float summation order differs
    # the caller's model is untouched
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.details["layers"]["model.layers.1.mlp.down_proj"]["damp_used"] == 0.01


def _logits_error(model, result, ids) -> float:
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
    work = copy.deepcopy(model)
    mods = dict(work.named_modules())
    for name, qw in result.weights.items():
        mods[name].weight.data = qw.dequantize()
    with torch.inference_mode():
        return float((work(input_ids=ids).logits - ref).pow(2).mean())


def test_bfloat16_activation_cache_changes_little(tiny_model, calib_ids) -> None:
    """The default bf16 cache of o_proj/down_proj inputs: nearly the same integers and the same
    quality as the exact float32 pass."""
    results = {}
    for cache in ("float32", "bfloat16"):
        q = GPTQQuantizer.from_options({"bits": 4, "group_size": 32, "batch_size": 4,
                                        "activation_cache": cache})
        plan = QuantPlan({n: q.default_spec()
                          for n in quantizable_linears(tiny_model, q.skip_patterns())})
        results[cache] = q.quantize(tiny_model, plan, CalibrationSet(calib_ids, {}))
    exact, rounded = results["float32"], results["bfloat16"]
    assert rounded.details["activation_cache"] == "bfloat16"
    same = torch.cat([(exact.weights[n].intweight == rounded.weights[n].intweight).flatten()
                      for n in exact.weights]).float().mean()
    assert same > 0.95
    ids = calib_ids[:, :32]
    e_exact, e_rounded = (_logits_error(tiny_model, r, ids) for r in (exact, rounded))
    assert abs(e_rounded - e_exact) < 0.05 * e_exact


def test_gptq_model_output_closer_than_rtn(tiny_model, calib_ids) -> None:
    ids = calib_ids[:, :32]
    with torch.inference_mode():
        ref = tiny_model(input_ids=ids).logits
    errors = {}
    for cls in (RTNQuantizer, GPTQQuantizer):
        q = cls.from_options({"bits": 3, "group_size": 32})
        plan = QuantPlan({n: q.default_spec() for n in quantizable_linears(tiny_model,
                                                                             q.skip_patterns())})
        result = q.quantize(tiny_model, plan, CalibrationSet(calib_ids, {}))
        work = copy.deepcopy(tiny_model)
        mods = dict(work.named_modules())
        for name, qw in result.weights.items():
            mods[name].weight.data = qw.dequantize()
        with torch.inference_mode():
            errors[cls.name] = float((work(input_ids=ids).logits - ref).pow(2).mean())
    assert errors["gptq"] < errors["rtn"]


def test_non_block_module_is_refused(tiny_model, calib_ids) -> None:
    q = GPTQQuantizer.from_options({"bits": 4, "group_size": 32, "skip": []})
    plan = QuantPlan({n: q.default_spec() for n in quantizable_linears(tiny_model, [])})
    with pytest.raises(QuantmillError, match="'lm_head' is not one"):
        q.quantize(tiny_model, plan, CalibrationSet(calib_ids, {}))


@pytest.mark.parametrize("options,message", [
    ({"bits": 1}, "bits"), ({"group_size": 0}, "group_size"), ({"damp_percent": 0}, "damp"),
    ({"damp_percent": 1.5}, "damp"), ({"desc_order": True}, "desc_order"),
])
def test_bad_config(options, message) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        GPTQQuantizer.from_options(options)
