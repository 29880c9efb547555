"""Round-to-nearest uniform quantization: pure tensor functions, no plugin wiring.

Conventions follow GPTQ/AutoGPTQ so the checkpoint layout needs no translation:

* a group is ``group_size`` consecutive input columns (``-1``: all columns, i.e. per output
  channel); when ``group_size`` does not divide ``in_features`` the last group is shorter, which
  the GPTQ layout allows because ``g_idx`` maps each column to its group;
* asymmetric: the range is [min(w, 0), max(w, 0)] of the group, ``zero = round(-min / scale)``;
* symmetric: the range is [-amax, amax], ``zero = 2**(bits-1)``;
* scales are rounded to fp16 *before* the weights are rounded, so the integers and scales written
  to an fp16 checkpoint reproduce exactly the weights measured here.
"""

from __future__ import annotations

import torch

from quantmill.plugins.base import QuantizedWeight, num_groups


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """``g_idx`` for consecutive groups: column i belongs to group i // group_size (int32 [in])."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // size


def compute_scales_zeros(
    w: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` [rows, cols]; returns float32 [rows] each.

    The scale is already rounded through fp16; the zero is an integer-valued float.
    """
    maxq = 2**bits - 1
    wmin = torch.clamp(w.min(dim=1).values, max=0.0)
    wmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = 2.0 * amax / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (wmax - wmin) / maxq
        zero = None
    # A constant-zero group would give scale 0: any positive scale represents it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(torch.float16).to(torch.float32)
    # fp16 overflow/underflow (|w| > 65504 * maxq or tiny ranges) must not produce inf/0.
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    if zero is None:
        zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero


def quantize_groups(
    w: torch.Tensor, bits: int, group_size: int, sym: bool
) -> QuantizedWeight:
    """Round-to-nearest quantization of one weight matrix ``w`` [out_features, in_features]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    if group_size == 0 or group_size < -1:
        raise ValueError(f"group_size must be -1 (per channel) or positive, got {group_size}")
    w = w.detach().to(torch.float32)
    out_features, in_features = w.shape
    maxq = 2**bits - 1
    size = in_features if group_size == -1 else min(group_size, in_features)
    n_groups = num_groups(in_features, size)
    scales = torch.empty(n_groups, out_features, dtype=torch.float32)
    zeros = torch.empty(n_groups, out_features, dtype=torch.float32)
    intweight = torch.empty(out_features, in_features, dtype=torch.uint8)
    full = in_features // size  # groups of full width, handled in one batched call
    if full:
        block = w[:, : full * size].reshape(out_features, full, size)  # [out, G, size]
        rows = block.permute(1, 0, 2).reshape(full * out_features, size)  # [G*out, size]
        s, z = compute_scales_zeros(rows, bits, sym)
        q = torch.clamp(torch.round(rows / s[:, None]) + z[:, None], 0, maxq)
        scales[:full] = s.reshape(full, out_features)
        zeros[:full] = z.reshape(full, out_features)
        q = q.reshape(full, out_features, size).permute(1, 0, 2)  # [out, G, size]
        intweight[:, : full * size] = q.reshape(out_features, full * size).to(torch.uint8)
    if full * size < in_features:  # the shorter last group
        tail = w[:, full * size :]
        s, z = compute_scales_zeros(tail, bits, sym)
        q = torch.clamp(torch.round(tail / s[:, None]) + z[:, None], 0, maxq)
        scales[full] = s
        zeros[full] = z
        intweight[:, full * size :] = q.to(torch.uint8)
    return QuantizedWeight(
        intweight=intweight,
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=group_index(in_features, size),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def reconstruction_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    """Relative Frobenius error ||W - Q(W)|| / ||W||: a scale-free measure used by tests."""
    w = w.detach().to(torch.float32)
    return float(torch.linalg.norm(w - qw.dequantize()) / torch.linalg.norm(w).clamp_min(1e-12))
