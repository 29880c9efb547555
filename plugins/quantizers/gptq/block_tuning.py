"""Block-wise reconstruction tuning: after GPTQ has chosen a decoder block's codes, adjust what
the checkpoint stores in float (the group scales, optionally the block's norm weights) and,
optionally, the codes themselves, so that the quantized block's *output* matches the float
model's.

Why: GPTQ minimises each linear's own output error, one linear at a time, against inputs that
already carry the earlier blocks' quantization error. What the next block sees is the block's
output, and what the float model would have produced is the float block applied to the float
stream. Fitting the block as a whole to that target (as OmniQuant, AutoRound and EfficientQAT's
block-wise stage do) corrects errors that compound within the block (q/k/v through the softmax,
gate * up through the SiLU) and the drift carried in from earlier blocks, which no per-linear
criterion sees.

What moves, and what stays in the checkpoint's layout:

* scales: each group's fp16 scale is ``s0 * exp(t)`` with ``t`` learned (the log keeps it
  positive and makes one learning rate fit scales of any magnitude); zero points stay the
  integers GPTQ chose;
* codes (``codes_lr > 0``): a continuous copy of each integer code, rounded in the forward pass
  with a straight-through gradient (EfficientQAT's "block-AP" from GPTQ's solution), clamped to
  the ``bits`` range, so the result is still ``bits``-bit integers;
* norms (``norms``): the block's RMSNorm weights, written back as float overrides.

Every quantity the checkpoint stores keeps its type and range, so the GPTQ layout, its readers
and kernels are unchanged. The tuned block is kept only when its loss on the calibration data is
lower than GPTQ's; otherwise GPTQ's result stands.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.func import functional_call

from quantmill.plugins.base import QuantizedWeight
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models.modules import block_output

#: the block's float parameters that ``norms`` tunes
NORM_WEIGHTS = ("input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass(frozen=True)
class TuningSettings:
    """How a block is tuned; ``epochs == 0`` turns tuning off."""

    epochs: int = 0
    lr: float = 1e-3  # Adam, on the log-scales (and norms)
    codes_lr: float = 0.0  # Adam on the continuous codes; 0 keeps GPTQ's codes
    norms: bool = False
    #: calibration samples per step (steps never span two of GPTQ's calibration batches, so at
    #: most GPTQ's ``batch_size``)
    batch_size: int = 4
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.epochs > 0


@dataclass(frozen=True)
class TuningStats:
    """The block's mean squared output error against the float target, before and after."""

    loss_before: float
    loss_after: float
    kept: bool


@dataclass
class TunedBlock:
    """What ``tune_block`` hands back. When not ``stats.kept``, ``weights`` are GPTQ's own and
    ``dense``/``norms`` are empty."""

    weights: dict[str, QuantizedWeight]
    stats: TuningStats
    #: the tuned weights dequantized, on the block's device (what the block should now run)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    #: tuned norm weights (local parameter name -> tensor), rounded as the checkpoint stores them
    norms: dict[str, torch.Tensor] = field(default_factory=dict)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (x.round() - x).detach()


class TunableWeight:
    """One quantized linear whose scales (and optionally codes) are trainable."""

    def __init__(self, weight: QuantizedWeight, device: torch.device, codes: bool):
        # clones: the results of an inference-mode pass cannot take part in autograd
        self.original = weight
        self.g_idx = weight.g_idx.to(device, torch.long).clone()
        self.max_code = float((1 << weight.bits) - 1)
        self.scales0 = weight.scales.to(device, torch.float32).clone()
        self.zeros = weight.zeros.to(device, torch.float32)[self.g_idx].T.contiguous()
        self.log_scale = torch.zeros_like(self.scales0, requires_grad=True)
        codes0 = weight.intweight.to(device, torch.float32).clone()
        self.codes = codes0.requires_grad_(True) if codes else codes0

    def scales(self) -> torch.Tensor:
        return self.scales0 * torch.exp(self.log_scale)

    def weight(self) -> torch.Tensor:
        codes = (round_ste(self.codes).clamp(0.0, self.max_code) if self.codes.requires_grad
                 else self.codes)
        stored = (codes - self.zeros) * self.scales()[self.g_idx].T
        rotation = self.original.input_rotation
        return stored if rotation is None else rotation.apply_transpose(stored)

    @torch.no_grad()
    def result(self) -> QuantizedWeight:
        """The tuned weight in GPTQ's form: fp16-rounded scales, integer codes in range."""
        original = self.original
        scales = self.scales().to(torch.float16).to(torch.float32)
        intweight = original.intweight
        if self.codes.requires_grad:
            intweight = (self.codes.round().clamp(0.0, self.max_code)
                         .to(original.intweight.dtype))
        return replace(original, scales=scales.to(original.scales.device),
                       intweight=intweight.to(original.intweight.device))


