"""GPTQ on single layers: beats RTN on correlated inputs, act-order and g_idx agree with the
weights, the Hessian is exact, bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from quantmill.plugins.quantizers.gptq.algorithm import (
    GPTQSettings,
    gptq_quantize,
    group_params,
    hessian_error,
)
from quantmill.plugins.quantizers.hessian import HessianAccumulator
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


def test_range_search_keeps_each_rows_best_grid_factor() -> None:
    """The in-place search equals a plain loop over the shrink factors, row by row."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 64, generator=g)
    w[3, 7] = 9.0  # an outlier: its row is better off clipped
    importance = torch.rand(64, generator=g) + 0.1
    scale, zero = group_params(w, 3, False, True, importance)
    maxq = 7

    def err(row, s, z):
        q = torch.clamp(torch.round(row / s) + z, 0, maxq)
        return float((((row - (q - z) * s) ** 2) * importance).sum())

    for r in range(w.shape[0]):
        row = w[r]
        best = None
        for step in range(0, 31):
            p = 1.0 - step / 40
            lo, hi = min(float(row.min()), 0.0) * p, max(float(row.max()), 0.0) * p
            s = torch.tensor((hi - lo) / maxq).to(torch.float16).float()
            z = torch.clamp(torch.round(-lo / s), 0, maxq)
            e = err(row, s, z)
            if best is None or e < best - 1e-6 * abs(best):
                best = e
        assert err(row, scale[r], zero[r]) == pytest.approx(best, rel=1e-5)
    assert scale[3] < (w[3].max() - min(float(w[3].min()), 0.0)) / maxq  # the outlier row clipped


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("bits,group", [(3, 64), (4, 32), (2, -1)])
def test_refit_scales_never_raises_and_usually_lowers_the_hessian_error(desc_act, bits, group):
    totals = {False: 0.0, True: 0.0}
    for seed in range(3):
        w, x = correlated_layer(seed)
        h = hessian_of(x)
        for refit in (False, True):
            qw, stats = gptq_quantize(w, h, GPTQSettings(bits=bits, group_size=group,
                                                         desc_act=desc_act, refit_scales=refit))
            totals[refit] += stats.hessian_error
            if refit:
                plain, _ = gptq_quantize(w, h, GPTQSettings(bits=bits, group_size=group,
                                                            desc_act=desc_act))
                # same integers, zero points and g_idx: only scales change (fp16 values, > 0)
                assert torch.equal(qw.intweight, plain.intweight)
                assert torch.equal(qw.zeros, plain.zeros) and torch.equal(qw.g_idx, plain.g_idx)
                assert torch.equal(qw.scales, qw.scales.half().float()) and (qw.scales > 0).all()
                # per row, never worse than GPTQ's own scales
                for r in range(w.shape[0]):
                    new_error, old_error = (
                        hessian_error(w[r : r + 1], q, h, dequantized=q.dequantize()[r : r + 1])
                        for q in (qw, plain))
                    assert new_error <= old_error * (1 + 1e-4)
    assert totals[True] < 0.97 * totals[False]


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
