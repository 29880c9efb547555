"""Dynamic int8 (W8A8): per-channel int8 weights, per-token int8 activations, and every run-time
kernel computing the same exact integer product."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from quantmill.plugins.base import ModuleQuantSpec, QuantPlan
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.evaluators.size import packed_stats
from quantmill.plugins.models import int8_linear
from quantmill.plugins.models.int8_linear import Int8DynamicLinear
from quantmill.plugins.models.int8_siblings import fuse_siblings, unfuse_siblings
from quantmill.plugins.models.modules import quantizable_linears
from quantmill.plugins.quantizers.dynamic_int8.algorithm import (
    dynamic_int8_matmul_reference,
    quantize_per_token,
    quantize_weight,
    signed_weight,
)
from quantmill.plugins.quantizers.dynamic_int8.plugin import DynamicInt8Quantizer


def _backends() -> list[str]:
    """Every kernel that can run on this machine (fbgemm on x86 CPUs, int_mm with CUDA)."""
    names = ["reference"]
    if int8_linear.fbgemm_available():
        names.append("fbgemm")
    if torch.cuda.is_available():
        names.append("int_mm")
    return names


def _layer(out_features: int = 48, in_features: int = 80, seed: int = 0,
           bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    # rows of very different magnitude, so one scale per channel matters
    w = torch.randn(out_features, in_features, generator=gen)
    w *= torch.logspace(-3, 0, out_features)[:, None]
    b = torch.randn(out_features, generator=gen) if bias else None
    return w, b


def _module(w: torch.Tensor, b: torch.Tensor | None = None,
            backend: str = "auto") -> Int8DynamicLinear:
    qw = quantize_weight(w)
    qw.bias = b
    module = Int8DynamicLinear.from_quantized(qw, backend=backend)
    return module.to("cuda") if backend == "int_mm" else module


# -- weights -------------------------------------------------------------------------------------


def test_weights_are_symmetric_int8_per_channel() -> None:
    w, _ = _layer()
    qw = quantize_weight(w)
    assert (qw.bits, qw.sym, qw.group_size) == (8, True, -1)
    assert qw.scales.shape == (1, 48) and torch.all(qw.zeros == 128)
    q = signed_weight(qw).to(torch.int32)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127  # -128 never used
    expected = (w.abs().amax(dim=1) / 127).half().float()
    assert torch.equal(qw.scales[0], expected)  # fp16-exact scales
    # each row's largest weight is +-127, and every weight is within half a step
    assert torch.equal(q.abs().amax(dim=1), torch.full((48,), 127, dtype=torch.int32))
    err = (qw.dequantize() - w).abs()
    assert torch.all(err <= qw.scales[0][:, None] * 0.5 + 1e-7)


def test_zero_rows_and_extreme_rows_stay_finite() -> None:
    w = torch.zeros(3, 16)
    w[1] = 1e-30  # underflows fp16 scales
    w[2, 0] = 5.0
    qw = quantize_weight(w)
    assert torch.isfinite(qw.scales).all() and torch.all(qw.scales > 0)
    assert torch.equal(qw.dequantize()[0], torch.zeros(16))
    assert float(qw.dequantize()[2, 0]) == pytest.approx(5.0, rel=1e-3)


def test_module_round_trips_its_quantized_weight() -> None:
    w, b = _layer(bias=True)
    qw = quantize_weight(w)
    qw.bias = b
    module = Int8DynamicLinear.from_quantized(qw)
    assert {k: v.dtype for k, v in module.state_dict().items()} == {
        "weight": torch.int8, "weight_scale": torch.float16, "bias": torch.float16}
    assert module.weight_scale.shape == (48, 1)
    back = module.to_quantized()
    assert torch.equal(back.intweight, qw.intweight) and torch.equal(back.scales, qw.scales)
    assert torch.equal(module.dequantize_weight(), qw.dequantize())


# -- activations and kernels ---------------------------------------------------------------------


def test_per_token_quantization() -> None:
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [300.0, -150.0, 1.0]])
    q, scale = quantize_per_token(x)
    assert torch.equal(q[0], torch.tensor([64.0, -127.0, 32.0]))  # 63.5 rounds to even
    assert torch.equal(q[1], torch.zeros(3))
    assert torch.equal(q[2], torch.tensor([127.0, -64.0, 0.0]))  # -63.5 rounds to even
    assert torch.allclose(scale.flatten()[[0, 2]], torch.tensor([1.0 / 127, 300.0 / 127]))


@pytest.mark.parametrize("backend", _backends())
def test_output_within_the_per_token_error_bound(backend: str) -> None:
    """|y - x @ W_deq.T| <= (token scale / 2) * sum_k |W_deq[n, k]|: the only error is rounding
    each activation to its token's int8 grid (the weights are taken as dequantized)."""
    w, b = _layer(bias=True)
    module = _module(w, b, backend)
    x = torch.randn(2, 5, 80) * torch.logspace(-2, 2, 5)[None, :, None]  # 3-D, varied tokens
    y = module(x.to(module.weight.device)).cpu()
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    w_deq = module.dequantize_weight().cpu()
    exact = x @ w_deq.T + module.bias.float().cpu()
    step = x.abs().amax(dim=-1, keepdim=True) / 127  # [2, 5, 1]
    bound = step / 2 * w_deq.abs().sum(dim=1)  # [2, 5, 48]
    err = (y - exact).abs()
    assert torch.all(err <= bound * (1 + 1e-4) + 1e-5)
    assert float(err.max()) > 0  # activations really were quantized


