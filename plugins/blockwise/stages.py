"""How one decoder block is run in stages: the linears that read one input form a stage, the
stage's Hessian is accumulated from inputs computed with the block's already-quantized earlier
stages, the stage is handed to a callback (which quantizes it and puts the result into the
block), and at the end the block's inputs are overwritten with its outputs.

Two ways to run a block, chosen per model by ``plugins.blockwise.pipeline``:

``LlamaStaging`` (Llama, Mistral, Qwen2, SmolLM blocks) runs the block once, in order:

1. ``input_layernorm(h)`` feeds q/k/v;
2. self-attention with the quantized q/k/v up to ``o_proj``'s input (o_proj skipped): that
   input is cached in the workspace and feeds o;
3. ``h2 = h + o(x)``, ``post_attention_layernorm(h2)`` feeds gate/up;
4. the MLP up to ``down_proj``'s input (down skipped): cached, it feeds down;
5. ``h2 + down(x)``, with the quantized weights, is the next block's input.

So every matrix product runs once per calibration token, as in one forward pass, plus the
Hessians. The layout is checked numerically against the block's own forward on the first sample
(``llama_staging_holds``) before it is used.

``WatchedStaging`` works for any block: the stages are found by watching one forward pass
(``find_stages``), and each stage's input is recomputed by running the block from its start
with the earlier stages already quantized (slower: the block runs once per stage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models.decoder import (
    LLAMA_ATTENTION_INPUTS,
    LLAMA_ATTENTION_OUTPUT,
    LLAMA_MLP_INPUTS,
    LLAMA_MLP_OUTPUT,
    StopForward,
)
from quantmill.plugins.models.modules import block_output
from quantmill.plugins.quantizers.hessian import HessianAccumulator

#: ``on_stage(local names, hessian)``: quantize the stage and put its weights into the block
OnStage = Callable[[tuple[str, ...], torch.Tensor], None]

MLP_CHUNK = 2  # samples per MLP forward in stage 4: 25 MB of intermediates, not 100 (SmolLM2)


@dataclass
class Workspace:
    """Activation buffers allocated once for the whole model and reused by every block.

    Why: a block's activations (its inputs, o_proj's inputs, down_proj's inputs) allocated afresh
    for each block leave the C allocator with freed chunks it keeps (RSS grew by ~500 MB over
    SmolLM2-135M's 30 blocks); fixed buffers make every block's allocations the same. o_proj's
    inputs are consumed (stage 3) before down_proj's are produced (stage 4), so both live in one
    buffer. Batches are views.

    The scratch buffer may hold bfloat16: the cached inputs only serve to compute o_proj's and
    down_proj's outputs with their quantized weights, after the Hessians were accumulated from
    the float32 activations. Rounding them costs a relative error of 2^-9 in those outputs, well
    below what 8-bit, let alone 2-4-bit, weights do to them, and halves the largest buffer.
    ``float32`` keeps the pass exact (the sensitivity measurement uses it).
    """

    hidden: torch.Tensor  # [samples, seq, hidden]: block inputs, updated in place to outputs
    scratch: torch.Tensor | None  # [samples * seq * widest stage input], cache dtype

    @classmethod
    def allocate(cls, input_ids: torch.Tensor, width: int, device: torch.device,
                 scratch_width: int = 0, cache_dtype: torch.dtype = torch.float32) -> Workspace:
        samples, seq = input_ids.shape
        scratch = (torch.empty(samples * seq * scratch_width, dtype=cache_dtype, device=device)
                   if scratch_width else None)
        return cls(torch.empty(samples, seq, width, dtype=torch.float32, device=device), scratch)

    def scratch_batches(self, sizes: list[int], width: int) -> list[torch.Tensor]:
        """The scratch buffer as [batch, seq, width] views, one per batch of ``sizes``."""
        assert self.scratch is not None
        seq = self.hidden.shape[1]
        view = self.scratch[: sum(sizes) * seq * width].view(sum(sizes), seq, width)
        return list(torch.split(view, sizes))


def _run_until(stop_at: torch.nn.Module, call: Callable[[], Any],
               on_input: Callable[[torch.Tensor], None]) -> None:
    """Call ``call()`` (a forward through a module containing ``stop_at``), hand ``stop_at``'s
    input to ``on_input`` and skip everything from ``stop_at`` on."""

    def hook(_module: torch.nn.Module, args: tuple) -> None:
        on_input(args[0])
        raise StopForward

    handle = stop_at.register_forward_pre_hook(hook)
    try:
        call()
    except StopForward:
        pass
    finally:
        handle.remove()


def _chunks(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part for batch in batches for part in batch.split(MLP_CHUNK)]


class LlamaStaging:
    """The single-pass staged run of a Llama-style block (see the module docstring)."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace

    @staticmethod
    def scratch_width(block: torch.nn.Module) -> int:
        m = dict(block.named_modules())
        return max(m[LLAMA_ATTENTION_OUTPUT].in_features, m[LLAMA_MLP_OUTPUT].in_features)

    @torch.inference_mode()
    def run(self, work: torch.nn.Module, planned: set[str], hidden: list[torch.Tensor],
            kwargs: list[dict[str, Any]], on_stage: OnStage, device: torch.device,
            where: str = "") -> None:
        m = dict(work.named_modules())
        ln1, ln2 = m["input_layernorm"], m["post_attention_layernorm"]
        attn, mlp = m["self_attn"], m["mlp"]
        o_proj, down = m[LLAMA_ATTENTION_OUTPUT], m[LLAMA_MLP_OUTPUT]
        sizes = [h.shape[0] for h in hidden]

        def accumulator(names: tuple[str, ...], width: int) -> HessianAccumulator | None:
            return HessianAccumulator(width, device) if planned.intersection(names) else None

        def finish(names: tuple[str, ...], acc: HessianAccumulator | None) -> None:
            if acc is not None:
                on_stage(tuple(n for n in names if n in planned), acc.hessian())

        acc = accumulator(LLAMA_ATTENTION_INPUTS, m[LLAMA_ATTENTION_INPUTS[0]].in_features)
        if acc is not None:
            for h in hidden:
                acc.add(ln1(h))
        finish(LLAMA_ATTENTION_INPUTS, acc)

        attn_inputs = self.workspace.scratch_batches(sizes, o_proj.in_features)
        acc = accumulator((LLAMA_ATTENTION_OUTPUT,), o_proj.in_features)
        for h, kw, cache in zip(hidden, kwargs, attn_inputs, strict=True):
            def keep(x: torch.Tensor, cache: torch.Tensor = cache,
                     acc: HessianAccumulator | None = acc) -> None:
                if acc is not None:
                    acc.add(x)
                cache.copy_(x)
            _run_until(o_proj, lambda h=h, kw=kw: attn(hidden_states=ln1(h), **kw), keep)
        finish((LLAMA_ATTENTION_OUTPUT,), acc)

        acc = accumulator(LLAMA_MLP_INPUTS, m[LLAMA_MLP_INPUTS[0]].in_features)
        for h, x in zip(hidden, attn_inputs, strict=True):
            h.add_(o_proj(x.to(h.dtype)))  # h2 = h + attention, in place
            if acc is not None:
                acc.add(ln2(h))
        finish(LLAMA_MLP_INPUTS, acc)

        # o_proj's inputs are consumed: their buffer now holds down_proj's
        mlp_inputs = self.workspace.scratch_batches(sizes, down.in_features)
        acc = accumulator((LLAMA_MLP_OUTPUT,), down.in_features)
        # the MLP's intermediates are the widest activations: run it MLP_CHUNK samples at a time
        for h2, cache in zip(_chunks(hidden), _chunks(mlp_inputs), strict=True):
            def keep_mlp(x: torch.Tensor, cache: torch.Tensor = cache,
                         acc: HessianAccumulator | None = acc) -> None:
                if acc is not None:
                    acc.add(x)
                cache.copy_(x)
            _run_until(down, lambda h2=h2: mlp(ln2(h2)), keep_mlp)
        finish((LLAMA_MLP_OUTPUT,), acc)

        for h, x in zip(hidden, mlp_inputs, strict=True):
            h.add_(down(x.to(h.dtype)))  # the block's output, the next block's input


@torch.inference_mode()
def llama_staging_holds(work: torch.nn.Module, h: torch.Tensor, kw: dict[str, Any]) -> bool:
    """The block computes ``h + attn(ln1(h))`` then ``h2 + mlp(ln2(h2))`` (checked on the first
    calibration sample; every block of a model shares one class)."""
    m = dict(work.named_modules())
    x = h[:1]
    batch = h.shape[0]

    def first_sample(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value[:1]
        if isinstance(value, tuple):
            return tuple(first_sample(v) for v in value)
        return value

    small_kw = {k: first_sample(v) for k, v in kw.items()}
    reference = block_output(work(x, **small_kw))
    h2 = x + m["self_attn"](hidden_states=m["input_layernorm"](x), **small_kw)[0]
    staged = h2 + m["mlp"](m["post_attention_layernorm"](h2))
    return torch.allclose(reference, staged, rtol=1e-4,
                          atol=1e-4 * float(reference.abs().max()))


def find_stages(block: torch.nn.Module, planned: dict[str, torch.nn.Module], h: torch.Tensor,
                kw: dict[str, Any], where: str, method: str) -> list[tuple[str, ...]]:
    """The planned linears in call order, grouped into runs that read the same input tensor.

    "The same" is tensor identity (q/k/v get one ``hidden_states`` object, gate/up one ``x``),
    with every input kept referenced until the end. Not the data pointer: once o_proj's input
    is freed, the allocator may hand its memory (same shape on Llama) to the MLP's input, and
    o_proj would then be grouped with gate/up and lend them its Hessian; whether that happens
    depended on what had run before in the process."""
    calls: list[tuple[str, torch.Tensor]] = []

    def hook_for(local: str) -> Callable[[torch.nn.Module, tuple], None]:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            if all(local != seen for seen, _ in calls):
                calls.append((local, args[0]))  # the reference keeps its memory from reuse
        return hook

    handles = [module.register_forward_pre_hook(hook_for(local))
               for local, module in planned.items()]
    try:
        with torch.inference_mode():
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
    return [tuple(stage) for stage in stages]


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


class WatchedStaging:
    """Stages found by watching a forward pass, each stage's input recomputed (any block)."""

    def __init__(self, method: str):
        self.method = method
        # blocks of one class with the same planned linears run them in the same order: the
        # stages are watched once per such kind of block, not once per block
        self._known: dict[tuple[type, tuple[str, ...]], list[tuple[str, ...]]] = {}

    @torch.inference_mode()
    def run(self, work: torch.nn.Module, planned: set[str], hidden: list[torch.Tensor],
            kwargs: list[dict[str, Any]], on_stage: OnStage, device: torch.device,
            where: str = "") -> None:
        if planned:
            modules = {local: work.get_submodule(local) for local in sorted(planned)}
            kind = (type(work), tuple(sorted(planned)))
            if kind not in self._known:
                self._known[kind] = find_stages(work, modules, hidden[0], kwargs[0], where,
                                                self.method)
            for stage in self._known[kind]:
                on_stage(stage, stage_hessian(work, modules[stage[0]], hidden, kwargs, device))
        for h, kw in zip(hidden, kwargs, strict=True):
            # in place: the same buffers serve every block, so memory stays flat
            h.copy_(block_output(work(h, **kw)))