def _detached_copy(value: Any) -> Any:
    """A normal (not inference-mode) copy of tensors nested in tuples, lists and dicts, so
    autograd may save them (rotary embeddings, masks captured under ``inference_mode``)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached_copy(v) for v in value)
    if isinstance(value, list):
        return [_detached_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached_copy(v) for k, v in value.items()}
    return value


def block_loss(forward: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor],
               inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
               kwargs: Sequence[dict[str, Any]]) -> float:
    """Mean squared error of ``forward`` against the targets over every batch."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y, kw in zip(inputs, targets, kwargs, strict=True):
            out = forward(x, kw)
            total += float((out.float() - y.float()).pow(2).sum())
            count += y.numel()
    return total / max(count, 1)


def tune_block(
    block: torch.nn.Module, weights: dict[str, QuantizedWeight],
    inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
    kwargs: Sequence[dict[str, Any]], settings: TuningSettings,
) -> TunedBlock:
    """Fit ``block`` with ``weights`` (local module name -> GPTQ result) so that
    ``block(inputs[i])`` approaches ``targets[i]``.

    ``inputs``/``targets``/``kwargs`` are per calibration batch (``[batch, seq, hidden]``); they
    are split into steps of at most ``settings.batch_size`` samples. When tuning does not lower
    the loss (or the loss is not finite), GPTQ's weights come back unchanged.
    """
    params = dict(block.named_parameters())
    if settings.norms and not all(name in params for name in NORM_WEIGHTS):
        raise QuantmillError(
            f"gptq block_tuning: norms: true, but the block has no {' / '.join(NORM_WEIGHTS)} "
            "parameters (set norms: false for this architecture)")
    with torch.inference_mode(False), torch.enable_grad():
        device = inputs[0].device
        tunables = {name: TunableWeight(w, device, codes=settings.codes_lr > 0)
                    for name, w in weights.items()}
        norms = {name: params[name].detach().clone().float().requires_grad_(True)
                 for name in NORM_WEIGHTS if settings.norms}
        steps_inputs = _split(inputs, settings.batch_size)
        steps_targets = _split(targets, settings.batch_size)
        steps_kwargs = [_detached_copy(kw) for kw in _split_kwargs(kwargs, inputs,
                                                                   settings.batch_size)]

        def forward(x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
            overrides = {f"{name}.weight": t.weight() for name, t in tunables.items()}
            overrides.update(norms)
            return block_output(functional_call(block, overrides, (x,), kw))

        before = block_loss(forward, steps_inputs, steps_targets, steps_kwargs)
        groups = [{"params": [t.log_scale for t in tunables.values()] + list(norms.values()),
                   "lr": settings.lr}]
        if settings.codes_lr > 0:
            groups.append({"params": [t.codes for t in tunables.values()],
                           "lr": settings.codes_lr})
        optimizer = torch.optim.Adam(groups)
        generator = torch.Generator().manual_seed(settings.seed)
        for _ in range(settings.epochs):
            for k in torch.randperm(len(steps_inputs), generator=generator).tolist():
                out = forward(steps_inputs[k], steps_kwargs[k])
                loss = (out.float() - steps_targets[k].float()).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        tuned = {name: t.result() for name, t in tunables.items()}
        # judged as the checkpoint will hold it: fp16 scales (``result``) and fp16 norms
        dense = {name: w.dequantize().to(device) for name, w in tuned.items()}
        tuned_norms = {name: p.detach().half().to(params[name].dtype)
                       for name, p in norms.items()}

        def forward_tuned(x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
            overrides = {f"{name}.weight": w for name, w in dense.items()}
            overrides.update(tuned_norms)
            return block_output(functional_call(block, overrides, (x,), kw))

        after = block_loss(forward_tuned, steps_inputs, steps_targets, steps_kwargs)
    stats = TuningStats(before, after, kept=math.isfinite(after) and after < before)
    if not stats.kept:  # a NaN or inf (a diverging step) is never kept either
        return TunedBlock(dict(weights), stats)
    return TunedBlock(tuned, stats, dense, tuned_norms)


def _split(batches: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    return [part for batch in batches for part in batch.split(size)]


def _split_kwargs(kwargs: Sequence[dict[str, Any]], batches: Sequence[torch.Tensor],
                  size: int) -> list[dict[str, Any]]:
    """Each batch's keyword arguments cut like the batch (tensors whose first dimension is the
    batch's are sliced; shared ones, such as rotary tables of batch 1, are passed whole)."""
    out: list[dict[str, Any]] = []
    for kw, batch in zip(kwargs, batches, strict=True):
        n = batch.shape[0]
        for start in range(0, n, size):
            out.append({k: _slice(v, n, start, size) for k, v in kw.items()})
    return out


def _slice(value: Any, n: int, start: int, size: int) -> Any:
    # per-sample tensors ([batch, ...] masks, rotary tables built per sample) have 2+ dimensions;
    # 1-d ones (cache positions) describe the sequence, whatever their length
    if isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[0] == n and n > 1:
        return value[start : start + size]
    if isinstance(value, tuple):
        return tuple(_slice(v, n, start, size) for v in value)
    return value
