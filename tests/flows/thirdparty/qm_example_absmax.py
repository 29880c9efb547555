"""A third-party quantizer: symmetric per-channel abs-max rounding, written only against
quantmill's public plugin API (as an outside author would)."""

from __future__ import annotations

import torch
from pydantic import Field

from quantmill.plugins import (
    ModuleQuantSpec,
    PluginConfig,
    QuantizationResult,
    QuantizedWeight,
    Quantizer,
    hookimpl,
)


class AbsMaxConfig(PluginConfig):
    bits: int = Field(8, ge=2, le=8)
    fail_after: int | None = None  # raise after this many modules (to test failed runs)


class AbsMaxQuantizer(Quantizer):
    name = "absmax"
    Config = AbsMaxConfig

    def default_spec(self):
        return ModuleQuantSpec(bits=self.config.bits, group_size=-1, sym=True, method=self.name)

    def skip_patterns(self):
        return ["lm_head"]

    def quantize(self, model, plan, calibration):
        modules = dict(model.named_modules())
        weights = {}
        for count, (name, spec) in enumerate(plan.modules.items()):
            if self.config.fail_after is not None and count >= self.config.fail_after:
                raise RuntimeError(f"absmax gave up at {name}")
            w = modules[name].weight.detach().float()
            maxq = 2**spec.bits - 1
            mid = (maxq + 1) // 2
            scale = (w.abs().amax(dim=1) / (maxq - mid)).clamp_min(1e-8).half().float()
            q = torch.clamp(torch.round(w / scale[:, None]) + mid, 0, maxq)
            weights[name] = QuantizedWeight(
                intweight=q.to(torch.uint8), scales=scale[None, :],
                zeros=torch.full((1, w.shape[0]), mid, dtype=torch.int32),
                g_idx=torch.zeros(w.shape[1], dtype=torch.int32),
                bits=spec.bits, group_size=-1, sym=True,
            )
        return QuantizationResult(weights=weights, plan=plan, details={"method": self.name})


@hookimpl
def register_quantizers():
    return [AbsMaxQuantizer]


@hookimpl
def stage_finished(stage, run_id, seconds, status):
    """An audit listener: append each finished stage to $QM_EXAMPLE_STAGE_LOG."""
    import os

    path = os.environ.get("QM_EXAMPLE_STAGE_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(f"{stage} {status} {run_id}\n")


@hookimpl
def artifact_recorded(artifact, run_id):
    import os

    path = os.environ.get("QM_EXAMPLE_STAGE_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(f"artifact {artifact['kind']} {run_id}\n")
