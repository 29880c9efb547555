"""One block-wise calibration pipeline for every method that works decoder block by decoder
block: GPTQ, clustering with compensation, trellis, and the mixed-precision allocator's
sensitivity measurement.

The pipeline finds the blocks (``plugins.models.decoder``), captures the first block's inputs
once, and for each block up to the last one with planned modules: makes a working copy with
real weights, lets the method look at it (``before_block``), runs it in stages
(``plugins.blockwise.stages``) calling ``method.quantize_stage`` for every stage with planned
linears and putting the returned weights into the copy, lets the method finish the block
(``after_block``), and feeds the block's outputs, computed with the quantized weights, to the
next block. The caller's model is never modified.

Contract for a layer-wise method (built-in or third party), ``BlockMethod``:

- ``quantize_stage(block, stage, hessian)`` quantizes the planned linears of one stage (they
  read one input; ``hessian`` is ``2 X^T X / n`` of it, from inputs computed with the block's
  earlier stages already quantized) and returns a ``StageOutcome``: weights by full module
  name (any ``QuantizedTensor`` dataclass with a ``dequantize()``) and JSON-able details.
- optional: ``start`` (once, with the first block's inputs), ``before_block``/``after_block``
  (whole-block work such as block tuning, which may change ``block.outcome``), and
  ``stream_state``/``restore_stream`` for tensors the *next* block needs besides the
  activations (block tuning's float stream).
- ``activation_cache``: dtype of the cached stage inputs in the fast Llama staging.

Resume: with a ``WorkArea`` (``plugins.blockwise.resume``), every finished block's outcome and
the stream after it are persisted; a rerun with the same key restores them and continues at the
first unfinished block. Because the restored stream is bit-identical to the one the
uninterrupted run had at that point, so is everything computed after it. A method whose
results depend on anything beyond its settings, the plan and the calibration data must put it
into the key (the flow builds the key; see ``flows/work.py``).
"""

from __future__ import annotations

