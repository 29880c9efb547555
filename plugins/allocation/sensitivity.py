"""How much each candidate format would damage each module: the mixed-precision allocator's
measurements. Pure tensor functions first, then a small driver over a decoder model.

The measure, and why:

* A module's damage in a format is its **calibration-weighted output error**
  ``sum_j dW_j H dW_j^T`` with ``dW = W - Q(W)`` and ``H = mean x x^T`` over the module's float
  inputs on calibration tokens: the mean squared change of its outputs, per token. It needs one
  forward pass for every candidate together (Q is cheap), unlike a loss-increase measure, which
  needs a forward pass per module and format (800 for SmolLM2 with four candidates).
* ``Q`` is a proxy of the executing quantizer: round-to-nearest with the candidate's bits and
  group size (``quantizers/rtn``) for the uniform methods (RTN, and GPTQ, whose error is lower
  but ranks formats and modules much alike), and the sensitivity-weighted k-means codebook of
  the ``clustering`` quantizer for it (RTN at the same bits when that quantizer is not
  installed). A GPTQ proxy (each module run through GPTQ alone, per candidate) was tried for
  GPTQ plans on SmolLM2-135M at 3.5 average bits: perplexity 30.15 against 29.95 with the RTN
  proxy (GPTQ with act-order, static groups, MSE clipping), 36.97 against 36.85 (GPTQ defaults),
  for a sensitivity pass 20 to 30 times longer; so RTN is the proxy.
* Output errors of different modules are not equally harmful: an error in a layer whose outputs
  the loss barely reacts to costs little. ``weighting="fisher"`` (the default) turns each output
  error into a predicted loss increase with a second-order Taylor expansion and the empirical
  Fisher of the outputs, diagonal per output channel and averaged over tokens:
  ``0.5 * sum_j G_j dW_j H dW_j^T`` with ``G_j`` the mean squared gradient of the calibration
  next-token loss (summed over tokens) with respect to output ``j``. The damages are then in nats
  per token, additive across modules to first order, which is what the knapsack assumes.
  ``fisher_layer`` uses one mean ``G`` per module; ``none`` the raw output error. Checked on
  SmolLM2-135M (RTN plans at 2.5 / 3.0 / 3.5 / 4.0 / 4.5 average bits, WikiText-2 perplexity,
  fp32 25.62): ``fisher`` 24305 / 410 / 56.8 / 40.6 / 30.2, ``fisher_layer`` 18519 / 327 / 57.7 /
  40.0 / 30.3, ``none`` 279175 / 9096 / 547 / 55.9 / 40.9. Unweighted output errors spend bits
  on layers the loss does not care about; the two Fisher variants are close, and ``fisher``'s
  predicted damage in nats is well calibrated (0.80 predicted at 3.5 bits, 0.80 measured:
  ln(56.8 / 25.62)), so it is the default.

Memory: Hessians are collected decoder block by decoder block by the block-wise pipeline
(``plugins.blockwise``: a stage's modules read one tensor and share one H) and turned into
damages before the next block runs, so only one block's H are ever held. Deferred
(meta-device) block weights are fetched one block at a time in a copy; the Fisher pass needs a
backward through the whole model, so for it the deferred weights are fetched for its duration and
put back on the meta device afterwards (the block pass then uses them too, rather than fetching
them a second time). On SmolLM2-135M that pass sets the peak: about 2.1 GB resident on CPU, with
or without deferred weights, against 1.8 GB for GPTQ itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from quantmill.plugins.allocation.cost import Candidate, WeightKind
from quantmill.plugins.blockwise.pipeline import (
    BlockContext,
    BlockMethod,
    PipelineOptions,
    Stage,
    StageOutcome,
    run_blockwise,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hadamard import InputRotation, rotation_site
from quantmill.plugins.models import deferred
from quantmill.plugins.quantizers.rtn.algorithm import quantize_groups

Weighting = Literal["fisher", "fisher_layer", "none"]
#: group size of the round-to-nearest proxy of a trellis format
TRELLIS_PROXY_GROUP = 128


# ---------------------------------------------------------------------------------------------
# Pure tensor functions
# ---------------------------------------------------------------------------------------------


def output_error_per_row(dw: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``dW_j H dW_j^T`` for every output row j (float32 [out]): the mean squared change of
    output j per token when the weight moves by ``dw`` and the inputs have ``H = mean x x^T``."""
    dw = dw.to(torch.float32)
    return ((dw @ hessian.to(torch.float32)) * dw).sum(dim=1)


def weighted_damage(dw: torch.Tensor, hessian: torch.Tensor,
                    channel_weights: torch.Tensor | None = None) -> float:
    """``sum_j c_j dW_j H dW_j^T`` (all ``c_j`` = 1 when ``channel_weights`` is None)."""
    rows = output_error_per_row(dw, hessian).to(torch.float64)
    if channel_weights is not None:
        rows = rows * channel_weights.to(rows.device, torch.float64)
    return float(rows.sum())


