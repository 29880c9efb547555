"""Weight clustering: k-means per row (codebook size, weighted error against RTN, determinism,
fp16 codebooks), error compensation and refit, and the ``clustering`` plugin on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from quantmill.plugins.base import CalibrationSet, ClusteredWeight, ModuleQuantSpec, QuantPlan
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models.modules import quantizable_linears
from quantmill.plugins.quantizers.clustering.algorithm import (
    cluster_weight,
    codebook_bits_per_weight,
    compensated_assign,
    compensated_cluster,
    hessian_error,
    nearest,
    refit_codebook,
    weighted_error,
)
from quantmill.plugins.quantizers.clustering.plugin import ClusteringQuantizer
from quantmill.plugins.quantizers.gptq.algorithm import prepare_hessian
from quantmill.plugins.quantizers.rtn.algorithm import quantize_groups

# -- helpers -------------------------------------------------------------------------------------


def correlated_inputs(seed: int, n: int = 2048, width: int = 96) -> torch.Tensor:
    """Calibration-like inputs: correlated columns (a random mixing) with a few loud ones."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, width, generator=g)
    mix = torch.eye(width) + 0.5 * torch.randn(width, width, generator=g) / width**0.5
    x = z @ mix
    x[:, torch.randperm(width, generator=g)[:6]] *= 8.0  # outlier channels
    return x


def heavy_tailed_weight(seed: int, rows: int = 48, cols: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    w = torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02
    return w * (0.5 + torch.rand(rows, 1, generator=g))


def rtn_row_errors(w: torch.Tensor, bits: int, h: torch.Tensor) -> torch.Tensor:
    """Per-row h-weighted squared error of per-channel asymmetric RTN."""
    deq = quantize_groups(w, bits, -1, sym=False).dequantize()
    return ((w - deq) ** 2 * h[None, :]).sum(dim=1)


def cluster_row_errors(w: torch.Tensor, cw: ClusteredWeight, h: torch.Tensor) -> torch.Tensor:
    return ((w - cw.dequantize()) ** 2 * h[None, :]).sum(dim=1)


# -- k-means ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows_per_codebook", [1, 3])
def test_at_most_two_to_the_bits_values_per_codebook(bits: int, rows_per_codebook: int) -> None:
    w = heavy_tailed_weight(0, rows=10, cols=300)  # 10 rows, r=3: a shorter last run
    cw = cluster_weight(w, bits, torch.rand(300) + 0.1, rows_per_codebook=rows_per_codebook,
                        iterations=10)
    assert cw.indices.dtype == torch.uint8 and cw.indices.shape == (10, 300)
    assert int(cw.indices.max()) < 2**bits and cw.codebook.shape == (10, 2**bits)
    deq = cw.dequantize()
    for start in range(0, 10, rows_per_codebook):
        run = slice(start, start + rows_per_codebook)
        assert torch.unique(deq[run]).numel() <= 2**bits
        # rows of one run share one codebook exactly
        assert (cw.codebook[run] == cw.codebook[start]).all()
    # codebook entries are fp16 values, so an fp16 checkpoint reproduces them exactly
    assert torch.equal(cw.codebook, cw.codebook.half().float())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_error_not_above_rtn_on_the_same_rows(bits: int) -> None:
    for seed in range(4):
        x = correlated_inputs(seed)
        h = (x**2).mean(dim=0)  # the calibration Hessian diagonal (up to a factor 2)
        w = heavy_tailed_weight(seed)
        cw = cluster_weight(w, bits, h, seed=seed)
        ours, rtn = cluster_row_errors(w, cw, h), rtn_row_errors(w, bits, h)
        # every row at most RTN's error (up to the fp16 rounding of the codebook entries)
        assert (ours <= rtn * (1 + 1e-3) + 1e-12).all(), (seed, (ours / rtn).max())
        assert ours.sum() < 0.8 * rtn.sum()  # and clearly better overall


def test_sensitivity_weighting_lowers_the_weighted_error() -> None:
    x = correlated_inputs(7)
    h = (x**2).mean(dim=0)
    w = heavy_tailed_weight(7)
    weighted = cluster_weight(w, 3, h)
    plain = cluster_weight(w, 3, None)
    assert weighted_error(w, weighted, h) < weighted_error(w, plain, h)
    assert weighted_error(w, plain) < weighted_error(w, weighted)  # each wins on its own metric


def test_same_seed_same_codebooks() -> None:
    w, h = heavy_tailed_weight(3), torch.rand(96)
    a = cluster_weight(w, 3, h, seed=11)
    b = cluster_weight(w, 3, h, seed=11)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.codebook, b.codebook)


