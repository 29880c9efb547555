"""Finding the linear modules a quantizer may touch."""

from __future__ import annotations

import fnmatch

import torch

DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "*embed*")


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