def proxy_dequantized(weight: torch.Tensor, candidate: Candidate, sym: bool,
                      kind: WeightKind = "uniform",
                      column_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The weight after the cheap proxy of ``candidate``'s format (float32, weight's device):
    the clustering quantizer's k-means for codebooks (columns weighted by ``column_weights``,
    the Hessian diagonal), else round-to-nearest; for trellis formats round-to-nearest at the
    same bits with groups of ``TRELLIS_PROXY_GROUP`` (a ranking proxy: a trellis errs less than
    RTN at every width, much alike across modules; the plans it gives reached 27.21 perplexity
    at 3.5 bits in bench/results/trellis-cuda-experiments.json)."""
    w = weight.detach().to(torch.float32)
    if kind == "codebook":
        cluster = _codebook_quantizer()
        if cluster is not None:
            return cluster(w, candidate.bits, column_weights).to(w.device)
    group = TRELLIS_PROXY_GROUP if kind == "trellis" else candidate.group_size
    qw = quantize_groups(w.cpu(), candidate.bits, group, sym)
    return qw.dequantize().to(w.device)


def _codebook_quantizer() -> Callable[[torch.Tensor, int, torch.Tensor | None],
                                       torch.Tensor] | None:
    """The clustering quantizer's k-means (few iterations: a proxy), or None if not installed."""
    try:
        from quantmill.plugins.quantizers.clustering.algorithm import cluster_weight
    except ImportError:
        return None

    def cluster(w: torch.Tensor, bits: int, column_weights: torch.Tensor | None) -> torch.Tensor:
        return cluster_weight(w, bits, column_weights, iterations=10).dequantize()

    return cluster


def candidate_damages(weight: torch.Tensor, hessian: torch.Tensor,
                      candidates: Sequence[Candidate], sym: bool,
                      kind: WeightKind = "uniform",
                      channel_weights: torch.Tensor | None = None) -> list[float]:
    """The damage of each candidate format for one module (see the module docstring)."""
    w = weight.detach().to(torch.float32)
    hessian = hessian.to(w.device, torch.float32)
    diag = torch.diagonal(hessian).clamp_min(0)
    out = []
    for candidate in candidates:
        dw = w - proxy_dequantized(w, candidate, sym, kind, diag)
        out.append(weighted_damage(dw, hessian, channel_weights))
    return out


def fisher_channel_weights(grad_power: torch.Tensor, weighting: Weighting) -> torch.Tensor | None:
    """Per-output-channel factors for ``weighted_damage`` from the mean squared output gradients:
    ``0.5 * G_j`` (fisher), ``0.5 * mean(G)`` for every channel (fisher_layer), or None."""
    if weighting == "none":
        return None
    g = grad_power.to(torch.float64)
    if weighting == "fisher_layer":
        g = torch.full_like(g, float(g.mean()))
    return 0.5 * g


# ---------------------------------------------------------------------------------------------
# Driver over a model
# ---------------------------------------------------------------------------------------------


@dataclass
class SensitivityOptions:
    """How the measurements are taken (calibration samples are the first ones of the set)."""

    num_samples: int = 32
    batch_size: int = 4
    weighting: Weighting = "fisher"
    fisher_samples: int = 8
    #: measure the weights as a rotating quantizer sees them (``W @ T`` with the Hessian of
    #: ``x @ T``, ``plugins/hadamard.py``); None: unrotated
    rotation_seed: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class Sensitivity:
    """``damages[name][k]``: module ``name``'s damage in candidate ``k``; and how it was got."""

    damages: dict[str, list[float]]
    seconds: float
    hessian_tokens: int
    fisher_tokens: int
    details: dict[str, Any] = field(default_factory=dict)


