"""The ``dynamic_int8`` quantizer plugin: W8A8 int8 for CPU inference speed, no calibration.

Weights become symmetric int8 with one scale per output channel; activations are quantized per
token at run time by the ``Int8DynamicLinear`` modules the ``compressed-tensors`` model source
builds, so nothing about them is decided (or calibrated) here. The usual export is
``compressed-tensors`` (the W8A8 layout vLLM and transformers load).

Sample recipe section::

    quantization:
      method: dynamic_int8
      skip: ["lm_head", "*embed*"]   # module-name patterns kept in float (the default)
    export: {format: compressed-tensors}
"""

from __future__ import annotations

import torch
from pydantic import Field

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
from quantmill.plugins.models.modules import DEFAULT_SKIP
from quantmill.plugins.progress import progress_bar
from quantmill.plugins.quantizers.dynamic_int8.algorithm import quantize_weight

#: how the format computes at run time; recorded with every result (and so in the registry)
SCHEME = {
    "weights": "int8, symmetric, one scale per output channel (absmax / 127, fp16), static",
    "activations": "int8, symmetric, one scale per token (absmax / 127), computed at run time",
    "matmul": "int8 x int8 -> int32, rescaled by token scale x channel scale",
}


class DynamicInt8Settings(PluginConfig):
    """Only which modules stay in float: bits, grouping and symmetry are fixed by the scheme."""

    skip: list[str] = Field(default_factory=lambda: list(DEFAULT_SKIP),
                            description="module-name patterns (fnmatch) kept in float")


class DynamicInt8Quantizer(Quantizer):
    """Int8 weights per channel for dynamic (per-token) int8 activations at run time."""

    name = "dynamic_int8"
    Config = DynamicInt8Settings

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
        modules = dict(model.named_modules())
        weights = {}
        with progress_bar("quantize (dynamic_int8)", total=len(plan.modules)) as advance:
            for name in plan.modules:
                linear = modules.get(name)
                if not isinstance(linear, torch.nn.Linear):
                    raise QuantmillError(f"'{name}' is not a linear layer of the model")
                qw = quantize_weight(linear.weight)
                if linear.bias is not None:
                    qw.bias = linear.bias.detach().to("cpu", torch.float32).clone()
                weights[name] = qw
                advance(1)
        details = {"method": self.name,
                   "spec": {"bits": wanted.bits, "group_size": wanted.group_size, "sym": True},
                   "scheme": dict(SCHEME), "modules": len(weights)}
        return QuantizationResult(weights=weights, plan=plan, details=details)


@hookimpl
def register_quantizers() -> list[type[Quantizer]]:
    return [DynamicInt8Quantizer]