import abc
import copy
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from quantmill.plugins.base import QuantizedWeight
from quantmill.plugins.blockwise.resume import WorkArea
from quantmill.plugins.blockwise.stages import (
    LlamaStaging,
    WatchedStaging,
    Workspace,
    llama_staging_holds,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models import deferred
from quantmill.plugins.models.decoder import (
    LLAMA_LINEARS,
    capture_block_inputs,
    find_decoder_layers,
    hidden_size,
    is_llama_block,
    split_by_block,
)
from quantmill.plugins.models.memory import release_free_memory
from quantmill.plugins.progress import progress_bar

log = logging.getLogger("quantmill.blockwise")


@dataclass
class StageOutcome:
    """What a method made of one stage: weights and details by full module name."""

    weights: dict[str, Any] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class BlockOutcome:
    """Everything one block produced, as it is persisted and merged."""

    weights: dict[str, Any] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: state-dict name -> changed float tensor (e.g. tuned norm weights)
    float_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: facts about the block as a whole (e.g. block tuning's losses)
    block_details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    """The planned linears of one stage: local names in the block, full names, modules."""

    locals: tuple[str, ...]
    names: tuple[str, ...]
    modules: tuple[torch.nn.Module, ...]


@dataclass
class BlockContext:
    """One block as a method sees it."""

    index: int
    name: str  # e.g. "model.layers.3"
    work: torch.nn.Module  # working copy with real weights, on the device
    planned: dict[str, str]  # local name -> full name
    hidden: list[torch.Tensor]  # the block's inputs per batch; its outputs once it has run
    kwargs: list[dict[str, Any]]
    device: torch.device
    outcome: BlockOutcome = field(default_factory=BlockOutcome)


class BlockMethod(abc.ABC):
    """A layer-wise method plugged into the pipeline (see the module docstring)."""

    #: names the progress bar and errors ("gptq", "trellis", ...)
    label: str = "blockwise"
    #: dtype of the stage inputs the Llama staging caches (float32: exact)
    activation_cache: torch.dtype = torch.float32

    def start(self, hidden: list[torch.Tensor],  # noqa: B027 - optional hooks do nothing
              kwargs: list[dict[str, Any]]) -> None:
        """Called once with the first block's inputs (views of the pipeline's buffer)."""

    def before_block(self, block: BlockContext) -> None:  # noqa: B027
        """Called with the block still in float, before its stages."""

    @abc.abstractmethod
    def quantize_stage(self, block: BlockContext, stage: Stage,
                       hessian: torch.Tensor) -> StageOutcome: ...

    def after_block(self, block: BlockContext) -> None:  # noqa: B027
        """Called once every stage is quantized and ``block.hidden`` holds its outputs."""

    def stream_state(self) -> dict[str, Any]:
        """Tensors besides the activations that the next block needs (persisted for resume)."""
        return {}

    def restore_stream(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Take back what ``stream_state`` returned (a resumed run)."""


@dataclass
class PipelineOptions:
    batch_size: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: how errors word a module outside the decoder blocks: "... '{name}' is not one (...)"
    refusal: str = "{label} quantizes linears inside decoder blocks; '{name}' is not one"


@dataclass
class PipelineResult:
    weights: dict[str, Any]
    details: dict[str, dict[str, Any]]
    float_tensors: dict[str, torch.Tensor]
    block_details: dict[str, dict[str, Any]]
    #: the first block this run computed (0 unless it resumed)
    resumed_at: int
    blocks: int
    staging: str


def _working_copy(block: torch.nn.Module, device: torch.device, name: str,
                  fetcher: deferred.WeightFetcher | None) -> torch.nn.Module:
    """A copy of the block on ``device`` with real weights (deferred ones fetched now); the
    caller's block stays as it is."""
    work = copy.deepcopy(block)
    if fetcher is not None:
        deferred.materialize(work, name, fetcher, device)
    return work.to(device)


def compact(weight: Any) -> Any:
    """A finished uniform weight waits for the end of the pass with its integers packed
    several to a byte (2 per byte at 3-4 bits, 4 at 2 bits), so earlier blocks' results add up
    less while later blocks still need their activations. Plain uint8 shifts: milliseconds per
    module. Other weight kinds are kept as they are."""
    if not isinstance(weight, QuantizedWeight):
        return weight
    per_byte = 8 // weight.bits
    rows, width = weight.intweight.shape
    if per_byte < 2 or width % per_byte:
        return weight
    codes = weight.intweight.to(torch.uint8).reshape(rows, width // per_byte, per_byte)
    packed = codes[..., 0].clone()
    for j in range(1, per_byte):
        packed |= codes[..., j] << (j * weight.bits)
    return _Compacted(replace(weight, intweight=weight.intweight.new_empty(rows, 0)), packed)


@dataclass
class _Compacted:
    weight: QuantizedWeight
    packed: torch.Tensor

    def expand(self) -> QuantizedWeight:
        qw, packed = self.weight, self.packed
        per_byte, mask = 8 // qw.bits, (1 << qw.bits) - 1
        rows, cols = packed.shape
        codes = torch.empty(rows, cols, per_byte, dtype=torch.uint8)
        for j in range(per_byte):
            codes[..., j] = (packed >> (j * qw.bits)) & mask
        return replace(qw, intweight=codes.reshape(rows, cols * per_byte))


def expand(weight: Any) -> Any:
    return weight.expand() if isinstance(weight, _Compacted) else weight


def _choose_staging(method: BlockMethod, layers: torch.nn.ModuleList, input_ids: torch.Tensor,
                    model: torch.nn.Module, planned: set[str],
                    options: PipelineOptions) -> tuple[LlamaStaging | WatchedStaging, Workspace]:
    """The fast staging for Llama-style blocks whose planned modules are its linears
    (re-checked numerically once the inputs are captured), the watched one otherwise."""
    width = hidden_size(model)
    if is_llama_block(layers[0]) and planned <= set(LLAMA_LINEARS):
        workspace = Workspace.allocate(input_ids, width, options.device,
                                       LlamaStaging.scratch_width(layers[0]),
                                       method.activation_cache)
        return LlamaStaging(workspace), workspace
    return WatchedStaging(method.label), Workspace.allocate(input_ids, width, options.device)


def run_blockwise(model: torch.nn.Module, names: list[str], input_ids: torch.Tensor,
                  method: BlockMethod, options: PipelineOptions,
                  work_area: WorkArea | None = None) -> PipelineResult:
    """Run ``method`` over the decoder blocks holding ``names`` (see the module docstring).

    Not in inference mode as a whole: the stages run in it, but a method's whole-block work
    (block tuning) needs autograd on the working copy, so the copies are ordinary tensors."""
    try:
        prefix, layers = find_decoder_layers(model)
    except QuantmillError:
        raise QuantmillError(f"{method.label}: could not find the model's decoder blocks") \
            from None
    refusal = options.refusal.replace("{label}", method.label)
    per_block = split_by_block(names, prefix, len(layers), refusal)
    last = max((i for i, planned in enumerate(per_block) if planned), default=-1)
    fetcher = deferred.fetcher_of(model)
    if last < 0:
        return PipelineResult({}, {}, {}, {}, resumed_at=0, blocks=0, staging="none")
    staging, workspace = _choose_staging(method, layers, input_ids, model,
                                         {local for block in per_block for local in block},
                                         options)
    hidden, kwargs = capture_block_inputs(model, layers[0], input_ids, options.batch_size,
                                          options.device, into=workspace.hidden)
    if isinstance(staging, LlamaStaging):
        first = _working_copy(layers[0], options.device, f"{prefix}.0", fetcher)
        if not llama_staging_holds(first, hidden[0], kwargs[0]):
            log.info("%s: %s blocks do not compute the Llama layout; stages are watched",
                     method.label, type(layers[0]).__name__)
            staging = WatchedStaging(method.label)
        del first
    method.start(hidden, kwargs)

    outcomes: list[BlockOutcome] = []
    start = 0
    if work_area is not None:
        found = work_area.finished()
        if work_area.discarded:
            log.warning("%s: the work area was not used (%s): starting from block 0",
                        method.label, work_area.discarded)
        if found is not None:
            start, outcomes, stream = found
            workspace.hidden.copy_(stream["hidden"])
            method.restore_stream(stream["method"])
            log.warning("%s: resuming at block %d of %d (blocks 0-%d were finished by an "
                        "earlier run)", method.label, start, last + 1, start - 1)
            outcomes = [replace(o, weights={n: compact(w) for n, w in o.weights.items()})
                        for o in outcomes]

    with progress_bar(f"quantize ({method.label})", total=last + 1) as advance:
        advance(start)
        for i in range(start, last + 1):
            where = f"{prefix}.{i}"
            block = BlockContext(i, where, _working_copy(layers[i], options.device, where,
                                                         fetcher),
                                 per_block[i], hidden, kwargs, options.device)
            method.before_block(block)
            modules = dict(block.work.named_modules())

            def on_stage(locals_: tuple[str, ...], hessian: torch.Tensor,
                         block: BlockContext = block,
                         modules: dict[str, torch.nn.Module] = modules) -> None:
                stage = Stage(locals_, tuple(block.planned[n] for n in locals_),
                              tuple(modules[n] for n in locals_))
                done = method.quantize_stage(block, stage, hessian)
                for local, name in zip(stage.locals, stage.names, strict=True):
                    if name not in done.weights:
                        continue
                    linear = modules[local]
                    # later stages and blocks run with the weights the checkpoint will hold
                    linear.weight.data = done.weights[name].dequantize().to(
                        linear.weight.device, linear.weight.dtype)
                block.outcome.weights.update(done.weights)
                block.outcome.details.update(done.details)

            staging.run(block.work, set(block.planned), hidden, kwargs, on_stage,
                        options.device, where)
            method.after_block(block)
            if work_area is not None:
                work_area.record(i, block.outcome, {"hidden": workspace.hidden,
                                                    "method": method.stream_state()})
            outcome = block.outcome
            outcomes.append(replace(outcome, weights={n: compact(w)
                                                      for n, w in outcome.weights.items()}))
            del block, modules, outcome
            # the block's working copy and temporaries are freed; without handing their pages
            # back, the long-lived results allocated among them pin a little more each block
            release_free_memory(collect=False)
            advance(1)
    del workspace, hidden, kwargs
    release_free_memory()
    result = PipelineResult({}, {}, {}, {}, resumed_at=start, blocks=last + 1,
                            staging=type(staging).__name__)
    for i, outcome in enumerate(outcomes):
        result.weights.update({n: expand(w) for n, w in outcome.weights.items()})
        result.details.update(outcome.details)
        result.float_tensors.update(outcome.float_tensors)
        if outcome.block_details:
            result.block_details[f"{prefix}.{i}"] = outcome.block_details
    return result


class StageFunction(BlockMethod):
    """A method that is nothing but its stage callback: ``quantize(full names, modules,
    hessian) -> StageOutcome`` (clustering with compensation, trellis)."""

    def __init__(self, label: str, quantize: Any):
        self.label = label
        self.quantize = quantize

    def quantize_stage(self, block: BlockContext, stage: Stage,
                       hessian: torch.Tensor) -> StageOutcome:
        return self.quantize(list(stage.names), list(stage.modules), hessian)
