"""The ``gptq`` quantizer plugin: quantmill's own GPTQ, layer by layer, in the GPTQ checkpoint
layout (so AutoGPTQ/GPTQModel users can switch without converting anything).

Sample recipe section (the defaults; ``desc_act: false`` and ``damp_percent: 0.01`` are
GPTQModel's settings too)::

    quantization:
      method: gptq
      bits: 4
      group_size: 128      # -1 = per channel
      sym: false
      desc_act: false      # act-order; with static_groups the g_idx stays trivial
      static_groups: false
      damp_percent: 0.01   # of the mean Hessian diagonal; raised automatically if needed
      block_size: 128
      mse_clip: true       # search each group's range, Hessian-diagonal weighted
      refit_scales: true   # re-solve each row's scales for the chosen codes (Hessian norm)
      batch_size: 8        # calibration samples per forward pass
      activation_cache: bfloat16  # cached o_proj/down_proj inputs; float32 = exact, +1/3 memory
      block_tuning:        # block-wise reconstruction after each block's GPTQ (block_tuning.py)
        epochs: 0          # passes over the calibration set; 0 = off
        lr: 0.001          # Adam on the log-scales (and norms)
        codes_lr: 0.0      # > 0 lets the integer codes move too (straight-through rounding)
        norms: false       # also tune the block's RMSNorm weights (written as float overrides)
        batch_size: 4      # calibration samples per step
      rotation: none       # hadamard: randomized Hadamard input rotations (see below)
      rotation_seed: 0

``rotation: hadamard`` quantizes every linear in a randomly rotated input basis (incoherence
processing, QuIP#/QuaRot; ``plugins/hadamard.py``): GPTQ works on ``W @ T`` with the Hessian of
``x @ T``, linears that read one tensor share T, and the checkpoint stores T next to the integers
(``quant_method: quantmill_rotated_gptq``, read by quantmill's GPTQ reader; a method no other
runtime implements, so none can mistake it for a plain GPTQ checkpoint: transformers skips the
unknown method with a warning and reports every quantized weight as missing).

Why the two algorithm options are on by default (SmolLM2-135M, 4-bit g128, desc_act off, damp
0.01, perplexity on the GPTQ benchmark's protocol, measured on an H100,
bench/results/gptq-cuda-experiments.json): textbook GPTQ 31.58; with the range search 29.22;
with both 28.53 (GPTQModel 7.6.0 with the same settings: 31.62 on CPU). At 3 bits: 66.9 ->
38.95 -> 37.54. Both turned off (``mse_clip: false, refit_scales: false``) give the textbook
algorithm GPTQModel runs. Recommended for quality: ``desc_act: true, static_groups: true,
damp_percent: 0.001`` (27.5 at 4-bit g128, 34.0 at 3 bits).

Block tuning is off by default because it costs far more than GPTQ itself on a CPU (each block:
``epochs`` x samples/``batch_size`` steps of forward and backward through the block) for a
modest gain: SmolLM2-135M, mixed precision at 3.5 average bits, scales and norms, 5 epochs:
30.42 -> 30.15 on 2 CPU cores (29 extra minutes, 18 of them sharing the cores with the test
suite); with the experimental input rotations of bench/rotation_experiment.py (scales only),
28.93 -> 28.27 on an H100 (about 15 extra seconds). Letting the codes move (``codes_lr``)
overfits the 64 x 512 calibration tokens (H100, unrotated: 30.20 and 32.49, against 29.99
with scales and norms alone). bench/results/rotation-tuning-cuda-experiments.json has every
run.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from quantmill.plugins.base import (
    CalibrationSet,
    PluginConfig,
    QuantizationResult,
    QuantPlan,
)
from quantmill.plugins.blockwise.resume import WorkArea
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.models import deferred
from quantmill.plugins.quantizers.gptq.block_tuning import TuningSettings
from quantmill.plugins.quantizers.gptq.layerwise import LayerwiseOptions, quantize_model_layerwise
from quantmill.plugins.quantizers.rtn.plugin import RTNQuantizer, UniformSettings


class BlockTuningConfig(PluginConfig):
    """Block-wise reconstruction tuning after each block's GPTQ (``block_tuning.py``)."""

    epochs: int = Field(0, ge=0, le=1000, description="passes over the calibration set; 0: off")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam step on the log-scales and norms")
    codes_lr: float = Field(0.0, ge=0.0, le=10.0,
                            description="Adam step on the codes (straight-through); 0 keeps "
                            "GPTQ's codes")
    norms: bool = Field(False, description="also tune the block's RMSNorm weights")
    batch_size: int = Field(4, ge=1, le=1024, description="calibration samples per step (at most "
                            "the quantizer's own batch_size: steps stay within its batches)")


