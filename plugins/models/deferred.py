"""Deferred weights: a model whose big linear weights stay on the meta device until needed.

Layer-by-layer quantization touches one decoder block at a time, so holding every block's float
weights for the whole run only costs memory (425 MB of the 540 MB of SmolLM2-135M in float32).
The input and output embeddings are needed even less: once, to turn the calibration ids into the
first block's inputs (113 MB for SmolLM2; 2 x 2.1 GB for Llama-3-8B). A model source can leave
all of these unmaterialised and attach a fetcher; a consumer that knows about deferral (the GPTQ
quantizer, the checkpoint writer) asks for tensors by name when it needs them, or ``borrow``s a
module's weights for a moment. Anything else must be given a fully loaded model
(``ModelSource.load``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

ATTRIBUTE = "_quantmill_deferred_weights"


class WeightFetcher(Protocol):
    def fetch(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Float32 tensors for the given state-dict names (CPU)."""
        ...


def attach(model: torch.nn.Module, fetcher: WeightFetcher) -> None:
    setattr(model, ATTRIBUTE, fetcher)


def fetcher_of(model: torch.nn.Module) -> WeightFetcher | None:
    return getattr(model, ATTRIBUTE, None)


def deferrable(model: torch.nn.Module) -> Callable[[str], bool]:
    """Predicate over state-dict names: the weights of nn.Linear modules inside the decoder
    blocks (the ModuleList of ``config.num_hidden_layers`` modules) and of the input and output
    embeddings."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    prefixes = [f"{name}." for name, module in model.named_modules()
                if isinstance(module, torch.nn.ModuleList) and count and len(module) == count]
    linears = {f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)}
    by_module = {id(module): name for name, module in model.named_modules()}
    embeddings = {f"{by_module[id(m)]}.weight"
                  for m in (_call(model, "get_input_embeddings"),
                            _call(model, "get_output_embeddings"))
                  if m is not None and id(m) in by_module}
    return lambda key: key in embeddings or (
        key in linears and any(key.startswith(p) for p in prefixes))


def _call(model: torch.nn.Module, method: str) -> torch.nn.Module | None:
    getter = getattr(model, method, None)
    return getter() if callable(getter) else None


def materialize(module: torch.nn.Module, prefix: str, fetcher: WeightFetcher,
                device: torch.device) -> None:
    """Replace ``module``'s meta parameters with real tensors fetched as ``prefix.<name>``."""
    missing = [name for name, p in module.named_parameters() if p.is_meta]
    if not missing:
        return
    fetched = fetcher.fetch([f"{prefix}.{name}" if prefix else name for name in missing])
    for name in missing:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        tensor = fetched[f"{prefix}.{name}" if prefix else name].to(device)
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


@contextmanager
def borrowed(module: torch.nn.Module, prefix: str, fetcher: WeightFetcher | None,
             device: torch.device) -> Iterator[torch.nn.Module]:
    """``module`` with its deferred parameters fetched for the duration of the block, then put
    back on the meta device, so the model is as it was (parameters shared with other modules,
    such as a tied output embedding, stay shared)."""
    originals = {name: p for name, p in module.named_parameters() if p.is_meta}
    if not originals or fetcher is None:
        yield module
        return
    materialize(module, prefix, fetcher, device)
    try:
        yield module
    finally:
        for name, param in originals.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._parameters[leaf] = param


def model_device(model: torch.nn.Module) -> torch.device:
    """The device the model computes on: that of its first real (non-meta) tensor, since any
    given weight (the embedding, say) may be deferred."""
    for tensor in (*model.parameters(), *model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")
