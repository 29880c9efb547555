"""Round-to-nearest: error falls with bits, groups need not divide the width, fp16 scales."""

from __future__ import annotations

import pytest
import torch

from quantmill.plugins.quantizers.rtn.algorithm import (
    group_index,
    quantize_groups,
    reconstruction_error,
)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_error_falls_as_bits_rise(sym: bool, group_size: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 256) * torch.rand(96, 1)  # rows of different scale
    errors = [reconstruction_error(w, quantize_groups(w, b, group_size, sym)) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.01  # 8 bits is nearly lossless


def test_smaller_groups_do_not_hurt() -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 512)
    per_channel = reconstruction_error(w, quantize_groups(w, 3, -1, False))
    grouped = reconstruction_error(w, quantize_groups(w, 3, 64, False))
    assert grouped < per_channel


def test_values_in_range_and_dequantize_matches_manual() -> None:
    torch.manual_seed(2)
    w = torch.randn(8, 40)
    qw = quantize_groups(w, 3, 16, sym=False)
    assert int(qw.intweight.max()) <= 7 and int(qw.intweight.min()) >= 0
    # the scales must survive an fp16 round trip unchanged
    assert torch.equal(qw.scales, qw.scales.half().float())
    manual = torch.empty_like(w)
    for col in range(40):
        g = col // 16
        manual[:, col] = (qw.intweight[:, col].float() - qw.zeros[g].float()) * qw.scales[g]
    assert torch.equal(manual, qw.dequantize())


def test_group_not_dividing_width_gets_short_last_group() -> None:
    torch.manual_seed(3)
    w = torch.randn(16, 576)  # SmolLM2's hidden size, group 128: 4 full groups + 64 columns
    qw = quantize_groups(w, 4, 128, sym=False)
    assert qw.scales.shape == (5, 16)
    assert torch.equal(qw.g_idx, group_index(576, 128))
    assert int(qw.g_idx[-1]) == 4 and int((qw.g_idx == 4).sum()) == 64
    # the short group is quantized on its own range: error stays like the full groups'
    tail_err = (w[:, 512:] - qw.dequantize()[:, 512:]).abs().max()
    step = qw.scales[4].max()
    assert tail_err <= step / 2 + 1e-6


def test_symmetric_zero_point_is_midpoint() -> None:
    w = torch.randn(4, 64)
    qw = quantize_groups(w, 4, 32, sym=True)
    assert torch.all(qw.zeros == 8)


def test_constant_zero_rows_are_exact() -> None:
    w = torch.zeros(4, 64)
    qw = quantize_groups(w, 4, 32, sym=False)
    assert torch.equal(qw.dequantize(), w)


@pytest.mark.parametrize("bits,group", [(1, 128), (9, 128), (4, 0), (4, -2)])
def test_bad_settings_raise(bits: int, group: int) -> None:
    with pytest.raises(ValueError):
        quantize_groups(torch.randn(4, 64), bits, group, False)
