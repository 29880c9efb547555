"""Trellis quantization of one layer (plugins/quantizers/trellis/algorithm.py) on tiny CPU
tensors: what is stored reproduces what was measured, error feedback helps, and the code beats
GPTQ's scalar grid at fewer bits."""

from __future__ import annotations

import pytest
import torch

from quantmill.plugins.hadamard import InputRotation
from quantmill.plugins.quantizers.gptq.algorithm import (
    GPTQSettings,
    gptq_quantize,
    prepare_hessian,
)
from quantmill.plugins.quantizers.gptq.algorithm import hessian_error as gptq_error
from quantmill.plugins.quantizers.trellis.algorithm import (
    TrellisSettings,
    hessian_error,
    quantize_trellis,
)
from quantmill.plugins.quantizers.trellis.code import make_trellis


def _layer(seed: int, rows: int = 64, cols: int = 128, samples: int = 2048):
    """Gaussian weights (as rotated weights are) and strongly correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(samples, cols, generator=g) @ (torch.eye(cols) + 2 * mix)
    return w, x.T @ x / samples


def _prepared(h: torch.Tensor):
    return prepare_hessian(h, 0.01, desc_act=False)


SETTINGS = TrellisSettings(T=64, tile_width=8, scale_candidates=3)


@pytest.mark.parametrize("k", [2, 3])
def test_stored_paths_and_scales_reproduce_the_measured_weight(k: int) -> None:
    w, h = _layer(k)
    prep = _prepared(h)
    [tw], stats = quantize_trellis(w, prep.hessian, prep.hinv, make_trellis(8, k), SETTINGS)
    q = tw.dequantize()
    assert tuple(q.shape) == tuple(w.shape) and tw.bits == k
    assert hessian_error(w, q, prep.hessian) == pytest.approx(stats.hessian_error, rel=1e-6)
    assert torch.equal(tw.row_scales, tw.row_scales.half().float())
    assert torch.equal(tw.col_scales, tw.col_scales.half().float())
    # k bits per weight in the paths, plus one fp16 scale per row and per column
    assert tw.stored_bits() == k * w.numel() + 16 * (w.shape[0] + w.shape[1])


def test_error_feedback_lowers_the_layer_error() -> None:
    for seed in range(3):
        w, h = _layer(seed)
        prep = _prepared(h)
        tr = make_trellis(8, 2)
        _, with_fb = quantize_trellis(w, prep.hessian, prep.hinv, tr, SETTINGS)
        _, without = quantize_trellis(w, prep.hessian, prep.hinv, tr, SETTINGS, feedback=False)
        assert with_fb.hessian_error < 0.8 * without.hessian_error


def test_trellis_beats_gptq_with_fewer_bits() -> None:
    from quantmill.plugins.allocation.cost import Candidate, weight_bits

    rows, cols = 128, 512
    gptq_bits = weight_bits(Candidate(3, 128), rows, cols) / (rows * cols)
    for seed in range(2):
        w, h = _layer(10 + seed, rows=rows, cols=cols)
        prep = _prepared(h)
        [tw], stats = quantize_trellis(w, prep.hessian, prep.hinv, make_trellis(10, 3),
                                       SETTINGS)
        qw, _ = gptq_quantize(w, h, GPTQSettings(bits=3, group_size=128, sym=False,
                                                 mse_clip=True, damp_percent=0.01),
                              measure_error=False)
        assert tw.stored_bits() / w.numel() < gptq_bits
        assert stats.hessian_error < 0.85 * gptq_error(w, qw, prep.hessian)


def test_a_stack_splits_into_its_modules_with_their_own_column_scales() -> None:
    w, h = _layer(4, rows=48)
    w[16:] *= 3.0  # a second module of another magnitude
    w[16:, :8] *= 4.0  # whose first columns are larger
    prep = _prepared(h)
    parts, stats = quantize_trellis(w, prep.hessian, prep.hinv, make_trellis(8, 2), SETTINGS,
                                    parts=[16, 32])
    assert [p.out_features for p in parts] == [16, 32]
    assert not torch.equal(parts[0].col_scales, parts[1].col_scales)
    q = torch.cat([p.dequantize() for p in parts])
    assert hessian_error(w, q, prep.hessian) == pytest.approx(stats.hessian_error, rel=1e-6)


def test_rotated_weight_dequantizes_in_the_original_basis() -> None:
    w, h = _layer(5)
    rotation = InputRotation.for_site(128, 0, "s")
    hr = rotation.rotate_hessian(h)
    prep = _prepared(hr)
    [tw], _ = quantize_trellis(rotation.apply(w), prep.hessian, prep.hinv, make_trellis(8, 3),
                               SETTINGS)
    tw.input_rotation = rotation
    assert torch.allclose(tw.dequantize(), rotation.apply_transpose(tw.dequantize_stored()))
    assert float((tw.dequantize() - w).norm() / w.norm()) < 0.3


def test_shapes_the_tiling_cannot_hold_are_refused() -> None:
    w, h = _layer(6, rows=20)
    prep = _prepared(h)
    with pytest.raises(ValueError, match="multiple of T / tile_width = 8"):
        quantize_trellis(w, prep.hessian, prep.hinv, make_trellis(8, 2), SETTINGS)
    w, h = _layer(6, cols=100)
    prep = _prepared(h)
    with pytest.raises(ValueError, match="not a multiple of tile_width 8"):
        quantize_trellis(w, prep.hessian, prep.hinv, make_trellis(8, 2), SETTINGS)
    w, h = _layer(6)
    prep = _prepared(h)
    with pytest.raises(ValueError, match="whole 32-bit words"):
        quantize_trellis(w, prep.hessian, prep.hinv, make_trellis(8, 3),
                         TrellisSettings(T=16, tile_width=8))
    with pytest.raises(ValueError, match="multiple of tile_width"):
        _ = TrellisSettings(T=60, tile_width=8).tile_rows
