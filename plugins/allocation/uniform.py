"""The ``uniform`` bit allocator: every quantizable module gets the quantizer's own settings.

It exists so that even the simplest job produces an explicit per-module plan (stored in the
registry), the same seam the mixed-precision allocator uses.
"""

from __future__ import annotations

import torch

from quantmill.plugins.base import BitAllocator, CalibrationSet, ModuleQuantSpec, QuantPlan
from quantmill.plugins.hookspecs import hookimpl


class UniformAllocator(BitAllocator):
    name = "uniform"

    def plan(
        self,
        model: torch.nn.Module,
        quantizable: list[str],
        default: ModuleQuantSpec,
        calibration: CalibrationSet | None,
    ) -> QuantPlan:
        return QuantPlan(modules={name: default for name in quantizable})


@hookimpl
def register_bit_allocators() -> list[type[BitAllocator]]:
    return [UniformAllocator]