def test_rows_with_few_distinct_values_are_reproduced_exactly() -> None:
    # 3 distinct values per row and 16 entries: empty clusters must not spoil anything
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([-0.5, 0.125, 2.0])
    w = levels[torch.randint(0, 3, (6, 64), generator=g)]
    cw = cluster_weight(w, 4, torch.rand(64, generator=g) + 0.1)
    assert torch.equal(cw.dequantize(), w)


def test_nearest_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    book = torch.randn(20, 16, generator=g).half().float().sort(dim=1).values
    x = torch.randn(20, 500, generator=g)
    brute = (x[:, :, None] - book[:, None, :]).abs().argmin(dim=2)
    assert torch.equal(book.gather(1, nearest(x, book)), book.gather(1, brute))


def test_codebook_cost_per_weight() -> None:
    assert codebook_bits_per_weight(3, 576, 576) == pytest.approx(3 + 8 * 16 / 576)
    assert codebook_bits_per_weight(4, 10, 64, rows_per_codebook=4) == pytest.approx(
        4 + 3 * 16 * 16 / 640)


def test_bad_settings_are_refused() -> None:
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match="codebook bits must be one of 2, 3, 4, 8, got 5"):
        cluster_weight(w, 5)
    with pytest.raises(ValueError, match="rows_per_codebook must be at least 1"):
        cluster_weight(w, 3, rows_per_codebook=0)
    with pytest.raises(ValueError, match="4 entries for 32 columns"):
        cluster_weight(w, 3, torch.ones(4))


# -- error compensation ------------------------------------------------------------------------


def test_compensation_lowers_the_output_error() -> None:
    for seed in range(3):
        x = correlated_inputs(seed)
        hessian = 2 * x.T @ x / x.shape[0]
        w = heavy_tailed_weight(seed)
        prepared = prepare_hessian(hessian, 0.01, desc_act=True)
        plain = cluster_weight(w, 3, torch.diag(hessian))
        [compensated] = compensated_cluster([w], 3, prepared, refit=False)
        [refit] = compensated_cluster([w], 3, prepared, refit=True)
        e_plain = hessian_error(w, plain, hessian)
        e_comp = hessian_error(w, compensated, hessian)
        e_refit = hessian_error(w, refit, hessian)
        assert e_comp < 0.9 * e_plain, (seed, e_comp / e_plain)
        assert e_refit <= e_comp * (1 + 1e-3), (seed, e_refit / e_comp)
        assert torch.unique(refit.dequantize()[0]).numel() <= 8


def test_refit_is_the_least_squares_optimum_for_fixed_indices() -> None:
    x = correlated_inputs(5)
    hessian = 2 * x.T @ x / x.shape[0]
    w = heavy_tailed_weight(5)
    start = cluster_weight(w, 2, torch.diag(hessian))
    book = refit_codebook(w, hessian, start.indices, start.codebook, ridge=1e-9)
    base = hessian_error(w, ClusteredWeight(start.indices, book, 2), hessian)
    assert base <= hessian_error(w, start, hessian)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # any nudge of the entries (kept fp16) does worse
        nudged = (book + 1e-3 * torch.randn(book.shape, generator=g)).half().float()
        assert hessian_error(w, ClusteredWeight(start.indices, nudged, 2), hessian) >= base


def test_compensated_assignment_on_identity_hessian_is_nearest() -> None:
    # with H = I there is nothing to compensate: every column is simply rounded
    w = heavy_tailed_weight(2, rows=8, cols=64)
    start = cluster_weight(w, 3)
    prepared = prepare_hessian(torch.eye(64), 0.01, desc_act=False)
    idx = compensated_assign(w, start.codebook, prepared)
    assert torch.equal(start.codebook.gather(1, idx), start.dequantize())


def test_stacked_layers_match_one_at_a_time() -> None:
    x = correlated_inputs(1)
    prepared = prepare_hessian(2 * x.T @ x / x.shape[0], 0.01, desc_act=True)
    a, b = heavy_tailed_weight(1, rows=16), heavy_tailed_weight(2, rows=24)
    together = compensated_cluster([a, b], 3, prepared)
    alone = [compensated_cluster([w], 3, prepared)[0] for w in (a, b)]
    for t, s in zip(together, alone, strict=True):
        assert torch.equal(t.dequantize(), s.dequantize())


