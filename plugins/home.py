"""Where quantmill keeps its state on one machine."""

from __future__ import annotations

import os
from pathlib import Path


def quantmill_home() -> Path:
    """``$QUANTMILL_HOME`` or ``~/.quantmill``: registry, storage, models, Prefect state.

    The registry resolves the same default on its own (it must not import plugins).
    """
    return Path(os.environ.get("QUANTMILL_HOME") or Path.home() / ".quantmill").expanduser()
