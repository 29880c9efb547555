"""A background heartbeat for the runs this process has open, so that ``Registry.reap`` on
another machine can tell a slow job from a dead one."""

from __future__ import annotations

import logging
import os
import threading
from types import TracebackType

from quantmill.registry import Registry

log = logging.getLogger(__name__)
#: seconds between beats; ``Registry.reap``'s default limit is twenty of them
INTERVAL_ENV = "QUANTMILL_HEARTBEAT_SECONDS"
DEFAULT_INTERVAL = 30.0


class Heartbeat:
    """``with Heartbeat(registry):`` beats every interval until the block ends. A failed beat
    (the registry briefly unreachable) is logged and retried at the next one."""

    def __init__(self, registry: Registry, interval: float | None = None) -> None:
        self.registry = registry
        self.interval = interval or float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quantmill-heartbeat",
                                        daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.registry.beat()
            except Exception as exc:  # noqa: BLE001 - any failure: log it, beat again later
                log.warning("heartbeat not recorded: %s", exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
