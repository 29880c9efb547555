"""GPTQ on single layers: beats RTN on correlated inputs, act-order and g_idx agree with the
weights, the Hessian is exact, bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from quantmill.plugins.quantizers.gptq.algorithm import (
    GPTQSettings,
    HessianAccumulator,
    gptq_quantize,
)
from quantmill.plugins.quantizers.rtn.algorithm import quantize_groups


def correlated_layer(seed: int, out: int = 64, inp: int = 192, n: int = 2048):
    """A weight and inputs with correlated features and a few dominant channels, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5
    scale = torch.ones(inp)
    scale[torch.randperm(inp, generator=g)[:8]] = 8.0  # outlier input channels
    x = (torch.randn(n, inp, generator=g) @ mix + 0.3 * torch.randn(n, inp, generator=g)) * scale
    w = torch.randn(out, inp, generator=g) * 0.05
    return w, x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(300):
        acc.add(chunk)
    return acc.hessian()


def output_error(w, qw, x) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ qw.dequantize().T))


def test_hessian_matches_dense_product() -> None:
    _, x = correlated_layer(0, inp=200, n=700)
    expected = 2.0 * (x.double().T @ x.double()) / x.shape[0]
    assert torch.allclose(hessian_of(x).double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(hessian_of(x), hessian_of(x).T)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits,group", [(4, 64), (3, 64), (3, -1), (2, 32)])
def test_gptq_beats_rtn_on_layer_output(seed: int, bits: int, group: int) -> None:
    w, x = correlated_layer(seed)
    h = hessian_of(x)
    rtn = quantize_groups(w, bits, group, sym=False)
    gptq, stats = gptq_quantize(w, h, GPTQSettings(bits=bits, group_size=group))
    assert output_error(w, gptq, x) < output_error(w, rtn, x)
    assert stats.damp_used == pytest.approx(0.01)


@pytest.mark.parametrize("static", [False, True])
def test_act_order_g_idx_agrees_with_weights(static: bool) -> None:
    w, x = correlated_layer(3, inp=160)
    h = hessian_of(x)
    settings = GPTQSettings(bits=4, group_size=32, desc_act=True, static_groups=static)
    qw, _ = gptq_quantize(w, h, settings)
    assert qw.g_idx.shape == (160,)
    counts = torch.bincount(qw.g_idx.long())
    assert counts.tolist() == [32] * 5  # every group has exactly group_size columns
    if static:
        assert torch.equal(qw.g_idx, torch.arange(160, dtype=torch.int32) // 32)
    else:
        # groups follow decreasing Hessian diagonal: group 0 holds the 32 largest H_ii
        top = torch.argsort(torch.diag(h), descending=True)[:32]
        assert set(top.tolist()) == set(torch.nonzero(qw.g_idx == 0).flatten().tolist())
    # dequantizing through g_idx reproduces q * s - z column by column
    deq = qw.dequantize()
    for col in (0, 77, 159):
        g = int(qw.g_idx[col])
        manual = (qw.intweight[:, col].float() - qw.zeros[g].float()) * qw.scales[g]
        assert torch.equal(deq[:, col], manual)
    plain, _ = gptq_quantize(w, h, GPTQSettings(bits=4, group_size=32))
    assert output_error(w, qw, x) < 1.5 * output_error(w, plain, x)


def test_group_size_not_dividing_width() -> None:
    w, x = correlated_layer(4, inp=200)
    qw, _ = gptq_quantize(w, hessian_of(x), GPTQSettings(bits=4, group_size=64))
    assert qw.scales.shape[0] == 4 and int((qw.g_idx == 3).sum()) == 8


def test_inverse_factor_is_upper_cholesky_of_inverse() -> None:
    from quantmill.plugins.quantizers.gptq.algorithm import _inverse_hessian_factor

    _, x = correlated_layer(7, inp=96)
    h = hessian_of(x).double()
    upper, damp = _inverse_hessian_factor(h, 0.01)
    damped = h + damp * torch.diag(h).mean() * torch.eye(96, dtype=torch.float64)
    assert torch.equal(upper, torch.triu(upper))
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-8, atol=1e-10)


def test_dead_inputs_are_zeroed() -> None:
    w, x = correlated_layer(5)
    x[:, :5] = 0.0
    qw, stats = gptq_quantize(w, hessian_of(x), GPTQSettings(bits=4, group_size=64))
    assert stats.dead_inputs == 5
    assert torch.all(qw.dequantize()[:, :5] == 0)


def test_damping_is_raised_when_needed() -> None:
    w, x = correlated_layer(6, inp=64)
    h = hessian_of(x[:16])  # rank 16 of 64, then shifted: negative eigenvalues beyond 1% damping
    h -= 0.05 * torch.diag(h).mean() * torch.eye(64)
    _, stats = gptq_quantize(w, h, GPTQSettings(bits=4, group_size=-1, damp_percent=0.01))
    assert stats.damp_used > 0.01


def test_mse_clip_lowers_error_at_3_bits() -> None:
    errs = []
    for seed in range(3):
        w, x = correlated_layer(seed)
        w[0, 0] = 1.0  # an outlier weight stretches its group's range
        h = hessian_of(x)
        base, _ = gptq_quantize(w, h, GPTQSettings(bits=3, group_size=64))
        clip, _ = gptq_quantize(w, h, GPTQSettings(bits=3, group_size=64, mse_clip=True))
        errs.append((output_error(w, clip, x), output_error(w, base, x)))
    assert sum(c for c, _ in errs) < sum(b for _, b in errs)


@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 1}, "bits must be between 2 and 8"),
    ({"group_size": 0}, "group_size must be -1"),
    ({"damp_percent": 0.0}, "damp_percent must be in"),
    ({"damp_percent": 1.0}, "damp_percent must be in"),
])
def test_bad_settings(kwargs, message) -> None:
    w, x = correlated_layer(0, inp=64)
    with pytest.raises(ValueError, match=message):
        gptq_quantize(w, hessian_of(x), GPTQSettings(**{"group_size": 32, **kwargs}))
