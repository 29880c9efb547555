"""The ``rtn`` quantizer plugin: round-to-nearest uniform quantization, no calibration.

Sample recipe section::

    quantization:
      method: rtn
      bits: 4            # 2..8
      group_size: 128    # -1 = per output channel; need not divide in_features
      sym: false         # asymmetric (zero points) by default
      skip: ["lm_head", "*embed*"]
      rotation: none     # or hadamard: randomized Hadamard input rotations (plugins/hadamard.py)
      rotation_seed: 0

With ``rotation: hadamard`` every quantized linear stores ``W @ T`` and its rotation T, and the
checkpoint is written as ``quant_method: quantmill_rotated_gptq`` (formats/gptq.py): quantmill's
reader applies T to the inputs; no other runtime implements the method, so none runs the rotated
weights as a plain GPTQ checkpoint.
"""

from __future__ import annotations

from typing import Literal

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
from quantmill.plugins.hadamard import InputRotation, rotation_site
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
    rotation: Literal["none", "hadamard"] = Field(
        "none", description="randomized Hadamard input rotations (incoherence) before quantizing")
    rotation_seed: int = Field(0, ge=0, description="seed of the rotations")

    @property
    def rotation_seed_or_none(self) -> int | None:
        """The rotation seed when rotating, else None (how specs and options carry it)."""
        return self.rotation_seed if self.rotation == "hadamard" else None

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
        return ModuleQuantSpec(bits=c.bits, group_size=c.group_size, sym=c.sym, method=self.name,
                               rotation_seed=c.rotation_seed_or_none)

    def skip_patterns(self) -> list[str]:
        return list(self.config.skip)

    def quantize(
        self, model: torch.nn.Module, plan: QuantPlan, calibration: CalibrationSet | None
    ) -> QuantizationResult:
        modules = dict(model.named_modules())
        weights = {}
        seed = self.config.rotation_seed_or_none
        with progress_bar("quantize (rtn)", total=len(plan.modules)) as advance:
            for name, spec in plan.modules.items():
                linear = modules[name]
                if seed is None:
                    qw = quantize_groups(linear.weight, spec.bits, spec.group_size, spec.sym)
                else:
                    rotation = InputRotation.for_site(linear.in_features, seed,
                                                      rotation_site(name))
                    rotated = rotation.apply(linear.weight.detach().float())
                    qw = quantize_groups(rotated, spec.bits, spec.group_size, spec.sym)
                    qw.input_rotation = rotation
                if linear.bias is not None:
                    qw.bias = linear.bias.detach().clone()
                weights[name] = qw
                advance(1)
        details = {"method": self.name, "rotation": self.config.rotation}
        if seed is not None:
            details["rotation_seed"] = seed
        return QuantizationResult(weights=weights, plan=plan, details=details)


@hookimpl
def register_quantizers() -> list[type[Quantizer]]:
    return [RTNQuantizer]
