"""SmoothQuant-style smoothing (Xiao et al., 2023): pure tensor functions, no model wiring.

Why: per-token int8 activations lose the small channels of a token whose range a few outlier
channels dictate (SmolLM2-135M has input channels ~30x the median). For a linear ``y = x W^T``
and any positive per-input-channel ``s``, ``y = (x / s) (W * s)^T`` exactly; choosing

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)

moves part of each outlier channel's range from the activation (hard: quantized per token, at
run time) into the weight columns (easy: quantized per output channel, offline). ``alpha`` is
the share moved: 0 leaves the activations alone, 1 flattens them completely.

The division by ``s`` is folded into whatever produces the activation, so the run time is the
plain W8A8 one: a norm's weight (and bias) is divided by ``s``, or a linear's output rows are
(``producer_rows``). Several linears reading one activation share one ``s`` (the weight maximum
is taken over all their columns).
"""

from __future__ import annotations

import torch

#: default range of the smoothing factors: keeps a dead or extreme channel from producing
#: inf/0 weights (and keeps divided norm weights inside fp16, which checkpoints store)
SCALE_MIN = 1e-5
SCALE_MAX = 1e5


def check_alpha(alpha: float) -> float:
    """``alpha`` if it lies strictly between 0 and 1 (0 or 1 would put the whole range on one
    side, which is what smoothing exists to avoid); ValueError otherwise."""
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"smoothing alpha must lie strictly between 0 and 1 (the share of each "
                         f"activation outlier moved into the weights), got {alpha}")
    return float(alpha)


def weight_column_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max_i |W_ij| over the rows of every weight [out_k, in] (float32 [in]); all the weights
    read the same activation, so they must share ``in``."""
    if not weights:
        raise ValueError("smoothing needs at least one consumer weight")
    widths = {int(w.shape[-1]) for w in weights}
    if len(widths) != 1:
        raise ValueError(f"consumer weights read activations of different widths {sorted(widths)}")
    return torch.stack([w.detach().to(torch.float32).abs().amax(dim=0) for w in weights]).amax(0)


def smoothing_scales(
    act_absmax: torch.Tensor,
    weights: list[torch.Tensor],
    alpha: float,
    min_scale: float = SCALE_MIN,
    max_scale: float = SCALE_MAX,
) -> torch.Tensor:
    """Per-input-channel factors ``s`` (float32 [in]) for linears ``weights`` that read an
    activation whose per-channel maxima are ``act_absmax`` [in].

    A channel that is all zero in the activations or in every weight column gets ``s = 1``
    (there is nothing to balance, and the formula would give 0 or inf); the rest are clamped
    to [min_scale, max_scale].
    """
    alpha = check_alpha(alpha)
    a = act_absmax.detach().to(torch.float32).flatten()
    w = weight_column_absmax(weights).to(a.device)
    if a.shape != w.shape:
        raise ValueError(f"activation maxima have {a.numel()} channels, weights {w.numel()}")
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    live = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(live, s, torch.ones_like(s)).clamp_(min_scale, max_scale)


def scale_columns(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A consumer's weight [out, in] with column j multiplied by s_j (a new float32 tensor)."""
    return weight.detach().to(torch.float32) * s.to(weight.device)[None, :]


def divide_producer(tensor: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A producer's per-output-channel tensor divided by ``s`` (a new float32 tensor): a norm's
    weight or bias [C], or a linear's weight [C, in] (row j / s_j) or bias [C]."""
    t = tensor.detach().to(torch.float32)
    s = s.to(t.device)
    return t / (s[:, None] if t.dim() == 2 else s)


def smoothed_tensors(
    s: torch.Tensor,
    producer: dict[str, torch.Tensor],
    consumers: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Apply one group's ``s``: ``producer`` maps names to the tensors that make the activation
    (divided by ``s``), ``consumers`` names to the weights that read it (columns times ``s``).
    Returns name -> new tensor; the inputs are not modified."""
    out = {name: divide_producer(t, s) for name, t in producer.items()}
    for name, w in consumers.items():
        if name in out:
            raise ValueError(f"'{name}' is both producer and consumer of one smoothing group")
        out[name] = scale_columns(w, s)
    return out


#: the alphas ``search_alpha`` tries by default (``smooth_alpha: auto``)
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor],
               s: torch.Tensor | None = None) -> float:
    """Squared error of the W8A8 outputs of linears ``weights`` [out_k, in] on activations
    ``x`` [tokens, in] (smoothed by ``s`` when given), relative to the exact float outputs,
    over all the linears together. What the runtime computes, in float: per-token int8
    activations times per-channel int8 weights (fp16 scales)."""
    from quantmill.plugins.quantizers.dynamic_int8.algorithm import (
        quantize_per_token,
        quantize_weight,
    )

    x = x.detach().to(torch.float32)
    xs = x if s is None else x / s.to(x.device)
    q, scale = quantize_per_token(xs)
    xq = q * scale  # [tokens, in]
    err = total = 0.0
    for w in weights:
        w = w.detach().to(torch.float32).to(x.device)
        exact = x @ w.T
        ws = w if s is None else scale_columns(w, s)
        y = xq @ quantize_weight(ws).dequantize().to(x.device).T
        err += float((y - exact).pow(2).sum())
        total += float(exact.pow(2).sum())
    return err / total if total > 0 else 0.0


def search_alpha(
    x: torch.Tensor,
    act_absmax: torch.Tensor,
    weights: list[torch.Tensor],
    alphas: tuple[float, ...] = ALPHA_GRID,
) -> tuple[float, dict[float, float]]:
    """The alpha of ``alphas`` whose smoothing gives the lowest ``w8a8_error`` on the sample
    ``x`` [tokens, in] (the maxima ``act_absmax`` come from the whole calibration set), and
    every alpha's error. Why per group: how much of an outlier the weights can take depends
    on the weights; one alpha for the whole model is a compromise between its layers."""
    errors = {a: w8a8_error(x, weights, smoothing_scales(act_absmax, weights, a))
              for a in alphas}
    return min(errors, key=lambda a: errors[a]), errors