def _set_leaf(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._parameters[leaf] = value


@contextlib.contextmanager
def materialized(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Fetch every deferred (meta) weight for the duration of the block; put the meta
    placeholders back afterwards, so the caller's model is left as it came.

    Tied parameters (an output embedding sharing the input embedding's tensor) are fetched once
    under their first name and stay tied, both while fetched and after."""
    aliases: dict[int, list[str]] = {}
    originals: dict[int, torch.nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.is_meta:
            aliases.setdefault(id(param), []).append(name)
            originals[id(param)] = param
    if not aliases:
        yield
        return
    fetcher = deferred.fetcher_of(model)
    first = [names[0] for names in aliases.values()]
    if fetcher is None:
        raise QuantmillError(
            f"{len(first)} weights (e.g. {first[0]}) are on the meta device and the model has "
            "no fetcher for them: load the model fully"
        )
    try:
        fetched = fetcher.fetch(first)
        for names in aliases.values():
            real = torch.nn.Parameter(fetched.pop(names[0]).to(device), requires_grad=False)
            for name in names:
                _set_leaf(model, name, real)
        del fetched
        yield
    finally:
        for key, names in aliases.items():
            for name in names:
                _set_leaf(model, name, originals[key])


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (only activation gradients are wanted); flags restored after."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))


def output_gradient_power(model: torch.nn.Module, names: Sequence[str],
                          input_ids: torch.Tensor, device: torch.device) -> tuple[
                              dict[str, torch.Tensor], int]:
    """Mean over tokens of the squared gradient of the summed next-token loss with respect to
    each named linear's outputs (float64 [out] per module), and the tokens it averaged over.

    One sample per backward pass: the logits of a 50k vocabulary are 100 MB per 512 tokens."""
    modules = {name: model.get_submodule(name) for name in names}
    sums = {name: torch.zeros(m.out_features, dtype=torch.float64, device=device)
            for name, m in modules.items()}

    def capture(name: str) -> Any:
        def forward_hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(accumulate)

        def accumulate(grad: torch.Tensor) -> None:  # returns None: the gradient is unchanged
            g = grad.detach().to(torch.float64)
            sums[name].add_(g.pow(2).reshape(-1, g.shape[-1]).sum(dim=0))

        return forward_hook

    def needs_grad(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)  # the graph starts at the embeddings

    handles = [m.register_forward_hook(capture(n)) for n, m in modules.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(needs_grad))
    tokens = 0
    try:
        with _frozen(model), torch.enable_grad():
            for row in range(input_ids.shape[0]):
                ids = input_ids[row : row + 1].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
                loss.backward()
                tokens += ids.numel()
                del logits, loss
    finally:
        for handle in handles:
            handle.remove()
    return {name: s / max(tokens, 1) for name, s in sums.items()}, tokens


class _BlockDamages(BlockMethod):
    """The sensitivity pass as a method of the block-wise pipeline: every stage's Hessian
    (from the float model: nothing is quantized, so each block feeds the next its float
    outputs) turned into each module's damage per candidate."""

    label = "sensitivity"
    activation_cache = torch.float32  # the float stream stays exact

    def __init__(self, candidates: Sequence[Candidate], sym: bool, kind: WeightKind,
                 options: SensitivityOptions,
                 channel_weights: dict[str, torch.Tensor | None]):
        self.candidates, self.sym, self.kind = candidates, sym, kind
        self.options = options
        self.channel_weights = channel_weights

    def quantize_stage(self, block: BlockContext, stage: Stage,
                       hessian: torch.Tensor) -> StageOutcome:
        mean_xx = hessian / 2.0  # the pipeline's H is 2 X^T X / n; the damages use mean x x^T
        out = StageOutcome()
        for name, module in zip(stage.names, stage.modules, strict=True):
            weight, h = module.weight, mean_xx
            if self.options.rotation_seed is not None:
                rotation = InputRotation.for_site(weight.shape[1], self.options.rotation_seed,
                                                  rotation_site(name))
                weight = rotation.apply(weight.detach().float())
                h = rotation.rotate_hessian(h)
            out.details[name] = {"damages": candidate_damages(
                weight, h, self.candidates, self.sym, self.kind,
                self.channel_weights.get(name))}
        return out


def _block_damages(model: torch.nn.Module, names: Sequence[str],
                   candidates: Sequence[Candidate], sym: bool, kind: WeightKind,
                   input_ids: torch.Tensor, options: SensitivityOptions,
                   channel_weights: dict[str, torch.Tensor | None]) -> dict[str, list[float]]:
    result = run_blockwise(
        model, list(names), input_ids,
        _BlockDamages(candidates, sym, kind, options, channel_weights),
        PipelineOptions(batch_size=options.batch_size, device=options.device,
                        refusal="mixed_precision measures the linears of decoder blocks; "
                                "'{name}' is not one (skip it with the quantizer's 'skip' "
                                "setting)"))
    return {name: facts["damages"] for name, facts in result.details.items()}


def measure_sensitivity(model: torch.nn.Module, names: Sequence[str],
                        candidates: Sequence[Candidate], sym: bool, kind: WeightKind,
                        input_ids: torch.Tensor, options: SensitivityOptions) -> Sensitivity:
    """Damage of every candidate for every named linear (inside the model's decoder blocks).

    With Fisher weighting the deferred weights are fetched once for both passes (the backward
    pass needs them all anyway); without it, the block pass fetches one block at a time."""
    started = time.perf_counter()
    ids = input_ids[: options.num_samples]
    channel_weights: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    fisher_tokens = 0
    needs_fisher = options.weighting != "none"
    with materialized(model, options.device) if needs_fisher else contextlib.nullcontext():
        if needs_fisher:
            power, fisher_tokens = output_gradient_power(
                model, names, input_ids[: options.fisher_samples], options.device)
            channel_weights = {n: fisher_channel_weights(power[n], options.weighting)
                               for n in names}
        damages = _block_damages(model, names, candidates, sym, kind, ids, options,
                                 channel_weights)
    return Sensitivity(damages=damages, seconds=time.perf_counter() - started,
                       hessian_tokens=int(ids.numel()), fisher_tokens=fisher_tokens)