# -- the plugin ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"bits": 5}, "clustering bits must be one of 2, 3, 4, 8, got 5"),
    ({"bits": 1}, "clustering bits must be one of 2, 3, 4, 8, got 1"),
    ({"rows_per_codebook": 0}, "greater than or equal to 1"),
    ({"weighting": "fisher"}, "'hessian_diag' or 'uniform'"),
    ({"bitz": 3}, "Extra inputs are not permitted"),
])
def test_bad_config_is_refused(options: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ClusteringQuantizer.from_options(options)


def test_calibration_needed_only_when_used() -> None:
    assert ClusteringQuantizer.from_options({}).needs_calibration
    assert ClusteringQuantizer.from_options({"compensate": False}).needs_calibration
    unweighted = ClusteringQuantizer.from_options({"compensate": False, "weighting": "uniform"})
    assert not unweighted.needs_calibration
    assert unweighted.quantize  # and it runs without one (below)


def _plan(model: torch.nn.Module, quantizer: ClusteringQuantizer) -> QuantPlan:
    names = quantizable_linears(model, quantizer.skip_patterns())
    return QuantPlan({n: ModuleQuantSpec(2 if "mlp" in n else 4, -1, False, "clustering")
                      for n in names})


@pytest.mark.parametrize("options", [
    {"compensate": True},
    {"compensate": False},
    {"compensate": False, "weighting": "uniform", "rows_per_codebook": 2},
])
def test_quantizes_tiny_llama_with_per_module_bits(tiny_llama, options: dict) -> None:
    quantizer = ClusteringQuantizer.from_options({"iterations": 10, **options})
    plan = _plan(tiny_llama, quantizer)
    calib = CalibrationSet(torch.randint(0, 256, (4, 24), generator=torch.Generator()
                                         .manual_seed(0)), {})
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    result = quantizer.quantize(tiny_llama, plan,
                                calib if quantizer.needs_calibration else None)
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input is not mutated
    assert set(result.weights) == set(plan.modules) and len(plan.modules) == 14
    modules = dict(tiny_llama.named_modules())
    for name, cw in result.weights.items():
        assert isinstance(cw, ClusteredWeight) and cw.bits == plan.modules[name].bits
        w = modules[name].weight.detach()
        deq = cw.dequantize()
        assert deq.shape == w.shape and torch.unique(deq[0]).numel() <= 2**cw.bits
        rel = float(torch.linalg.norm(w - deq) / torch.linalg.norm(w))
        assert rel < (0.7 if cw.bits == 2 else 0.3), (name, rel)
    assert result.details["rows_per_codebook"] == options.get("rows_per_codebook", 1)
    assert set(result.details["layers"]) == set(plan.modules)


def test_plan_bits_outside_codebook_widths_are_refused(tiny_llama) -> None:
    quantizer = ClusteringQuantizer.from_options({"compensate": False, "weighting": "uniform"})
    plan = QuantPlan({"model.layers.0.mlp.up_proj": ModuleQuantSpec(5, 128, False, "x")})
    with pytest.raises(QuantmillError, match="gives 'model.layers.0.mlp.up_proj' 5 bits"):
        quantizer.quantize(tiny_llama, plan, None)


def test_compensation_refuses_linears_outside_decoder_blocks(tiny_llama) -> None:
    quantizer = ClusteringQuantizer.from_options({"skip": []})
    plan = QuantPlan({"lm_head": ModuleQuantSpec(3, -1, False, "clustering")})
    calib = CalibrationSet(torch.randint(0, 256, (2, 16)), {})
    with pytest.raises(QuantmillError, match="'lm_head' is not one"):
        quantizer.quantize(tiny_llama, plan, calib)


def test_clustering_does_not_depend_on_what_ran_before(tiny_llama) -> None:
    """The stages (and so each linear's Hessian) are the same in a fresh process and after
    another quantizer ran: found by tensor identity, not by where the allocator put inputs."""
    from quantmill.plugins.quantizers.gptq.plugin import GPTQQuantizer

    calibration = CalibrationSet(torch.randint(0, 256, (8, 32),
                                               generator=torch.Generator().manual_seed(0)), {})
    quantizer = ClusteringQuantizer.from_options({"bits": 3})
    first = quantizer.quantize(tiny_llama, _plan(tiny_llama, quantizer), calibration)
    gptq = GPTQQuantizer.from_options({"bits": 3, "group_size": 32})
    names = quantizable_linears(tiny_llama, gptq.skip_patterns())
    gptq.quantize(tiny_llama, QuantPlan({n: gptq.default_spec() for n in names}), calibration)
    again = quantizer.quantize(tiny_llama, _plan(tiny_llama, quantizer), calibration)
    assert first.details["layers"] == again.details["layers"]
    for name, weight in first.weights.items():
        assert torch.equal(weight.indices, again.weights[name].indices), name
