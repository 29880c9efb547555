"""Progress reporting for long plugin work, without tying plugins to a UI.

Plugins wrap long loops in ``progress_bar(description, total)``; whoever drives the job (the CLI's
rich progress display, a log line per step in a worker) installs a ``ProgressSink`` with
``use_sink``. With no sink installed the bars cost nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Protocol


class ProgressSink(Protocol):
    def start(self, description: str, total: int | None) -> object: ...

    def advance(self, handle: object, amount: float) -> None: ...

    def finish(self, handle: object) -> None: ...


_current: contextvars.ContextVar[ProgressSink | None] = contextvars.ContextVar(
    "quantmill_progress_sink", default=None
)
# Orchestrators may run a task in a worker thread that did not inherit the context; the sink
# installed last in this process is the fallback there.
_process_sink: list[ProgressSink] = []
_lock = threading.Lock()


def current_sink() -> ProgressSink | None:
    sink = _current.get()
    if sink is None:
        with _lock:
            sink = _process_sink[-1] if _process_sink else None
    return sink


@contextlib.contextmanager
def use_sink(sink: ProgressSink) -> Iterator[None]:
    """Install ``sink`` for the duration of the block (this context and, as fallback, process)."""
    token = _current.set(sink)
    with _lock:
        _process_sink.append(sink)
    try:
        yield
    finally:
        _current.reset(token)
        with _lock:
            _process_sink.remove(sink)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[float], None]]:
    """Yield an ``advance(n)`` callable that moves the current sink's bar (if any)."""
    sink = current_sink()
    if sink is None:
        yield lambda amount=1: None
        return
    handle = sink.start(description, total)
    try:
        yield lambda amount=1: sink.advance(handle, amount)
    finally:
        sink.finish(handle)
