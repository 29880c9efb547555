"""The ``dynamic_int8`` quantizer plugin: W8A8 int8 for CPU inference speed.

Weights become symmetric int8 with one scale per output channel; activations are quantized per
token at run time by the ``Int8DynamicLinear`` modules the ``compressed-tensors`` model source
builds, so no activation scale is stored. The usual export is ``compressed-tensors`` (the W8A8
layout vLLM and transformers load).

With ``smooth`` (SmoothQuant, the default; ``smoothing.py`` and ``groups.py``) the per-channel
activation maxima are measured on the calibration set and part of each outlier channel's range
is moved into the weights: the quantized weights are made from the smoothed float weights, and
the norm weights that absorb the division come back as ``QuantizationResult.float_overrides``
(the caller's model is never modified; exporters write the overrides in its place). A group is
smoothed only when all the linears it changes are quantized (a float ``lm_head`` tied to the
embedding could not take different columns). ``smooth_alpha: auto`` (the default) picks each
group's alpha from a grid by the int8 output error on calibration tokens.

On SmolLM2-135M (WikiText-2 test, 40 windows of 512; calibration 64 x 512 tokens of the
validation split) perplexity moves from fp32's 25.615 to: 26.554 (+3.67%) unsmoothed with an
int8 lm_head; 25.882 (+1.04%) smoothed with alpha 0.5; 25.797 (+0.71%) with ``auto``; with
lm_head in float, 25.827 (+0.83%) and 25.747 (+0.52%). Hence the defaults: ``auto`` and an int8
lm_head, the largest read of a decode step: 1.39x fp32 tokens/s instead of 1.25x
(``bench/results/dynamic_int8-lm_head-experiment.md``, unsmoothed; smoothing changes values, not
the run-time work).

Sample recipe section (the defaults)::

    calibration: {source: text, path: data/wikitext-2/valid.txt, num_samples: 64, seq_len: 512}
    quantization:
      method: dynamic_int8
      skip: ["*embed*"]   # module-name patterns kept in float
      smooth: true        # SmoothQuant; needs the calibration section (false: none needed)
      smooth_alpha: auto  # or a number in (0, 1): the share of each outlier moved into weights
      batch_size: 8       # calibration samples per forward pass
    export: {format: compressed-tensors}
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from quantmill.plugins.base import (
    CalibrationSet,
    ModuleQuantSpec,
    PluginConfig,
    QuantizationResult,
    Quantizer,
    QuantPlan,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.models.modules import loaded_linears
from quantmill.plugins.progress import progress_bar
from quantmill.plugins.quantizers.dynamic_int8.algorithm import quantize_weight
from quantmill.plugins.quantizers.dynamic_int8.groups import (
    SmoothGroup,
    activation_stats,
    find_groups,
)
from quantmill.plugins.quantizers.dynamic_int8.smoothing import (
    ALPHA_GRID,
    check_alpha,
    search_alpha,
    smoothed_tensors,
    smoothing_scales,
)

#: modules kept in float by default: only the embeddings (see the module docstring for lm_head)
DEFAULT_SKIP = ("*embed*",)

#: calibration tokens per group on which ``smooth_alpha: auto`` compares the alphas
AUTO_SAMPLE_TOKENS = 512

#: how the format computes at run time; recorded with every result (and so in the registry)
SCHEME = {
    "weights": "int8, symmetric, one scale per output channel (absmax / 127, fp16), static",
    "activations": "int8, symmetric, one scale per token (absmax / 127), computed at run time",
    "matmul": "int8 x int8 -> int32, rescaled by token scale x channel scale",
}


class DynamicInt8Settings(PluginConfig):
    """Which modules stay in float, and smoothing: bits, grouping and symmetry are fixed by the
    scheme."""

    skip: list[str] = Field(default_factory=lambda: list(DEFAULT_SKIP),
                            description="module-name patterns (fnmatch) kept in float")
    smooth: bool = Field(True, description="SmoothQuant: fold per-channel activation scales "
                                           "into the norms and weights (needs calibration)")
    smooth_alpha: float | Literal["auto"] = Field(
        "auto", description="share of each activation outlier moved into the weights, strictly "
                         "between 0 and 1; 'auto': per group, the alpha of a grid with the "
                         "lowest int8 output error on calibration tokens")
    batch_size: int = Field(8, ge=1, le=1024,
                            description="calibration samples per forward pass (smoothing)")

    @field_validator("smooth_alpha", mode="before")
    @classmethod
    def _alpha(cls, value: Any) -> float | str:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"smooth_alpha must be a number strictly between 0 and 1, or "
                             f"'auto'; got {value!r}")
        return check_alpha(value)


class DynamicInt8Quantizer(Quantizer):
    """Int8 weights per channel for dynamic (per-token) int8 activations at run time."""

    name = "dynamic_int8"
    Config = DynamicInt8Settings
    needs_calibration = False  # with the default settings; refined per instance

    def __init__(self, config: PluginConfig | None = None) -> None:
        super().__init__(config)
        self.needs_calibration = self.config.smooth  # activation maxima come from calibration
        self.changes_float_tensors = self.config.smooth  # the scales go into the norm weights

    def calibration_reason(self) -> str:
        return ("smooth: true (the default) measures activation ranges on it for SmoothQuant; "
                "set smooth: false to quantize without calibration data (about 3% higher "
                "perplexity on SmolLM2-135M)")

    def default_spec(self) -> ModuleQuantSpec:
        return ModuleQuantSpec(bits=8, group_size=-1, sym=True, method=self.name)

    def skip_patterns(self) -> list[str]:
        return list(self.config.skip)

    def quantize(
        self, model: torch.nn.Module, plan: QuantPlan, calibration: CalibrationSet | None
    ) -> QuantizationResult:
        wanted = self.default_spec()
        other = {name: spec for name, spec in plan.modules.items()
                 if (spec.bits, spec.group_size, spec.sym) != (8, -1, True)}
        if other:
            name, spec = next(iter(sorted(other.items())))
            raise QuantmillError(
                f"method 'dynamic_int8' only makes 8-bit symmetric per-channel weights, but the "
                f"plan asks for {spec.bits}-bit group size {spec.group_size} "
                f"{'symmetric' if spec.sym else 'asymmetric'} for '{name}' "
                f"({len(other)} module(s) differ); use allocator 'uniform'")
        modules = loaded_linears(model, plan.modules, self.name)
        smoothing = SmoothingPlan([], {"used": False})
        if self.config.smooth:
            if calibration is None:
                raise QuantmillError("dynamic_int8 with smooth: true needs a calibration set "
                                     "(add a 'calibration' section to the recipe)")
            smoothing = plan_smoothing(model, set(plan.modules), calibration.input_ids,
                                       self.config.smooth_alpha, self.config.batch_size)
        weights: dict[str, Any] = {}
        biases: dict[str, torch.Tensor] = {}
        overrides: dict[str, torch.Tensor] = {}
        with progress_bar("quantize (dynamic_int8)", total=len(plan.modules)) as advance:
            # smoothed tensors arrive one group at a time: a linear's weight is quantized as
            # soon as it is final, so its float32 copy is dropped at once
            for key, tensor in apply_smoothing(model, smoothing):
                module, _, leaf = key.rpartition(".")
                if module in plan.modules and leaf == "weight":
                    weights[module] = quantize_weight(tensor)
                    advance(1)
                elif module in plan.modules and leaf == "bias":
                    biases[module] = tensor
                else:  # a norm's weight or bias: float, written by the exporter instead
                    overrides[key] = tensor.detach().to("cpu", torch.float32).contiguous()
            for name in plan.modules:
                if name not in weights:
                    weights[name] = quantize_weight(modules[name].weight)
                    advance(1)
                bias = biases.get(name, modules[name].bias)
                if bias is not None:
                    weights[name].bias = bias.detach().to("cpu", torch.float32).clone()
        weights = {name: weights[name] for name in plan.modules}  # in the plan's order
        details = {"method": self.name,
                   "spec": {"bits": wanted.bits, "group_size": wanted.group_size, "sym": True},
                   "scheme": dict(SCHEME), "modules": len(weights),
                   "smoothing": smoothing.details}
        return QuantizationResult(weights=weights, plan=plan, details=details,
                                  float_overrides=overrides)


@dataclass
class SmoothingPlan:
    """Each smoothed group with its scales (small vectors), in model order, and the report."""

    steps: list[tuple[SmoothGroup, torch.Tensor]]
    details: dict[str, Any]


def plan_smoothing(
    model: torch.nn.Module, quantized: set[str], input_ids: torch.Tensor,
    alpha: float | str, batch_size: int = 8,
) -> SmoothingPlan:
    """SmoothQuant's measurements for the linears ``quantized``: which groups are smoothed,
    each group's alpha and scales. Nothing is changed yet (``apply_smoothing`` does that).

    Scales come from the original weights; a group is smoothed only when every linear it
    changes is in ``quantized``.
    """
    groups, skipped = find_groups(model)
    usable: list[SmoothGroup] = []
    for g in groups:
        touched = g.consumers + ((g.producer,) if g.producer_kind == "linear" else ())
        left_out = [m for m in touched if m not in quantized]
        if left_out:
            skipped[g.name] = f"{', '.join(left_out)} not quantized"
        else:
            usable.append(g)
    auto = alpha == "auto"
    stats = activation_stats(model, usable, input_ids, batch_size,
                             sample_tokens=AUTO_SAMPLE_TOKENS if auto else 0)
    skipped.update(stats.bad)
    modules = dict(model.named_modules())
    steps: list[tuple[SmoothGroup, torch.Tensor]] = []
    chosen: dict[str, float] = {}
    lowest, highest = float("inf"), 0.0
    for g in usable:
        if g.name not in stats.absmax:
            continue
        weights = [modules[c].weight for c in g.consumers]
        group_alpha = float(alpha) if not auto else search_alpha(
            stats.samples[g.name], stats.absmax[g.name], weights)[0]
        chosen[g.name] = group_alpha
        s = smoothing_scales(stats.absmax[g.name], weights, group_alpha)
        steps.append((g, s))
        lowest, highest = min(lowest, float(s.min())), max(highest, float(s.max()))
    smoothed = [g.name for g, _ in steps]
    details: dict[str, Any] = {
        "used": bool(smoothed), "alpha": alpha, "smoothed_groups": smoothed,
        **({"alphas": chosen, "alpha_grid": list(ALPHA_GRID),
            "sample_tokens": AUTO_SAMPLE_TOKENS} if auto else {}),
        "skipped_groups": dict(sorted(skipped.items())),
        "scale_range": [lowest, highest] if smoothed else None,
        "calibration_tokens": int(input_ids.numel()),
        "note": "o_proj is never smoothed (its input is attention over grouped v heads)",
    }
    return SmoothingPlan(steps, details)


def apply_smoothing(model: torch.nn.Module, plan: SmoothingPlan
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, smoothed float32 tensor) for every tensor the plan changes, each given
    as soon as no later group changes it again, so a consumer can quantize and drop it: at most
    one group's tensors (plus an ``up_proj`` waiting for its down_proj group) are held, not a
    float copy of every smoothed linear. ``up_proj`` is changed twice (its columns by the MLP
    group, its rows by the down_proj group), which commute. The model is not modified."""
    state = model.state_dict()

    def keys_of(g: SmoothGroup) -> tuple[list[str], list[str]]:
        producer = [f"{g.producer}.{p}" for p in ("weight", "bias")
                    if isinstance(state.get(f"{g.producer}.{p}"), torch.Tensor)]
        return producer, [f"{c}.weight" for c in g.consumers]

    last_step: dict[str, int] = {}
    for index, (g, _) in enumerate(plan.steps):
        for key in sum(keys_of(g), []):
            last_step[key] = index
    pending: dict[str, torch.Tensor] = {}
    for index, (g, s) in enumerate(plan.steps):
        producer_keys, consumer_keys = keys_of(g)
        pending.update(smoothed_tensors(
            s, {k: pending.get(k, state[k]) for k in producer_keys},
            {k: pending.get(k, state[k]) for k in consumer_keys}))
        for key in producer_keys + consumer_keys:
            if last_step[key] == index:
                yield key, pending.pop(key)


def smoothing_changes(
    model: torch.nn.Module, quantized: set[str], input_ids: torch.Tensor,
    alpha: float | str, batch_size: int = 8,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """SmoothQuant for the linears ``quantized``, all at once: (state-dict key -> smoothed
    float32 tensor, a report of what was done). The model is not modified; loading the tensors
    into it leaves its float outputs unchanged (up to rounding), which is what makes smoothing
    safe. (The quantizer streams ``apply_smoothing`` instead, to hold less memory.)"""
    plan = plan_smoothing(model, quantized, input_ids, alpha, batch_size)
    return dict(apply_smoothing(model, plan)), plan.details


@hookimpl
def register_quantizers() -> list[type[Quantizer]]:
    return [DynamicInt8Quantizer]
