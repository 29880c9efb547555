"""Plugin progress bars as a flow run's logs and progress artifacts (what the Prefect UI shows).

A job run by a worker has no terminal: the CLI's rich bars would go nowhere. Inside a flow run
without another sink, each ``progress_bar`` becomes a Prefect progress artifact (a bar on the
flow run's page) and log lines at every tenth of the way or every ``LOG_EVERY_S`` seconds,
whichever comes later, so a long quantization shows where it is without flooding the log.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

LOG_EVERY_S = 15.0
_KEY = re.compile(r"[^a-z0-9-]+")


@dataclass
class _Bar:
    description: str
    total: int | None
    artifact_id: Any
    started: float = field(default_factory=time.monotonic)
    done: float = 0.0
    logged_at: float = field(default_factory=time.monotonic)
    logged_fraction: float = 0.0


class PrefectProgressSink:
    """A ``ProgressSink`` that reports to the current flow run (thread-safe)."""

    def __init__(self, logger: logging.LoggerAdapter | logging.Logger | None = None) -> None:
        self.log = logger or get_run_logger()
        self._lock = threading.Lock()

    def start(self, description: str, total: int | None) -> object:
        artifact_id = None
        if total:
            artifact_id = create_progress_artifact(
                progress=0.0, key=_KEY.sub("-", description.lower()).strip("-")[:100] or None,
                description=description)
        self.log.info("%s: started%s", description, f" (0/{total})" if total else "")
        return _Bar(description, total, artifact_id)

    def advance(self, handle: object, amount: float) -> None:
        assert isinstance(handle, _Bar)
        with self._lock:
            handle.done += amount
            if not handle.total:
                return
            fraction = min(1.0, handle.done / handle.total)
            now = time.monotonic()
            if fraction - handle.logged_fraction < 0.1 or now - handle.logged_at < LOG_EVERY_S:
                return
            handle.logged_fraction, handle.logged_at = fraction, now
        self._report(handle, fraction)

    def finish(self, handle: object) -> None:
        assert isinstance(handle, _Bar)
        if handle.artifact_id is not None:
            update_progress_artifact(handle.artifact_id, progress=100.0)
        self.log.info("%s: done%s in %.1f s", handle.description,
                      f" ({handle.total}/{handle.total})" if handle.total else "",
                      time.monotonic() - handle.started)

    def _report(self, bar: _Bar, fraction: float) -> None:
        if bar.artifact_id is not None:
            update_progress_artifact(bar.artifact_id, progress=round(100 * fraction, 1))
        self.log.info("%s: %.0f%% (%g/%d) after %.0f s", bar.description, 100 * fraction,
                      bar.done, bar.total, time.monotonic() - bar.started)