class GPTQConfig(UniformSettings):
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = Field(0.01, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=8, le=4096)
    mse_clip: bool = True
    refit_scales: bool = True
    batch_size: int = Field(8, ge=1, le=1024)
    activation_cache: Literal["bfloat16", "float32"] = "bfloat16"
    block_tuning: BlockTuningConfig = Field(default_factory=BlockTuningConfig)


class GPTQQuantizer(RTNQuantizer):
    """GPTQ (Frantar et al., 2022) with act-order, static groups, dampening and MSE clipping."""

    name = "gptq"
    Config = GPTQConfig
    needs_calibration = True
    accepts_deferred_weights = True
    resumable = True

    def __init__(self, config: PluginConfig | None = None) -> None:
        super().__init__(config)
        t = self.config.block_tuning
        self.changes_float_tensors = t.epochs > 0 and t.norms  # tuned norms are float overrides

    def calibration_reason(self) -> str:
        return ("GPTQ's per-layer Hessians are built from calibration activations (method "
                "'rtn' needs none)")

    def quantize(
        self, model: torch.nn.Module, plan: QuantPlan, calibration: CalibrationSet | None,
        work_area: WorkArea | None = None,
    ) -> QuantizationResult:
        if calibration is None:
            raise QuantmillError("gptq needs a calibration set")
        c = self.config
        device = deferred.model_device(model)
        options = LayerwiseOptions(desc_act=c.desc_act, static_groups=c.static_groups,
                                   damp_percent=c.damp_percent, block_size=c.block_size,
                                   mse_clip=c.mse_clip, refit_scales=c.refit_scales,
                                   batch_size=c.batch_size,
                                   activation_cache=getattr(torch, c.activation_cache),
                                   tuning=TuningSettings(**c.block_tuning.model_dump()),
                                   rotation_seed=c.rotation_seed_or_none, device=device)
        out = quantize_model_layerwise(model, plan.modules, calibration.input_ids, options,
                                       work_area)
        details = {
            "method": self.name,
            "damp_percent": c.damp_percent,
            "desc_act": c.desc_act,
            "static_groups": c.static_groups,
            "mse_clip": c.mse_clip,
            "refit_scales": c.refit_scales,
            "activation_cache": c.activation_cache,
            "calibration_tokens": int(calibration.input_ids.numel()),
            "block_tuning": c.block_tuning.model_dump(),
            "rotation": c.rotation,
            "rotation_seed": c.rotation_seed_or_none,
            "resumed_at_block": out.resumed_at,
            "layers": {name: {"damp_used": s.damp_used, "dead_inputs": s.dead_inputs,
                              "hessian_error": s.hessian_error}
                       for name, s in out.stats.items()},
        }
        if out.tuning:
            details["block_tuning_losses"] = {
                name: {"before": t.loss_before, "after": t.loss_after, "kept": t.kept}
                for name, t in out.tuning.items()}
        return QuantizationResult(weights=out.weights, plan=plan, details=details,
                                  float_overrides=out.float_overrides)


@hookimpl
def register_quantizers() -> list[type[RTNQuantizer]]:
    return [GPTQQuantizer]