@pytest.mark.parametrize("tokens", [33, int8_linear.FBGEMM_MAX_TOKENS + 16])
@pytest.mark.parametrize("backend", _backends())
def test_kernels_compute_the_exact_integer_product(backend: str, tokens: int) -> None:
    """Every kernel (the fbgemm one below and above its token limit) equals the float64
    integer oracle, also on inputs built to overflow a saturating u8 x s8 pair sum
    (full-range activations against +-127 weights), and on a token of zeros."""
    w, _ = _layer(out_features=64, in_features=96, seed=1)
    w[:8] = torch.where(torch.arange(96) % 2 == 0, 1.0, -1.0)  # +-127 after quantization
    module = _module(w, backend=backend)
    x = torch.randn(tokens, 96)
    x[:8] = torch.where(torch.arange(96) % 2 == 0, 3.0, -3.0)  # q = +-127 on every column
    x[8:, 7] *= 50  # an outlier channel
    x[-1] = 0.0
    y = module(x.to(module.weight.device)).cpu().double()
    oracle = dynamic_int8_matmul_reference(x, module.weight.cpu(), module.weight_scale.cpu())
    assert torch.allclose(y, oracle, rtol=1e-5, atol=1e-6 * float(oracle.abs().max()))
    # the adversarial rows hit 96 * 127 * 127 exactly (times the scales)
    top = x[:8].abs().amax(dim=1) / 127 * module.weight_scale[:8, 0].cpu().double() * 127 * 127
    assert torch.allclose(y[:8, :8].diagonal(), top.double() * 96, rtol=1e-5)


def test_scales_are_per_token_not_per_tensor() -> None:
    """A small token next to a huge one keeps its own scale: its output is the same as when it
    runs alone, and far more accurate than one shared (per-tensor) scale would make it."""
    w, _ = _layer(seed=2)
    module = _module(w)
    small = torch.randn(1, 80) * 0.01
    batch = torch.cat([small, torch.randn(1, 80) * 1000.0])
    alone = module(small)
    together = module(batch)[:1]
    assert torch.equal(together, alone)
    exact = small @ module.dequantize_weight().T
    per_token_err = float((together - exact).norm() / exact.norm())
    shared_scale = batch.abs().max() / 127
    per_tensor = torch.round(small / shared_scale) * shared_scale @ module.dequantize_weight().T
    per_tensor_err = float((per_tensor - exact).norm() / exact.norm())
    assert per_token_err < 0.02 < 0.5 < per_tensor_err


def test_kernel_cache_follows_weight_changes_and_dtype() -> None:
    w, _ = _layer()
    module = _module(w)
    x = torch.randn(4, 80)
    before = module(x)
    with torch.no_grad():
        module.weight.neg_()
    assert torch.allclose(module(x), -before, rtol=1e-6, atol=1e-6)
    assert module(x.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="expects 80 input features"):
        module(torch.randn(2, 81))
    with pytest.raises(ValueError, match="unknown Int8DynamicLinear backend"):
        Int8DynamicLinear(8, 8, backend="magic")
    copy.deepcopy(module)(x)  # a copy rebuilds its own kernel


