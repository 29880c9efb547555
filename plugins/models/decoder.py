"""What quantmill knows about decoder-only model families, in one place: where the decoder
blocks are, how to capture the first block's inputs, which module names a block has, and the
layout of a Llama-style block (Llama, Mistral, Qwen2, SmolLM) that the fast staged pass in
``plugins.blockwise.stages`` relies on.

Everything that walks a model block by block (``plugins.blockwise``) asks here, so supporting a
new family means teaching this module, not each quantizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models import deferred

#: A Llama-style block's linears, by the input they read: q/k/v read ``input_layernorm(h)``,
#: o_proj the attention's output, gate/up ``post_attention_layernorm(h2)``, down the MLP's.
LLAMA_ATTENTION_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA_ATTENTION_OUTPUT = "self_attn.o_proj"
LLAMA_MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj")
LLAMA_MLP_OUTPUT = "mlp.down_proj"
LLAMA_STAGES: tuple[tuple[str, ...], ...] = (LLAMA_ATTENTION_INPUTS, (LLAMA_ATTENTION_OUTPUT,),
                                             LLAMA_MLP_INPUTS, (LLAMA_MLP_OUTPUT,))
LLAMA_LINEARS = tuple(name for stage in LLAMA_STAGES for name in stage)
LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")

#: Keyword arguments of a captured block call that belong to generation, not to calibration.
_GENERATION_KWARGS = ("use_cache", "past_key_values", "past_key_value")


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList holding the decoder blocks (``model.layers`` in Llama-family models)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (
            count is None or len(module) == count
        ):
            return name, module
    raise QuantmillError("could not find the model's decoder blocks")


def split_by_block(names: Sequence[str], prefix: str, count: int,
                   refusal: str) -> list[dict[str, str]]:
    """``[block index] -> {local name: full name}`` for module names inside decoder blocks;
    a name outside them is refused with ``refusal.format(name=...)``."""
    per_block: list[dict[str, str]] = [{} for _ in range(count)]
    for name in names:
        head, _, rest = name.partition(f"{prefix}.")
        index, _, local = rest.partition(".")
        if head or not index.isdigit() or not local or int(index) >= count:
            raise QuantmillError(refusal.format(name=name))
        per_block[int(index)][local] = name
    return per_block


def is_llama_block(block: torch.nn.Module) -> bool:
    """The block has every module of a Llama-style block (the staged pass still checks that
    it computes what that layout implies: ``plugins.blockwise.stages.llama_staging_holds``)."""
    modules = dict(block.named_modules())
    return all(name in modules for name in (*LLAMA_LINEARS, *LLAMA_NORMS, "self_attn", "mlp"))


@torch.inference_mode()
def capture_block_inputs(
    model: torch.nn.Module, first_block: torch.nn.Module, input_ids: torch.Tensor,
    batch_size: int, device: torch.device, into: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run the model up to its first decoder block; return its inputs and keyword arguments per
    batch (rotary position embeddings, masks; generation arguments dropped), without running
    any block.

    With ``into`` (float32 [num_samples, seq_len, hidden]) the inputs are written there and the
    returned tensors are views of it, one per batch.
    """
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs["hidden_states"]
        if into is None:
            hidden.append(hs.detach().to(torch.float32))
        else:
            start = sum(h.shape[0] for h in hidden)
            view = into[start : start + hs.shape[0]]
            view.copy_(hs)
            hidden.append(view)
        kwargs_list.append({k: v for k, v in kwargs.items()
                            if k != "hidden_states" and k not in _GENERATION_KWARGS})
        raise StopForward

    embeddings = model.get_input_embeddings()
    prefix = next(name for name, m in model.named_modules() if m is embeddings)
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        # a deferred input embedding is fetched for this pass only
        with deferred.borrowed(embeddings, prefix, deferred.fetcher_of(model), device):
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start : start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return hidden, kwargs_list


def hidden_size(model: torch.nn.Module) -> int:
    """Width of the residual stream (the input embedding's width)."""
    return int(model.get_input_embeddings().embedding_dim)
