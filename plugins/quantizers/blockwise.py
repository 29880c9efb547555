"""Decoder block by decoder block quantization with stage-wise Hessians, shared by the
quantizers that compensate errors across a block's linears (``clustering`` with ``compensate``,
``trellis``).

Linears are grouped in stages by the input they share (q/k/v, then o, then gate/up, then down in
a Llama block). Each stage's full Hessian is accumulated from inputs computed with the block's
*already quantized* earlier linears, the stage is quantized by a callback, and the block's
outputs, computed with its quantized weights, feed the next block. So errors of earlier layers
are seen, and partly corrected, by later ones, as in GPTQ. The stages are found by watching one
forward pass, so no architecture-specific staging is written here; each block is quantized in a
copy, so the caller's model is never modified. (GPTQ has its own single-pass staging in
``gptq/layerwise.py``, which also caches activations to avoid recomputing them.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models.modules import block_output
from quantmill.plugins.progress import progress_bar
from quantmill.plugins.quantizers.gptq.algorithm import HessianAccumulator
from quantmill.plugins.quantizers.gptq.layerwise import capture_block_inputs, find_decoder_layers

#: callback quantizing the linears of one stage (full names, modules) given their Hessian
StageQuantizer = Callable[[list[str], list[torch.nn.Linear], torch.Tensor], dict[str, Any]]


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


def find_stages(block: torch.nn.Module, planned: dict[str, torch.nn.Linear], h: torch.Tensor,
                kw: dict[str, Any], where: str, method: str = "clustering") -> list[list[str]]:
    """The planned linears in call order, grouped into runs that read the same input tensor.

    "The same" is tensor identity (q/k/v get one ``hidden_states`` object, gate/up one ``x``),
    with every input kept referenced until the end, as the sensitivity pass does. Not the data
    pointer: once o_proj's input is freed, the allocator may hand its memory (same shape on
    Llama) to the MLP's input, and o_proj would then be grouped with gate/up and lend them its
    Hessian; whether that happens depended on what had run before in the process."""
    calls: list[tuple[str, torch.Tensor]] = []

    def hook_for(local: str) -> Callable[[torch.nn.Module, tuple], None]:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            if all(local != seen for seen, _ in calls):
                calls.append((local, args[0]))  # the reference keeps its memory from reuse
        return hook

    handles = [module.register_forward_pre_hook(hook_for(local))
               for local, module in planned.items()]
    try:
        block(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    silent = sorted(set(planned) - {local for local, _ in calls})
    if silent:
        raise QuantmillError(f"{method}: {where}.{silent[0]} is never called by its block's "
                             "forward, so no Hessian can be measured for it")
    stages: list[list[str]] = []
    previous = None
    for local, tensor in calls:
        if stages and tensor is previous:
            stages[-1].append(local)
        else:
            stages.append([local])
        previous = tensor
    return stages


def stage_hessian(block: torch.nn.Module, first: torch.nn.Module, hidden: list[torch.Tensor],
                   kwargs: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
    """Run the block on every batch until ``first`` is called; accumulate its input's Hessian."""
    acc = HessianAccumulator(first.in_features, device)

    def grab(_module: torch.nn.Module, args: tuple) -> None:
        acc.add(args[0])
        raise StopForward

    handle = first.register_forward_pre_hook(grab)
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            try:
                block(h.to(device), **kw)
            except StopForward:
                pass
    finally:
        handle.remove()
    return acc.hessian()


@torch.inference_mode()
def quantize_blockwise(
    model: torch.nn.Module, names: list[str], input_ids: torch.Tensor, batch_size: int,
    device: torch.device, quantize_stage: StageQuantizer,
    method: str = "clustering with compensate", fallback: str = "set compensate: false",
) -> dict[str, Any]:
    """Quantize the named linears block by block with ``quantize_stage`` (see module doc);
    ``method`` and ``fallback`` word the errors (the trellis quantizer runs through here too)."""
    if not names:
        return {}
    try:
        prefix, layers = find_decoder_layers(model)
    except QuantmillError:
        raise QuantmillError(f"{method}: could not find the model's decoder blocks "
                             f"({fallback})") from None
    per_block: list[list[str]] = [[] for _ in layers]
    for name in names:
        head, _, rest = name.partition(f"{prefix}.")
        index, _, local = rest.partition(".")
        if head or not index.isdigit() or not local or int(index) >= len(layers):
            raise QuantmillError(
                f"{method} quantizes linears inside decoder blocks; '{name}' "
                f"is not one (skip it, or {fallback})")
        per_block[int(index)].append(local)
    hidden, kwargs = capture_block_inputs(model, layers[0], input_ids, batch_size, device)
    kwargs = [{k: v for k, v in kw.items()
               if k not in ("use_cache", "past_key_values", "past_key_value")} for kw in kwargs]
    result: dict[str, Any] = {}
    # blocks of one class with the same planned linears run them in the same order: the
    # stages are watched once per such kind of block, not once per block
    known: dict[tuple[type, tuple[str, ...]], list[list[str]]] = {}
    with progress_bar(f"quantize ({method.split()[0]})", total=len(layers)) as advance:
        for i, block in enumerate(layers):
            where = f"{prefix}.{i}"
            work = copy.deepcopy(block).to(device)
            planned = {local: work.get_submodule(local) for local in per_block[i]}
            if planned:
                kind = (type(block), tuple(sorted(planned)))
                if kind not in known:
                    known[kind] = find_stages(work, planned, hidden[0].to(device), kwargs[0], where,
                                              method.split()[0])
                for stage in known[kind]:
                    hessian = stage_hessian(work, planned[stage[0]], hidden, kwargs, device)
                    full = [f"{where}.{local}" for local in stage]
                    done = quantize_stage(full, [planned[local] for local in stage], hessian)
                    for local, name in zip(stage, full, strict=True):
                        linear = planned[local]
                        # later stages and blocks run with the weights the checkpoint will hold
                        linear.weight.data = done[name].dequantize().to(linear.weight.device,
                                                                        linear.weight.dtype)
                        result[name] = done[name]
            for h, kw in zip(hidden, kwargs, strict=True):
                # in place: the same buffers serve every block, so memory stays flat
                h.copy_(block_output(work(h, **kw)))
            del work
            advance(1)
    return result
