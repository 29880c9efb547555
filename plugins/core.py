"""quantmill's default answers to the decision hooks, registered ``trylast`` so that any plugin
can pre-empt them (``tryfirst``) or wrap them (``wrapper=True``)."""

from __future__ import annotations

from pathlib import Path

from quantmill.plugins.base import ModelSource
from quantmill.plugins.hookspecs import hookimpl


@hookimpl(trylast=True)
def select_model_source(path: str, candidates: list[type[ModelSource]]) -> str | None:
    """The first registered source whose ``accepts`` says yes."""
    for cls in candidates:
        if cls().accepts(Path(path)):
            return cls.name
    return None
