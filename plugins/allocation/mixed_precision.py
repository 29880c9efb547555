"""The ``mixed_precision`` bit allocator: one format per module, chosen to minimise the predicted
damage under a size budget.

Sample recipe section::

    quantization:
      method: gptq                 # or rtn, clustering, trellis: the quantizer that executes it
      bits: 4                      # the quantizer's own default (unused by this allocator)
      group_size: 128
      allocator: mixed_precision
      allocator_options:
        avg_bits: 3.5              # or max_bytes: 60000000 (exactly one of the two)
        candidates:                # default: 2, 3, 4 and 8 bits at group size 128
          - {bits: 3, group_size: 128}
          - {bits: 4, group_size: 128}
          - {bits: 8, group_size: 128}
        tie: ["self_attn.q_proj|self_attn.k_proj|self_attn.v_proj"]
        weighting: fisher          # fisher (default), fisher_layer or none
        num_samples: 32            # calibration samples for the input Hessians
        fisher_samples: 8          # calibration samples for the output gradients
        reuse_sensitivity: true    # a batch planning several budgets measures once

How it works: ``sensitivity.py`` measures each module's damage in every candidate format,
``cost.py`` counts what each format costs in bits (scales, zeros and group indices included, as
the ``size`` evaluator counts them), ``sensitivity_cache.py`` keeps the tables so that several
budgets on one model measure once, and ``knapsack.py`` picks one format per module (or per tied
group) with the least total damage that fits the budget. The plan, with the whole sensitivity
table, is stored in the registry with the run, so anyone can see why a module got its bits.

Budgets: ``avg_bits`` is the average over every quantized weight of the bits it costs
(overheads included, so 4-bit g128 is about 4.2, not 4); ``max_bytes`` bounds the total bytes of
the quantized weights (the rest of the checkpoint, embeddings and norms, is not counted). A
budget below what the cheapest candidate everywhere needs is refused before anything is
measured, with the minimum achievable in the message.

Ties: each entry lists module-name suffixes separated by ``|``; within one decoder block, the
modules ending with those suffixes get one format (their damages and costs add up). Useful when
a runtime wants fused q/k/v or gate/up to share a format.

Measured on SmolLM2-135M (WikiText-2 perplexity, 40 x 512 test tokens; 64 x 512 calibration
tokens; default candidates and settings; run on an H100 with this code, where fp32, RTN and GPTQ
with the recommended settings reproduce the CPU numbers of bench/results/gptq.md within 0.5%;
GPTQ with its default settings does not, 66.9 against 59.4 at 3 bits, 32.2 against 32.0 at 4):

=========================  ======  ======  ======  ======  ======
average bits (budget)      2.5     3.0     3.5     4.0     4.5
=========================  ======  ======  ======  ======  ======
mixed + RTN                24305   410     56.8    40.6    30.2
mixed + GPTQ (textbook)    698     98.6    36.9    30.6    27.5
mixed + GPTQ (recommended) 57.7    38.7    29.9    28.3    26.7
=========================  ======  ======  ======  ======  ======

Uniform g128 on the same machine (bits per weight 2.20 / 3.21 / 4.21): RTN 3.3e6 / 114.8 /
32.4; GPTQ textbook 16984 / 66.9 / 32.2; GPTQ recommended 84.5 / 34.0 / 27.4. So every budget
beats the best uniform format that fits in it, and 4.5 bits beats uniform 4-bit; 3.5 bits does
not reach uniform 4-bit (29.9 against 27.4, 36.9 against 32.2). More candidates (3 and 4 bits at
g32/g64/g128) bring textbook GPTQ at 3.5 bits to 34.7, still short. ("Textbook" is GPTQ with
``mse_clip`` and ``refit_scales`` off, the defaults when this table was measured.)

With GPTQ's current defaults (range search and scale refit on) at 3.5 bits, same machine kind
(bench/results/gptq-cuda-experiments-2.json): defaults 30.94, recommended 30.56; with ten
candidates (2 bits g64/g128, 3 bits g32/g64/g128, 4 bits g32/g64/g128/per-channel, 8 bits g128)
30.39 and 30.08 (29.86 with the refit, now the default). Uniform 4-bit: 28.53 (defaults), 27.5
(recommended). So 3.5 bits still does not reach uniform 4-bit GPTQ; closing that gap needs a
stronger low-bit format than any candidate here, not a better allocation. Executed by
clustering (codebooks of 2/3/4/8 bits, H100): 30.16 at 3.5 bits, 28.16 at 4.0
(bench/results/clustering-mixed-cuda-experiments.json), no closer.

On the CPU, in the trade-off batch (bench/results/tradeoff.md: GPTQ recommended settings, the
batch's four candidates, 2 cores alone): 56.18 / 38.95 / 30.41 / 28.42 / 26.75 at 2.5 / 3.0 /
3.5 / 4.0 / 4.5 average bits; uniform GPTQ 88.30 / 33.72 / 27.59 and clustering 81.03 / 32.97 /
27.08 at 2 / 3 / 4 bits. Every budget is at or below the best uniform point no larger than it
(every mixed point is on the Pareto front); 3.5 bits is not at uniform 4-bit GPTQ (30.41 against
27.59). The sensitivity pass takes 3.4 s on the H100 and 62 s on the 2 quiet CPU cores (once
for the five budgets: ``reuse_sensitivity``).

Two further levers, measured for the 3.5-bit point (bench/results/rotation-tuning-cuda-
experiments.json): GPTQ's ``block_tuning`` (each block's scales, and optionally norms, fitted to
the float block's output) and random input rotations (QuIP#/QuaRot-style incoherence,
``bench/rotation_experiment.py``, the experiment that led to the ``rotation`` option below). On the
H100, rotated: 28.93; with ten candidates 28.75; with block tuning 28.27 (10 epochs: 28.27;
both: 28.25); uniform 4-bit GPTQ rotated: 26.79. On the CPU, rotated: 29.06 (clustering
executing the plan: 29.27), uniform 3-bit 31.84 (33.72 unrotated); unrotated with block tuning
(scales and norms, 5 epochs) 30.15 against 30.42 in the same process. Randomized
Hadamard-Kronecker rotations (what a checkpoint could store in a few bytes per site) do as well
as dense ones on the CPU: 31.12 at uniform 3 bits, 28.91 at 3.5 average bits. So rotations and
tuning together move 3.5 bits from 30.41 to about 28.3, still above uniform 4-bit GPTQ's
27.59; and letting block tuning move the codes overfits the 64 x 512 calibration tokens (30.20
and 32.49).

Rotations are now a quantizer option (``rotation: hadamard`` for rtn and gptq; the allocator then
measures ``W @ T`` with the Hessian of ``x @ T`` and counts each module's rotation tensors in its
cost). Through the product path (checkpoint written and read back, H100,
bench/results/rotation-product-cuda.json): 3.5 average bits 29.21, with block tuning (scales and
norms, 5 epochs) 28.41; uniform 4-bit rotated 26.78, 3-bit 31.00. On the CPU, side by side in
one batch (bench/results/tradeoff-rotated/): 3.5 bits rotated 28.97, uniform 3-bit rotated 31.11,
4-bit rotated 26.81, unrotated 4-bit 27.59.

What closes the gap is a trellis code on the rotated weights (QTIP's bitshift trellis, an
experiment so far: bench/experiments/trellis_experiment.py,
bench/results/trellis-cuda-experiments.json,
H100): with this allocator's plan re-budgeted so that the trellis formats cost 3.499 bits per
weight, perplexity 27.21 (state bits L=16), 27.25 (L=12), 27.36 (L=10), all below uniform 4-bit
GPTQ's 27.59; uniform 3-bit trellis (3.046 bits per weight) 28.55 against GPTQ's 33.72. L=10
needs about 2.3e11 Viterbi state updates for the model.

The ``trellis`` quantizer (this allocator costing its formats as stored) on the CPU,
``examples/smollm2-trellis-mixed-3.5bit.yaml`` with state_bits 10 and an fp16 export
(bench/results/trellis-product-cpu.json): 27.591 at 3.4993 bits per weight, level with uniform
4-bit GPTQ's 27.591 at 4.21 (no margin; the GPU's L=12 and 16 give 27.25 and 27.21). Its 2
cores took 40 minutes for the trellis (shared with the test suite).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator

from quantmill.plugins.allocation import knapsack, sensitivity_cache
from quantmill.plugins.allocation.cost import Candidate, WeightKind, weight_bits
from quantmill.plugins.allocation.sensitivity import (
    Sensitivity,
    SensitivityOptions,
    Weighting,
    measure_sensitivity,
)
from quantmill.plugins.base import (
    BitAllocator,
    CalibrationSet,
    ModuleQuantSpec,
    PluginConfig,
    QuantPlan,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.models import deferred

#: quantizer methods whose weights are codebooks (costed and measured as such)
CODEBOOK_METHODS = frozenset({"clustering"})
#: quantizer methods whose weights are trellis paths
TRELLIS_METHODS = frozenset({"trellis"})
TRELLIS_BITS = frozenset(range(2, 9))


def weight_kind_of(method: str) -> WeightKind:
    """How the allocator costs and measures the weights ``method`` produces."""
    if method in CODEBOOK_METHODS:
        return "codebook"
    return "trellis" if method in TRELLIS_METHODS else "uniform"
CODEBOOK_BITS = frozenset({2, 3, 4, 8})


class CandidateFormat(PluginConfig):
    bits: int = Field(ge=2, le=8)
    group_size: int = 128

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"group_size must be -1 (per channel) or positive, got {value}")
        return value


def _default_candidates() -> list[CandidateFormat]:
    return [CandidateFormat(bits=b, group_size=128) for b in (2, 3, 4, 8)]


class MixedPrecisionConfig(PluginConfig):
    candidates: list[CandidateFormat] = Field(default_factory=_default_candidates, min_length=1)
    avg_bits: float | None = Field(None, gt=0, description="average bits per quantized weight")
    max_bytes: int | None = Field(None, gt=0, description="total bytes of the quantized weights")
    tie: list[str] = Field(default_factory=list)
    weighting: Weighting = "fisher"
    num_samples: int = Field(32, ge=1, le=4096)
    fisher_samples: int = Field(8, ge=1, le=4096)
    batch_size: int = Field(4, ge=1, le=1024)
    max_states: int = Field(knapsack.DEFAULT_MAX_STATES, ge=1024, le=1 << 24)
    reuse_sensitivity: bool = Field(
        True, description="reuse a sensitivity table measured earlier in this process on the "
        "same model content, calibration ids and settings (budgets may differ)")

    @model_validator(mode="after")
    def _one_budget(self) -> MixedPrecisionConfig:
        if (self.avg_bits is None) == (self.max_bytes is None):
            raise ValueError("give exactly one budget: avg_bits (bits per quantized weight) or "
                             "max_bytes (bytes of the quantized weights)")
        return self

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, value: list[CandidateFormat]) -> list[CandidateFormat]:
        seen = [(c.bits, c.group_size) for c in value]
        if len(set(seen)) != len(seen):
            raise ValueError("candidates must be distinct (bits, group_size) pairs")
        return value

    @field_validator("tie")
    @classmethod
    def _tie(cls, value: list[str]) -> list[str]:
        for entry in value:
            parts = entry.split("|")
            if len(parts) < 2 or any(not p.strip() for p in parts):
                raise ValueError(f"tie entry {entry!r} must list two or more module-name "
                                 "suffixes separated by '|'")
        return value


def tie_groups(names: list[str], ties: list[str]) -> list[list[str]]:
    """Modules that share a format, in model order: one group per (tie entry, block prefix);
    untied modules are groups of one. A module matching two entries is refused."""
    owner: dict[str, tuple[int, str]] = {}
    for name in names:
        for t, entry in enumerate(ties):
            for suffix in (s.strip() for s in entry.split("|")):
                if name == suffix or name.endswith("." + suffix):
                    key = (t, name[: len(name) - len(suffix)])
                    if name in owner and owner[name] != key:
                        raise QuantmillError(f"module '{name}' matches two tie entries "
                                             f"({ties[owner[name][0]]!r} and {entry!r})")
                    owner[name] = key
    groups: dict[Any, list[str]] = {}
    for name in names:
        groups.setdefault(owner.get(name, name), []).append(name)
    return list(groups.values())


def _top(candidates: list[Candidate]) -> int:
    """Index of the most precise candidate: most bits, then smallest groups."""
    def precision(c: Candidate) -> tuple[int, float]:
        return c.bits, -(float("inf") if c.group_size == -1 else c.group_size)
    return max(range(len(candidates)), key=lambda k: precision(candidates[k]))


class MixedPrecisionAllocator(BitAllocator):
    """Per-module formats from measured sensitivities under an average-bits or bytes budget."""

    name = "mixed_precision"
    Config = MixedPrecisionConfig
    #: read by the recipe check: a recipe choosing this allocator needs a calibration section
    needs_calibration: ClassVar[bool] = True

    def plan(self, model: torch.nn.Module, quantizable: list[str], default: ModuleQuantSpec,
             calibration: CalibrationSet | None) -> QuantPlan:
        c: MixedPrecisionConfig = self.config  # type: ignore[assignment]
        if not quantizable:
            return QuantPlan(modules={}, details={"allocator": self.name})
        kind = weight_kind_of(default.method)
        candidates = self._candidates(kind, default)
        shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features)
                  for n in quantizable}
        rotated = default.rotation_seed is not None
        cost = {n: [weight_bits(k, *shapes[n], kind, rotated) for k in candidates]
                for n in quantizable}
        numel = sum(o * i for o, i in shapes.values())
        budget_bits = self._budget_bits(numel)
        groups = tie_groups(quantizable, list(c.tie))
        group_costs = [[sum(cost[n][k] for n in g) for k in range(len(candidates))]
                       for g in groups]
        minimum = knapsack.minimum_cost(group_costs)
        if minimum > budget_bits:
            raise QuantmillError(
                f"mixed_precision budget {self._describe_budget()} is below the minimum "
                f"achievable {minimum / numel:.4f} average bits ({-(-minimum // 8)} bytes) with "
                f"candidates {', '.join(k.label for k in candidates)}"
            )
        if calibration is None:
            raise QuantmillError("the mixed_precision allocator needs a calibration section "
                                 "(it measures each module's sensitivity on calibration data)")
        device = deferred.model_device(model)  # the embeddings may be deferred (meta)
        options = SensitivityOptions(num_samples=c.num_samples, batch_size=c.batch_size,
                                     weighting=c.weighting, fisher_samples=c.fisher_samples,
                                     rotation_seed=default.rotation_seed, device=device)
        proxy = {"codebook": "codebook", "trellis": "rtn-g128"}.get(kind, "rtn")
        key = (sensitivity_cache.measurement_key(model, quantizable, candidates, default.sym,
                                                 kind, calibration.input_ids, options)
               if c.reuse_sensitivity else None)
        sens, reused = sensitivity_cache.cached_sensitivity(
            key, lambda: measure_sensitivity(model, quantizable, candidates, default.sym, kind,
                                             calibration.input_ids, options))
        group_damages = [[sum(sens.damages[n][k] for n in g) for k in range(len(candidates))]
                         for g in groups]
        top = _top(candidates)
        if sum(gc[top] for gc in group_costs) <= budget_bits:
            # everything fits at the most precise format: take it, whatever the proxy's noise
            solution = knapsack.Solution([top] * len(groups), sum(gc[top] for gc in group_costs),
                                         sum(gd[top] for gd in group_damages), True, 1)
        else:
            solution = knapsack.solve(group_costs, group_damages, budget_bits, c.max_states)
        chosen: dict[str, int] = {}
        for g, k in zip(groups, solution.choice, strict=True):
            chosen.update(dict.fromkeys(g, k))
        modules = {
            n: ModuleQuantSpec(bits=candidates[chosen[n]].bits,
                               group_size=candidates[chosen[n]].group_size,
                               sym=default.sym, method=default.method,
                               rotation_seed=default.rotation_seed)
            for n in quantizable
        }
        details = self._details(candidates, kind, proxy, cost, shapes, sens, chosen, groups,
                                budget_bits, numel, minimum, solution)
        details["rotation_seed"] = default.rotation_seed
        details["sensitivity_key"] = key
        details["sensitivity_reused"] = reused
        if reused:  # this plan spent nothing on it; the table's own measurement time is kept
            details["sensitivity_measured_seconds"] = details["sensitivity_seconds"]
            details["sensitivity_seconds"] = 0.0
        return QuantPlan(modules=modules, details=details)

    # -- helpers --------------------------------------------------------------------------

    def possible_specs(self, default: ModuleQuantSpec) -> list[ModuleQuantSpec]:
        return [ModuleQuantSpec(f.bits, f.group_size, default.sym, default.method,
                                default.rotation_seed)
                for f in self.config.candidates]

    def _candidates(self, kind: WeightKind, default: ModuleQuantSpec) -> list[Candidate]:
        formats = [Candidate(f.bits, f.group_size) for f in self.config.candidates]
        if kind == "uniform":
            return formats
        allowed = CODEBOOK_BITS if kind == "codebook" else TRELLIS_BITS
        bad = sorted({f.bits for f in formats} - allowed)
        if bad:
            raise QuantmillError(f"{kind} method '{default.method}' supports "
                                 f"{sorted(allowed)} bits; candidates ask for {bad}")
        # a codebook has no groups: one candidate per bit width, carrying the method's own
        by_bits = {f.bits: Candidate(f.bits, default.group_size) for f in formats}
        return [by_bits[b] for b in sorted(by_bits)]

    def _budget_bits(self, numel: int) -> int:
        c = self.config
        if c.avg_bits is not None:
            return int(c.avg_bits * numel)  # floor: never above the asked average
        return int(c.max_bytes) * 8

    def _describe_budget(self) -> str:
        c = self.config
        if c.avg_bits is not None:
            return f"avg_bits={c.avg_bits:g}"
        return f"max_bytes={c.max_bytes}"

    def _details(self, candidates: list[Candidate], kind: WeightKind, proxy: str,
                 cost: dict[str, list[int]], shapes: dict[str, tuple[int, int]],
                 sens: Sensitivity, chosen: dict[str, int], groups: list[list[str]],
                 budget_bits: int, numel: int, minimum: int,
                 solution: knapsack.Solution) -> dict[str, Any]:
        c: MixedPrecisionConfig = self.config  # type: ignore[assignment]
        achieved = sum(cost[n][k] for n, k in chosen.items())
        table = {
            n: {
                "shape": list(shapes[n]),
                "damage": {k.label: sens.damages[n][i] for i, k in enumerate(candidates)},
                "bits_per_weight": {k.label: cost[n][i] / (shapes[n][0] * shapes[n][1])
                                    for i, k in enumerate(candidates)},
                "chosen": candidates[chosen[n]].label,
            }
            for n in chosen
        }
        counts: dict[str, int] = {}
        for k in chosen.values():
            counts[candidates[k].label] = counts.get(candidates[k].label, 0) + 1
        return {
            "allocator": self.name,
            "budget": ({"avg_bits": c.avg_bits} if c.avg_bits is not None
                       else {"max_bytes": c.max_bytes}),
            "budget_bits": budget_bits,
            "quantized_weights": numel,
            "achieved_avg_bits": achieved / numel,
            "achieved_bytes": -(-achieved // 8),
            "min_avg_bits": minimum / numel,
            "predicted_damage": solution.damage,
            "candidates": [{"bits": k.bits, "group_size": k.group_size, "label": k.label}
                           for k in candidates],
            "weight_kind": kind,
            "measure": _measure_text(c.weighting, proxy),
            "proxy": proxy,
            "weighting": c.weighting,
            "hessian_tokens": sens.hessian_tokens,
            "fisher_tokens": sens.fisher_tokens,
            "sensitivity_seconds": round(sens.seconds, 3),
            "solver": {"exact": solution.exact, "unit_bits": solution.unit},
            "ties": [g for g in groups if len(g) > 1],
            "formats_chosen": counts,
            "sensitivity": table,
        }


def _measure_text(weighting: str, proxy_name: str) -> str:
    proxy = {"codebook": "k-means codebook (clustering quantizer; RTN if it is not installed)",
             "rtn": "round-to-nearest",
             "rtn-g128": "round-to-nearest at the same bits, groups of 128 (trellis proxy)",
             }[proxy_name]
    error = "sum_j dW_j H dW_j^T, H = mean x x^T of the module's calibration inputs"
    weights = {"fisher": "0.5 * G_j (mean squared loss gradient of output j) per output row",
               "fisher_layer": "0.5 * mean_j G_j per module",
               "none": "none (raw output error)"}[weighting]
    return f"calibration-weighted output error {error}; dW = W - Q(W), Q: {proxy}; " \
           f"weighting: {weights}"


@hookimpl
def register_bit_allocators() -> list[type[BitAllocator]]:
    return [MixedPrecisionAllocator]