def test_fused_siblings_compute_what_each_member_computes(tiny_llama) -> None:
    """q/k/v and gate/up of each layer share one GEMM; every output equals the member's own."""
    model = copy.deepcopy(tiny_llama)
    quantizer = DynamicInt8Quantizer.from_options({"smooth": False,
                                                   "skip": ["lm_head", "*embed*"]})
    names = quantizable_linears(model, quantizer.skip_patterns())
    result = quantizer.quantize(model, QuantPlan({n: quantizer.default_spec() for n in names}),
                                None)
    for name, qw in result.weights.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8DynamicLinear.from_quantized(qw))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        alone = model(ids).logits
        assert fuse_siblings(model) == 4  # 2 layers x (q/k/v, gate/up)
        assert fuse_siblings(model) == 0  # idempotent
        with torch.inference_mode():  # inference tensors: identity alone decides
            assert torch.equal(model(ids).logits, alone)
        assert torch.equal(model(ids).logits, alone)

    attn = model.model.layers[0].self_attn
    group = attn.q_proj._sibling[0]
    x = torch.randn(2, 3, 64)
    original = x.clone()
    q = attn.q_proj(x)
    x.mul_(-2.0)  # changed in place between sibling calls: k must see the new values
    k = attn.k_proj(x)
    unfuse_siblings(model)
    assert torch.equal(q, attn.q_proj(original)) and torch.equal(k, attn.k_proj(x))
    assert group.wasted == 1 and group.enabled

    fuse_siblings(model)
    group = attn.q_proj._sibling[0]
    for _ in range(3):  # siblings fed different tensors: results go unused, fusion turns off
        a, b = torch.randn(1, 64), torch.randn(1, 64)
        assert torch.equal(attn.q_proj(a), attn.q_proj._kernel_for(a.device)(a, None))
        attn.k_proj(b)
    assert not group.enabled
    assert torch.equal(attn.v_proj(b), attn.v_proj._kernel_for(b.device)(b, None))


def test_size_evaluator_counts_int8_buffers() -> None:
    w, _ = _layer(out_features=32, in_features=64)
    model = torch.nn.Sequential(_module(w), torch.nn.Linear(32, 4))
    quantized, bits, other = packed_stats(model)
    assert quantized == 32 * 64
    assert bits == 32 * 64 * 8 + 32 * 16  # int8 weights + one fp16 scale per channel
    assert other == 32 * 4 + 4


# -- quantizer plugin ----------------------------------------------------------------------------


def test_quantizer_defaults() -> None:
    """SmoothQuant with per-group alpha and an int8 lm_head: the settings that met the issue's
    target on SmolLM2 (see the plugin's docstring); they need a calibration set."""
    quantizer = DynamicInt8Quantizer.from_options({})
    assert quantizer.needs_calibration is True and quantizer.weight_kind == "uniform"
    assert quantizer.skip_patterns() == ["*embed*"]
    assert quantizer.config.smooth is True and quantizer.config.smooth_alpha == "auto"
    assert not DynamicInt8Quantizer.from_options({"smooth": False}).needs_calibration


def test_quantizer_plugin_on_a_model(tiny_llama) -> None:
    quantizer = DynamicInt8Quantizer.from_options({"smooth": False,
                                                   "skip": ["lm_head", "*embed*"]})
    assert quantizer.needs_calibration is False and quantizer.weight_kind == "uniform"
    names = quantizable_linears(tiny_llama, quantizer.skip_patterns())
    assert len(names) == 14 and "lm_head" not in names
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    plan = QuantPlan({n: quantizer.default_spec() for n in names})
    result = quantizer.quantize(tiny_llama, plan, None)
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is untouched
    assert set(result.weights) == set(names)
    assert all(qw.bits == 8 and qw.sym and qw.group_size == -1 for qw in result.weights.values())
    assert "per token" in result.details["scheme"]["activations"]
    assert result.details["method"] == "dynamic_int8"


def test_quantizer_refuses_plans_it_cannot_make(tiny_llama) -> None:
    quantizer = DynamicInt8Quantizer()
    plan = QuantPlan({"model.layers.0.mlp.up_proj": ModuleQuantSpec(4, 128, False, "rtn")})
    with pytest.raises(QuantmillError, match="only makes 8-bit symmetric per-channel.*up_proj"):
        quantizer.quantize(tiny_llama, plan, None)


@pytest.mark.parametrize("options", [{"bits": 4}, {"group_size": 128}, {"skip": "lm_head"}])
def test_bad_settings_are_rejected(options: dict) -> None:
    with pytest.raises(ValidationError):
        DynamicInt8Quantizer.from_options(options)
