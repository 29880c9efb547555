"""Calibration statistics for clustering without compensation: what the layers' inputs look
like.

``input_second_moments``: one pass of the unmodified model with forward pre-hooks on the planned
linears, accumulating mean x_j**2 per input column (the Hessian diagonal up to a factor of 2) in
float64, streaming batch by batch. Works for any architecture. (With ``compensate``, clustering
runs block by block with full stage Hessians: ``plugins/blockwise``.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models.decoder import StopForward
from quantmill.plugins.progress import progress_bar


@torch.inference_mode()
def input_second_moments(
    model: torch.nn.Module, names: list[str], input_ids: torch.Tensor, batch_size: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Mean of x_j**2 over all calibration tokens for each input column j of each named linear
    (float32 [in_features] per name)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str) -> Callable[[torch.nn.Module, tuple], None]:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # [tokens, in]
            squares = (x.to(torch.float64) ** 2).sum(dim=0)
            sums[name] = sums[name] + squares if name in sums else squares
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    def stop(_module: torch.nn.Module, _args: tuple) -> None:
        raise StopForward

    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in names]
    # the vocabulary projection is the costliest step (and its logits the biggest tensor):
    # skip it unless it is itself to be quantized
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if isinstance(head, torch.nn.Module) and all(modules[n] is not head for n in names):
        handles.append(head.register_forward_pre_hook(stop))
    try:
        with progress_bar("calibrate (clustering)", total=input_ids.shape[0]) as advance:
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start : start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except StopForward:
                    pass
                advance(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in counts]
    if missing:
        raise QuantmillError(f"clustering: no calibration input reached {', '.join(missing[:3])}")
    return {name: (sums[name] / counts[name]).to(torch.float32) for name in names}
