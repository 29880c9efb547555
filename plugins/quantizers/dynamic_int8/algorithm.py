"""Dynamic int8 (W8A8) quantization: pure tensor functions, no plugin wiring.

* Weights: symmetric int8 per output channel, ``scale = absmax / 127`` rounded through fp16
  (so the fp16 ``weight_scale`` a checkpoint stores reproduces the weights measured here), the
  integers clamped to [-127, 127]. Symmetric with no zero point, because the run-time matrix
  product is then a plain int8 x int8 -> int32 dot product with one rescale per output.
* Activations: symmetric int8 per token (per row of the flattened input), ``scale =
  absmax / 127`` computed at run time from each token's own values. Per token rather than per
  tensor because LLM activations differ by orders of magnitude between tokens: one shared scale
  would crush the small tokens to a few levels.

In the unsigned ``QuantizedWeight`` convention the integers are stored as ``q + 128`` with zero
point 128 (``(intweight - 128) * scale`` is the weight).
"""

from __future__ import annotations

import torch

from quantmill.plugins.base import QuantizedWeight

#: largest magnitude of a symmetric int8 value (-128 is never produced, so negation is safe)
QMAX = 127
#: the zero point of symmetric 8-bit weights in the unsigned QuantizedWeight convention
ZERO_POINT = 128
#: smallest token absmax used (keeps 127 / absmax finite for an all-zero token)
AMAX_FLOOR = 1e-30


def channel_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales of ``w`` [out, in]: absmax / 127 rounded through fp16 (float32
    [out]). A row that is all zero, or whose scale would underflow or overflow fp16, gets 1.0
    (its values then round to 0, or are clamped)."""
    amax = w.detach().to(torch.float32).abs().amax(dim=1)
    scale = (amax / QMAX).to(torch.float16).to(torch.float32)
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


def quantize_weight(w: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8 per output channel of one linear weight ``w`` [out_features, in_features].

    Returns a ``QuantizedWeight`` with bits=8, sym=True, group_size=-1 (one group) and zero
    points of 128, i.e. ``intweight = round(w / scale) + 128`` in [1, 255].
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D linear weight, got shape {tuple(w.shape)}")
    w = w.detach().to(torch.float32)
    out_features, in_features = w.shape
    scale = channel_scales(w)  # [out]
    q = torch.clamp(torch.round(w / scale[:, None]), -QMAX, QMAX)  # [out, in]
    return QuantizedWeight(
        intweight=(q + ZERO_POINT).to(torch.uint8).cpu(),
        scales=scale[None, :].cpu(),  # [1 group, out]
        zeros=torch.full((1, out_features), ZERO_POINT, dtype=torch.int32),
        g_idx=torch.zeros(in_features, dtype=torch.int32),
        bits=8,
        group_size=-1,
        sym=True,
    )


def signed_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The int8 weight [out, in] of an 8-bit symmetric per-channel ``QuantizedWeight``."""
    return (qw.intweight.to(torch.int16) - qw.zeros[0].to(torch.int16)[:, None]).to(torch.int8)


def token_absmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude, float32 [tokens, 1], floored at ``AMAX_FLOOR`` so that a row
    of zeros needs no special case (its integers are 0 whatever its scale)."""
    return x.to(torch.float32).abs().amax(dim=-1, keepdim=True).clamp_min_(AMAX_FLOOR)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of ``x`` [tokens, features].

    ``q = round(x / absmax * 127)`` (round half to even; ``|x / absmax| <= 1`` so no clamp is
    needed) and ``scale = absmax / 127``, so that ``x ~= q * scale``; q is returned as float32
    holding exact integers in [-127, 127]. Every run-time path of ``Int8DynamicLinear`` computes
    q with this same float expression, so all of them multiply the same integers.
    """
    amax = token_absmax(x)
    q = torch.div(x.to(torch.float32), amax).mul_(QMAX).round_()
    return q, amax / QMAX


def dynamic_int8_matmul_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """What a W8A8 dynamic layer computes, in float64 (a slow oracle for tests and checks).

    ``x`` [tokens, in]; ``weight`` int8 [out, in]; ``weight_scale`` [out] or [out, 1].
    Returns float64 [tokens, out] = (q_x @ weight.T) * scale_x * weight_scale (no bias).
    """
    q, scale = quantize_per_token(x)
    acc = q.to(torch.float64) @ weight.to(torch.float64).T  # exact integers
    return acc * scale.to(torch.float64) * weight_scale.reshape(1, -1).to(torch.float64)
