"""Prefect settings for quantmill's embedded default (no server) and versions for provenance."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

from quantmill.plugins.home import quantmill_home

EMBEDDED_DEFAULTS = {
    # The temporary server's migrations take ~15 s on a busy 2-core machine; 20 s is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Offline machines otherwise log telemetry errors on every start.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def configure_prefect_environment() -> None:
    """Set defaults for Prefect's environment variables; never override the user's values."""
    os.environ.setdefault("PREFECT_HOME", str(quantmill_home() / "prefect"))
    for key, value in EMBEDDED_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def software_versions() -> dict[str, str]:
    """The versions that decide what a run computed, recorded with every run."""
    return {
        "quantmill": _version("quantmill"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "prefect": _version("prefect"),
        "python": platform.python_version(),
    }
