"""The ``clustering`` quantizer plugin: non-uniform codebooks (look-up tables) per output row,
fitted by sensitivity-weighted k-means, optionally with GPTQ-style error compensation.

Sample recipe section::

    quantization:
      method: clustering
      bits: 3                 # 2, 3, 4 or 8: 2**bits fp16 codebook entries
      rows_per_codebook: 1    # consecutive output rows sharing one codebook
      weighting: hessian_diag # k-means weights = mean x_j**2 per input column; or "uniform"
      iterations: 30          # Lloyd iterations (stops earlier when nothing moves)
      seed: 0                 # k-means++ seeding
      compensate: true        # round columns in order, spread the error (GPTQ-style)
      rounds: 1               # compensated assignment + codebook refit rounds
      refit_codebook: true    # least-squares codebook on the full Hessian after assignment
      act_order: true         # columns in order of decreasing Hessian diagonal
      damp_percent: 0.01
      batch_size: 8           # calibration samples per forward pass
    export: {format: lut}     # or {format: dequantized}: plain fp16 for any runtime

Per-module bits come from the plan, so the mixed-precision allocator drives this quantizer like
the uniform ones. A plan's ``group_size`` and ``sym`` mean nothing for a codebook and are
ignored; the sharing of codebooks between rows is ``rows_per_codebook``.

Cost per weight (what the size evaluator reports): bits + rows/rows_per_codebook * 2**bits * 16
/ (rows * in) for the codebooks: 3.19 bits at 3 bits on SmolLM2-135M, about what GPTQ w3g128
spends on its scales, zeros and g_idx.

Measured on SmolLM2-135M (64 x 512 calibration tokens, 40 x 512 WikiText-2 test tokens, 2 CPU
cores; bench/results/tradeoff.md): 3 bits reaches perplexity 32.97 with ``compensate`` (219-247
s; GPTQ w3g128 with its recommended settings: 33.72 in 112 s) and 48.2 without it (74 s; RTN
w3g128: 114.9); 4 bits 27.08 (GPTQ w4g128 recommended: 27.59); 2 bits 81.0 (GPTQ: 88.3). Before
the stage detection followed tensor identity, a freed input's memory reused by the next one
could merge o_proj with gate/up and give them its Hessian: 35.3 or 77.5 at 3 bits, depending on
what had run before in the process. Most of the compensated time is the block-by-block forward
passes, which run up to each stage's first linear (about 2.5 block forwards per block, where
GPTQ's Llama-specific staging needs one).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from quantmill.plugins.base import (
    CalibrationSet,
    ClusteredWeight,
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
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.models.modules import DEFAULT_SKIP, loaded_linears
from quantmill.plugins.progress import progress_bar
from quantmill.plugins.quantizers.clustering.algorithm import (
    CODEBOOK_BITS,
    cluster_weight,
    compensated_cluster,
    hessian_error,
    weighted_error,
)
from quantmill.plugins.quantizers.clustering.calibration import input_second_moments
from quantmill.plugins.quantizers.gptq.algorithm import prepare_hessian


class ClusteringConfig(PluginConfig):
    bits: int = Field(3, description="index bits per weight: 2, 3, 4 or 8")
    rows_per_codebook: int = Field(1, ge=1, description="output rows sharing one codebook")
    weighting: Literal["hessian_diag", "uniform"] = "hessian_diag"
    iterations: int = Field(30, ge=1, le=1000, description="Lloyd iterations at most")
    seed: int = Field(0, ge=0)
    compensate: bool = Field(True, description="GPTQ-style error compensation (needs a "
                                               "decoder-block model and calibration)")
    rounds: int = Field(1, ge=1, le=10)
    refit_codebook: bool = True
    act_order: bool = True
    damp_percent: float = Field(0.01, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=8, le=4096)
    batch_size: int = Field(8, ge=1, le=1024)
    skip: list[str] = Field(default_factory=lambda: list(DEFAULT_SKIP))

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in CODEBOOK_BITS:
            allowed = ", ".join(map(str, sorted(CODEBOOK_BITS)))
            raise ValueError(f"clustering bits must be one of {allowed}, got {value}")
        return value


class ClusteringQuantizer(Quantizer):
    """Weight clustering (SqueezeLLM-style weighted k-means, GPTVQ-style compensation)."""

    name = "clustering"
    Config = ClusteringConfig
    weight_kind = "codebook"
    needs_calibration = True  # with the default settings; refined per instance

    def __init__(self, config: PluginConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        # calibration is read unless the k-means is unweighted and nothing is compensated
        self.needs_calibration = c.compensate or c.weighting == "hessian_diag"

    def calibration_reason(self) -> str:
        return ("the k-means weights (weighting: hessian_diag) and the error compensation "
                "(compensate: true) come from it; set weighting: uniform and compensate: false "
                "to cluster without calibration data")

    def default_spec(self) -> ModuleQuantSpec:
        # group_size/sym do not apply to codebooks: -1/False are placeholders for the plan
        return ModuleQuantSpec(bits=self.config.bits, group_size=-1, sym=False, method=self.name)

    def skip_patterns(self) -> list[str]:
        return list(self.config.skip)

    @property
    def resumable(self) -> bool:  # type: ignore[override]
        return self.config.compensate  # only the block-wise pass has blocks to resume

    def quantize(
        self, model: torch.nn.Module, plan: QuantPlan, calibration: CalibrationSet | None,
        work_area: WorkArea | None = None,
    ) -> QuantizationResult:
        c = self.config
        for name, spec in plan.modules.items():
            if spec.bits not in CODEBOOK_BITS:
                raise QuantmillError(
                    f"clustering: the plan gives '{name}' {spec.bits} bits; codebooks have "
                    f"{', '.join(map(str, sorted(CODEBOOK_BITS)))} bits")
        if self.needs_calibration and calibration is None:
            raise QuantmillError("clustering with compensate or hessian_diag weighting needs a "
                                 "calibration set")
        modules = loaded_linears(model, plan.modules, self.name)
        device = model.get_input_embeddings().weight.device
        if c.compensate:
            assert calibration is not None
            weights, layers, resumed_at = self._compensated(model, plan, calibration, device,
                                                            work_area)
        else:
            weights, layers = self._kmeans_only(modules, plan, calibration, model, device)
            resumed_at = 0
        for name, cw in weights.items():
            bias = modules[name].bias
            if bias is not None:
                cw.bias = bias.detach().cpu().clone()
        details: dict[str, Any] = {
            "method": self.name,
            "rows_per_codebook": c.rows_per_codebook,
            "weighting": c.weighting,
            "iterations": c.iterations,
            "seed": c.seed,
            "compensate": c.compensate,
            "layers": layers,
        }
        if c.compensate:
            details.update(rounds=c.rounds, refit_codebook=c.refit_codebook,
                           act_order=c.act_order, damp_percent=c.damp_percent,
                           resumed_at_block=resumed_at)
        if calibration is not None and self.needs_calibration:
            details["calibration_tokens"] = int(calibration.input_ids.numel())
        return QuantizationResult(weights=weights, plan=plan, details=details)

    def _kmeans_only(
        self, modules: dict[str, torch.nn.Module], plan: QuantPlan,
        calibration: CalibrationSet | None, model: torch.nn.Module, device: torch.device,
    ) -> tuple[dict[str, ClusteredWeight], dict[str, dict[str, float]]]:
        c = self.config
        moments: dict[str, torch.Tensor] = {}
        if c.weighting == "hessian_diag":
            assert calibration is not None
            moments = input_second_moments(model, list(plan.modules), calibration.input_ids,
                                           c.batch_size, device)
        weights: dict[str, ClusteredWeight] = {}
        layers: dict[str, dict[str, float]] = {}
        with progress_bar("quantize (clustering)", total=len(plan.modules)) as advance:
            for name, spec in plan.modules.items():
                weight = modules[name].weight
                h = moments.get(name)
                cw = cluster_weight(weight, spec.bits, h, rows_per_codebook=c.rows_per_codebook,
                                    iterations=c.iterations, seed=c.seed)
                weights[name] = cw
                layers[name] = {"bits": spec.bits, "weighted_error": weighted_error(weight, cw, h)}
                advance(1)
        return weights, layers

    def _compensated(
        self, model: torch.nn.Module, plan: QuantPlan, calibration: CalibrationSet,
        device: torch.device, work_area: WorkArea | None = None,
    ) -> tuple[dict[str, ClusteredWeight], dict[str, dict[str, float]], int]:
        c = self.config

        def quantize_stage(names: list[str], linears: list[torch.nn.Linear],
                           hessian: torch.Tensor) -> StageOutcome:
            prepared = prepare_hessian(hessian, c.damp_percent, c.act_order)
            by_bits: dict[int, list[int]] = {}
            for i, name in enumerate(names):
                by_bits.setdefault(plan.modules[name].bits, []).append(i)
            done = StageOutcome()
            for bits, members in by_bits.items():
                clustered = compensated_cluster(
                    [linears[i].weight for i in members], bits, prepared,
                    rows_per_codebook=c.rows_per_codebook, iterations=c.iterations,
                    seed=c.seed, rounds=c.rounds, refit=c.refit_codebook,
                    block_size=c.block_size)
                for i, cw in zip(members, clustered, strict=True):
                    done.weights[names[i]] = cw
                    w = linears[i].weight.detach().clone()
                    w[:, prepared.dead] = 0.0
                    done.details[names[i]] = {
                        "bits": bits, "damp_used": prepared.damp_used,
                        "hessian_error": hessian_error(w, cw, prepared.hessian)}
            return done

        result = run_blockwise(
            model, list(plan.modules), calibration.input_ids,
            StageFunction("clustering", quantize_stage),
            PipelineOptions(batch_size=c.batch_size, device=device,
                            refusal="clustering with compensate quantizes linears inside "
                                    "decoder blocks; '{name}' is not one (skip it, or set "
                                    "compensate: false)"),
            work_area)
        return result.weights, result.details, result.resumed_at


@hookimpl
def register_quantizers() -> list[type[Quantizer]]:
    return [ClusteringQuantizer]
