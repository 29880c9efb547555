"""Layer-by-layer GPTQ over a decoder model, as a method of the block-wise pipeline
(``plugins.blockwise``): one block at a time, each block's linears stage by stage in execution
order, so later linears see the already-quantized earlier ones.

Each stage's linears (they read one input) with the same spec are stacked and quantized in one
GPTQ pass. With ``tuning`` enabled, each quantized block is then tuned towards the float block's
outputs on the float stream (``block_tuning.py``), which this method carries from block to
block beside the pipeline's quantized stream. The model passed in is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from quantmill.plugins.base import ModuleQuantSpec, QuantizedWeight
from quantmill.plugins.blockwise.pipeline import (
    BlockContext,
    BlockMethod,
    PipelineOptions,
    Stage,
    StageOutcome,
    run_blockwise,
)
from quantmill.plugins.blockwise.resume import WorkArea
from quantmill.plugins.hadamard import InputRotation, rotation_site
from quantmill.plugins.models.modules import block_output
from quantmill.plugins.quantizers.gptq.algorithm import (
    GPTQSettings,
    GPTQStats,
    gptq_quantize,
    hessian_error,
    prepare_hessian,
    split_rows,
)
from quantmill.plugins.quantizers.gptq.block_tuning import TuningSettings, TuningStats, tune_block


@dataclass
class LayerwiseOptions:
    """Settings shared by every module; bits/group/sym come per module from the plan."""

    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    mse_clip: bool = False
    refit_scales: bool = False
    batch_size: int = 8
    #: dtype of the cached o_proj/down_proj inputs (``plugins.blockwise.stages.Workspace``);
    #: Hessians always see the float32 activations
    activation_cache: torch.dtype = torch.bfloat16
    #: block-wise reconstruction tuning after each block's GPTQ (off unless ``epochs > 0``)
    tuning: TuningSettings = field(default_factory=TuningSettings)
    #: randomized Hadamard input rotations (``plugins/hadamard.py``) under this seed; None: off
    rotation_seed: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class LayerwiseResult:
    weights: dict[str, QuantizedWeight]
    stats: dict[str, GPTQStats]
    #: state-dict key -> tensor for float parameters block tuning changed (norm weights)
    float_overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    #: block name -> block tuning's losses
    tuning: dict[str, TuningStats] = field(default_factory=dict)
    #: the first block this run computed (> 0 when it resumed an interrupted one)
    resumed_at: int = 0


def _stacked_rows(stacked: torch.Tensor, sizes: list[int], index: int) -> torch.Tensor:
    start = sum(sizes[:index])
    return stacked[start : start + sizes[index]]


class GPTQBlocks(BlockMethod):
    """GPTQ of each stage, then (optionally) block tuning of each block."""

    label = "gptq"

    def __init__(self, plan: dict[str, ModuleQuantSpec], options: LayerwiseOptions):
        self.plan = plan
        self.options = options
        self.activation_cache = options.activation_cache
        self.float_stream: list[torch.Tensor] = []
        self.block_inputs: list[torch.Tensor] = []

    # --- block tuning's float stream ------------------------------------------------------------

    def start(self, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> None:
        if self.options.tuning.enabled:
            self.float_stream = [h.clone() for h in hidden]
            self.block_inputs = [h.clone() for h in hidden]

    def stream_state(self) -> dict[str, Any]:
        return {"float_stream": self.float_stream}

    def restore_stream(self, state: dict[str, Any]) -> None:
        for mine, saved in zip(self.float_stream, state.get("float_stream", []), strict=True):
            mine.copy_(saved)

    def before_block(self, block: BlockContext) -> None:
        if self.options.tuning.enabled:
            _forward_in_place(block, self.float_stream)  # float block on the float stream
            for saved, h in zip(self.block_inputs, block.hidden, strict=True):
                saved.copy_(h)

    def after_block(self, block: BlockContext) -> None:
        """Block tuning of the quantized block on its quantized-stream inputs towards the float
        block's outputs. When the tuned block is kept, it replaces GPTQ's weights (and norms)
        and the block's outputs are recomputed with it; otherwise GPTQ's stay."""
        if not self.options.tuning.enabled or not block.outcome.weights:
            return
        local_of = {full: local for local, full in block.planned.items()}
        weights = {local_of[n]: w for n, w in block.outcome.weights.items()}
        tuned = tune_block(block.work, weights, self.block_inputs, self.float_stream,
                           block.kwargs, self.options.tuning)
        stats = tuned.stats
        block.outcome.block_details["tuning"] = {"before": stats.loss_before,
                                                 "after": stats.loss_after, "kept": stats.kept}
        if not stats.kept:
            return
        block.outcome.weights.update({block.planned[n]: w for n, w in tuned.weights.items()})
        block.outcome.float_tensors.update({f"{block.name}.{n}": v.detach().cpu()
                                            for n, v in tuned.norms.items()})
        modules = dict(block.work.named_modules())
        params = dict(block.work.named_parameters())
        with torch.inference_mode():
            for name, dense in tuned.dense.items():
                linear = modules[name]
                linear.weight.data = dense.to(linear.weight.device, linear.weight.dtype)
            for name, value in tuned.norms.items():
                params[name].data = value.to(params[name].device, params[name].dtype)
        _forward_in_place(block, block.hidden, self.block_inputs)

    # --- GPTQ of one stage ------------------------------------------------------------------------

    def quantize_stage(self, block: BlockContext, stage: Stage,
                       hessian: torch.Tensor) -> StageOutcome:
        """GPTQ the stage's linears (which all read the same input).

        Rows of W are independent given H, so modules with the same spec are stacked into one
        matrix and quantized in one pass: the per-column loop runs once for q/k/v, not three
        times, with the same result as quantizing each alone.
        """
        o = self.options
        rotation = None
        if o.rotation_seed is not None:
            # one rotation per input site: GPTQ works on W @ T with the Hessian of x @ T
            rotation = InputRotation.for_site(hessian.shape[0], o.rotation_seed,
                                              rotation_site(stage.names[0]))
            hessian = rotation.rotate_hessian(hessian)
        prepared = prepare_hessian(hessian, o.damp_percent, o.desc_act)
        by_spec: dict[ModuleQuantSpec, list[int]] = {}
        for i, name in enumerate(stage.names):
            spec = self.plan[name]
            by_spec.setdefault(ModuleQuantSpec(spec.bits, spec.group_size, spec.sym, ""),
                               []).append(i)
        out = StageOutcome()
        for spec, members in by_spec.items():
            settings = GPTQSettings(bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                                    desc_act=o.desc_act, static_groups=o.static_groups,
                                    damp_percent=o.damp_percent, block_size=o.block_size,
                                    mse_clip=o.mse_clip, refit_scales=o.refit_scales)
            linears = [stage.modules[i] for i in members]
            stacked = torch.cat([linear.weight for linear in linears])  # [sum(out), in]
            if rotation is not None:
                stacked = rotation.apply(stacked.float())
            qw, stats = gptq_quantize(stacked, prepared, settings, measure_error=False)
            stacked[:, prepared.dead] = 0.0  # as GPTQ treats them, for the per-module error
            sizes = [linear.out_features for linear in linears]
            for k, (i, part) in enumerate(zip(members, split_rows(qw, sizes), strict=True)):
                linear, name = stage.modules[i], stage.names[i]
                if linear.bias is not None:
                    part.bias = linear.bias.detach().cpu().clone()
                part.input_rotation = rotation
                # the error in GPTQ's (rotated) basis: the same number as in the original one
                error = hessian_error(_stacked_rows(stacked, sizes, k), part, prepared.hessian,
                                      dequantized=part.dequantize_stored())
                out.weights[name] = part
                out.details[name] = {"damp_used": stats.damp_used,
                                     "dead_inputs": stats.dead_inputs, "hessian_error": error}
        return out


@torch.inference_mode()
def _forward_in_place(block: BlockContext, hidden: list[torch.Tensor],
                      inputs: list[torch.Tensor] | None = None) -> None:
    """``hidden[i] = block(inputs[i])`` (``inputs`` defaults to ``hidden``) with the block's
    current weights: the float targets before quantization, the tuned outputs after."""
    for k, (h, kw) in enumerate(zip(hidden, block.kwargs, strict=True)):
        x = h if inputs is None else inputs[k]
        h.copy_(block_output(block.work(x, **kw)))


def quantize_model_layerwise(
    model: torch.nn.Module, plan: dict[str, ModuleQuantSpec], input_ids: torch.Tensor,
    options: LayerwiseOptions, work_area: WorkArea | None = None,
) -> LayerwiseResult:
    """GPTQ every planned linear of every decoder block, block by block (each block tuned
    afterwards when ``options.tuning`` is enabled); resumes from ``work_area`` if it holds
    finished blocks of this very job."""
    method = GPTQBlocks(plan, options)
    result = run_blockwise(
        model, list(plan), input_ids, method,
        PipelineOptions(batch_size=options.batch_size, device=options.device,
                        refusal="gptq quantizes the linears of decoder blocks; '{name}' is "
                                "not one (skip it, or quantize it with rtn)"),
        work_area)
    stats = {name: GPTQStats(**facts) for name, facts in result.details.items()}
    tuning = {block: TuningStats(loss_before=d["tuning"]["before"],
                                 loss_after=d["tuning"]["after"], kept=d["tuning"]["kept"])
              for block, d in result.block_details.items() if "tuning" in d}
    return LayerwiseResult(result.weights, stats, result.float_tensors, tuning,
                           result.resumed_at)
