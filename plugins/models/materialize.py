"""Filling a model built on the meta device with real tensors, without a second copy.

Building the skeleton on ``meta`` and assigning loaded tensors into it keeps peak memory at one
copy of the weights; these helpers handle what the file does not carry (tied weights,
non-persistent buffers such as rotary ``inv_freq``).
"""

from __future__ import annotations

import torch

from quantmill.plugins.errors import QuantmillError


def alias_tied(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point keys the file omits at the tensor of a key they are tied to (same Parameter)."""
    names_by_tensor: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(param), []).append(key)
    for group in names_by_tensor.values():
        present = [k for k in group if k in tensors]
        if not present:
            continue
        for key in group:
            if key not in tensors:
                tensors[key] = tensors[present[0]]


def materialize_non_persistent_buffers(
    model: torch.nn.Module,
    device: torch.device,
    allowed_meta: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Give buffers that no checkpoint holds (rotary inv_freq) real values on ``device``.

    The model was built on the meta device, so these buffers have no data. transformers' own
    loader does the same thing: allocate them, then run the model's weight initialisation on
    their modules, which recomputes them from the config. Every loaded tensor is flagged
    ``_is_hf_initialized`` meanwhile, which transformers' init functions respect, so a module
    holding both parameters and such buffers keeps its loaded parameters.
    """
    owners: list[torch.nn.Module] = []
    fresh: set[int] = set()
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta and name in module._non_persistent_buffers_set:
                module._buffers[name] = torch.empty_like(buf, device=device)
                fresh.add(id(module._buffers[name]))
                if not owners or owners[-1] is not module:
                    owners.append(module)
    init = getattr(model, "_init_weights", None)
    if owners and callable(init):
        loaded = [
            t
            for t in (*model.parameters(), *model.buffers())
            if id(t) not in fresh and not hasattr(t, "_is_hf_initialized")
        ]
        for tensor in loaded:
            tensor._is_hf_initialized = True
        try:
            with torch.no_grad():
                for module in owners:
                    init(module)
        finally:
            for tensor in loaded:
                del tensor._is_hf_initialized
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    leftover += [n for n, p in model.named_parameters() if p.is_meta and n not in allowed_meta]
    if leftover:
        raise QuantmillError(
            f"tensors left without values after loading: {', '.join(sorted(leftover)[:5])}"
        )
