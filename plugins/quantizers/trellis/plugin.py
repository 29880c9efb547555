"""The ``trellis`` quantizer plugin: QTIP-style trellis coding of randomized-Hadamard-rotated
weights, layer by layer with LDLQ error feedback (``code.py``, ``algorithm.py``).

Sample recipe section::

    quantization:
      method: trellis
      bits: 3              # k, 2..8 (bits per weight in the paths, plus the scales)
      state_bits: 12       # L: 2^L table entries, Viterbi work ~ 2^L; 16 is QTIP's (best,
                           # GPU-sized work); 12 codes a 135M model in ~20 min on 2 CPU cores
      sequence_length: 64  # T weights per tail-biting path (T*k a multiple of 32)
      tile_width: 8        # input columns per error-feedback block (a path: T / 8 rows of 8)
      rotation_seed: 0     # the randomized Hadamard input rotations (always on: the code
                           # assumes Gaussian-like weights)
      damp_percent: 0.01
    export: {format: trellis}   # the quantmill-trellis layout (formats/trellis.py); or
                                # dequantized: fp16 for runtimes without a trellis reader

``details.trellis_bits_per_weight`` in the run is what the weights cost as paths (k + 16 per
row and per input column + the rotations); the size evaluator measures the same on the
checkpoint. quantmill's reader (``TrellisLinear``) decodes the paths at every forward in
torch: correct everywhere, not fast (no fused kernel).

Measured on SmolLM2-135M: this plugin, mixed precision at 3.5 bits per weight, state_bits 12,
the quantmill-trellis checkpoint on 2 CPU cores: 27.15 perplexity, below uniform 4-bit GPTQ's
27.59 at 4.21 bits (bench/results/trellis-product-cpu.json). The experiment it came from
(bench/experiments/trellis_experiment.py, H100): 3.05 bits per weight 28.55 (GPTQ 3-bit
g128: 33.72).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator

from quantmill.plugins.base import (
    CalibrationSet,
    ModuleQuantSpec,
    PluginConfig,
    QuantizationResult,
    Quantizer,
    QuantPlan,
)
from quantmill.plugins.blockwise.pipeline import (
    PipelineOptions,
    StageFunction,
    StageOutcome,
    run_blockwise,
)
from quantmill.plugins.blockwise.resume import WorkArea
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hadamard import InputRotation, rotation_site
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.models import deferred
from quantmill.plugins.models.modules import DEFAULT_SKIP
from quantmill.plugins.quantizers.gptq.algorithm import prepare_hessian
from quantmill.plugins.quantizers.trellis.algorithm import (
    TrellisSettings,
    quantize_trellis,
)
from quantmill.plugins.quantizers.trellis.code import MAX_STATE_BITS, Trellis, make_trellis


class TrellisConfig(PluginConfig):
    bits: int = Field(3, ge=2, le=8, description="k: bits per weight in the trellis paths")
    state_bits: int = Field(12, ge=4, le=MAX_STATE_BITS, description="L: trellis state bits")
    sequence_length: int = Field(64, ge=8, le=1024, description="T: weights per path")
    tile_width: int = Field(8, ge=1, description="input columns per feedback block")
    scale_candidates: int = Field(5, ge=1, le=21)
    refit_scales: bool = True
    table_seed: int = Field(0, ge=0, description="seed of the table's order")
    rotation_seed: int = Field(0, ge=0, description="seed of the input rotations")
    damp_percent: float = Field(0.01, gt=0.0, lt=1.0)
    batch_size: int = Field(8, ge=1, le=1024)
    skip: list[str] = Field(default_factory=lambda: list(DEFAULT_SKIP))

    @model_validator(mode="after")
    def _shape(self) -> TrellisConfig:
        if self.bits >= self.state_bits:
            raise ValueError(f"bits ({self.bits}) must be below state_bits ({self.state_bits})")
        if self.sequence_length % self.tile_width:
            raise ValueError(f"sequence_length ({self.sequence_length}) must be a multiple of "
                             f"tile_width ({self.tile_width})")
        return self


class TrellisQuantizer(Quantizer):
    """Trellis-coded quantization on rotated weights (QTIP), with block LDLQ feedback."""

    name = "trellis"
    Config = TrellisConfig
    needs_calibration = True
    resumable = True
    weight_kind: ClassVar[str] = "trellis"

    def calibration_reason(self) -> str:
        return ("trellis quantization feeds each block's coding error forward through the "
                "inputs' Hessians, built from calibration activations")

    def default_spec(self) -> ModuleQuantSpec:
        c = self.config
        return ModuleQuantSpec(bits=c.bits, group_size=-1, sym=True, method=self.name,
                               rotation_seed=c.rotation_seed)

    def skip_patterns(self) -> list[str]:
        return list(self.config.skip)

    def quantize(
        self, model: torch.nn.Module, plan: QuantPlan, calibration: CalibrationSet | None,
        work_area: WorkArea | None = None,
    ) -> QuantizationResult:
        if calibration is None:
            raise QuantmillError("trellis needs a calibration set")
        c = self.config
        settings = TrellisSettings(T=c.sequence_length, tile_width=c.tile_width,
                                   scale_candidates=c.scale_candidates,
                                   refit_scales=c.refit_scales)
        trellises: dict[int, Trellis] = {}

        def quantize_stage(names: list[str], linears: list[torch.nn.Linear],
                           hessian: torch.Tensor) -> StageOutcome:
            rotation = InputRotation.for_site(hessian.shape[0], c.rotation_seed,
                                              rotation_site(names[0]))
            prepared = prepare_hessian(rotation.rotate_hessian(hessian), c.damp_percent,
                                       desc_act=False)
            by_bits: dict[int, list[int]] = {}
            for i, name in enumerate(names):
                by_bits.setdefault(plan.modules[name].bits, []).append(i)
            done = StageOutcome()
            for bits, members in by_bits.items():
                if bits >= c.state_bits:
                    raise QuantmillError(f"trellis: module '{names[members[0]]}' is planned at "
                                         f"{bits} bits, not below state_bits {c.state_bits}")
                if bits not in trellises:
                    trellises[bits] = make_trellis(c.state_bits, bits, c.table_seed)
                stacked = torch.cat([linears[i].weight.detach().float() for i in members])
                try:
                    parts, stats = quantize_trellis(
                        rotation.apply(stacked), prepared.hessian, prepared.hinv,
                        trellises[bits], settings, [linears[i].out_features for i in members])
                except ValueError as exc:
                    raise QuantmillError(f"trellis cannot code {', '.join(names)}: "
                                         f"{exc}") from None
                for i, weight in zip(members, parts, strict=True):
                    weight.input_rotation = rotation
                    if linears[i].bias is not None:
                        weight.bias = linears[i].bias.detach().cpu().clone()
                    done.weights[names[i]] = weight
                    done.details[names[i]] = {"bits": bits, "damp_used": prepared.damp_used,
                                              "multiplier": stats.multiplier,
                                              "stack_hessian_error": stats.hessian_error}
            return done

        device = deferred.model_device(model)
        result = run_blockwise(
            model, list(plan.modules), calibration.input_ids,
            StageFunction("trellis", quantize_stage),
            PipelineOptions(batch_size=c.batch_size, device=device,
                            refusal="trellis quantizes linears inside decoder blocks; "
                                    "'{name}' is not one (skip it)"),
            work_area)
        weights, layers = result.weights, result.details
        stored = sum(w.stored_bits() + (w.input_rotation.stored_bits() if w.input_rotation
                                        else 0) for w in weights.values())
        numel = sum(w.out_features * w.in_features for w in weights.values())
        details = {"method": self.name, "state_bits": c.state_bits,
                   "sequence_length": c.sequence_length, "tile_width": c.tile_width,
                   "table_seed": c.table_seed, "rotation": "hadamard",
                   "rotation_seed": c.rotation_seed, "damp_percent": c.damp_percent,
                   "calibration_tokens": int(calibration.input_ids.numel()),
                   "trellis_bits_per_weight": stored / max(numel, 1), "layers": layers,
                   "resumed_at_block": result.resumed_at}
        return QuantizationResult(weights=weights, plan=plan, details=details)


@hookimpl
def register_quantizers() -> list[type[Quantizer]]:
    return [TrellisQuantizer]
