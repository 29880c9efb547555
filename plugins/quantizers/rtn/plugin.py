"""The ``rtn`` quantizer plugin: round-to-nearest uniform quantization, no calibration.

Sample recipe section::

    quantization:
      method: rtn
      bits: 4            # 2..8
      group_size: 128    # -1 = per output channel; need not divide in_features
      sym: false         # asymmetric (zero points) by default
      skip: ["lm_head", "*embed*"]
"""

from __future__ import annotations

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
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.models.modules import DEFAULT_SKIP
from quantmill.plugins.progress import progress_bar
from quantmill.plugins.quantizers.rtn.algorithm import quantize_groups


class UniformSettings(PluginConfig):
    """Bits, grouping and symmetry shared by the uniform quantizers (RTN, GPTQ)."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight, 2..8")
    group_size: int = Field(128, description="input columns per group; -1 = per channel")
    sym: bool = Field(False, description="symmetric (no zero points) or asymmetric")
    skip: list[str] = Field(default_factory=lambda: list(DEFAULT_SKIP))

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"group_size must be -1 (per channel) or positive, got {value}")
        return value


class RTNQuantizer(Quantizer):
    """Round-to-nearest: the baseline every other method has to beat."""

    name = "rtn"
    Config = UniformSettings

    def default_spec(self) -> ModuleQuantSpec:
        c = self.config
        return ModuleQuantSpec(bits=c.bits, group_size=c.group_size, sym=c.sym, method=self.name)

    def skip_patterns(self) -> list[str]:
        return list(self.config.skip)

    def quantize(
        self, model: torch.nn.Module, plan: QuantPlan, calibration: CalibrationSet | None
    ) -> QuantizationResult:
        modules = dict(model.named_modules())
        weights = {}
        with progress_bar("quantize (rtn)", total=len(plan.modules)) as advance:
            for name, spec in plan.modules.items():
                linear = modules[name]
                qw = quantize_groups(linear.weight, spec.bits, spec.group_size, spec.sym)
                if linear.bias is not None:
                    qw.bias = linear.bias.detach().clone()
                weights[name] = qw
                advance(1)
        return QuantizationResult(weights=weights, plan=plan, details={"method": self.name})


@hookimpl
def register_quantizers() -> list[type[Quantizer]]:
    return [RTNQuantizer]
