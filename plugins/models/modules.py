"""Finding the linear modules a quantizer may touch."""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

from quantmill.plugins.errors import QuantmillError

DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "*embed*")


def block_output(value: Any) -> torch.Tensor:
    """A decoder block's output hidden states (transformers before 5 return them in a tuple)."""
    return value[0] if isinstance(value, tuple) else value


def matches_any(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """fnmatch on the full dotted module name or on its last component."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def quantizable_linears(
    model: torch.nn.Module, skip: list[str] | tuple[str, ...] = DEFAULT_SKIP
) -> list[str]:
    """Names of ``nn.Linear`` modules not matching any skip pattern, in model order."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not matches_any(name, skip)
    ]


def loaded_linears(model: torch.nn.Module, names: list[str] | dict[str, object],
                   method: str) -> dict[str, torch.nn.Linear]:
    """The named modules of ``model``, checked to be ``nn.Linear`` with weights in memory
    (not deferred on the meta device): a quantizer that reads weights directly fails clearly
    on a plan naming anything else, before doing any work."""
    modules = dict(model.named_modules())
    found: dict[str, torch.nn.Linear] = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            raise QuantmillError(f"{method}: '{name}' is not a linear layer of the model")
        if module.weight.is_meta:
            raise QuantmillError(f"{method}: the weight of '{name}' is not loaded")
        found[name] = module
    return found
