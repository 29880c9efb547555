"""Deferred weights: a model whose big linear weights stay on the meta device until needed.

Layer-by-layer quantization touches one decoder block at a time, so holding every block's float
weights for the whole run only costs memory (425 MB of the 540 MB of SmolLM2-135M in float32).
A model source can leave them unmaterialised and attach a fetcher; a consumer that knows about
deferral (the GPTQ quantizer, the checkpoint writer) asks for tensors by name when it needs them.
Anything else must be given a fully loaded model (``ModelSource.load``).
"""

from __future__ import annotations

from collections.abc import Callable
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


def defer_block_linears(model: torch.nn.Module) -> Callable[[str], bool]:
    """Predicate over state-dict names: the weights of nn.Linear modules inside the decoder
    blocks (the ModuleList of ``config.num_hidden_layers`` modules)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    prefixes = [f"{name}." for name, module in model.named_modules()
                if isinstance(module, torch.nn.ModuleList) and count and len(module) == count]
    linears = {f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)}
    return lambda key: key in linears and any(key.startswith(p) for p in prefixes)


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
