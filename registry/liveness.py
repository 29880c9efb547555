"""Is a run's process still alive? The facts a heartbeat records and how a reaper reads them.

A process is named by its host, its pid, the host's boot id and the process's start time (in
clock ticks since boot, from ``/proc/<pid>/stat``): a pid alone is reused, a pid with its start
time on the same boot is not. On the run's own host that answers the question for certain and
at once; from another host only the heartbeat's age can, so a run whose heartbeat is older than
the reaper's limit counts as dead.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    pid: int
    boot_id: str  # "" where the platform has none
    process_start: str  # "" where the platform has none


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """The process's start time since boot, or None when no such process exists ("" when
    the platform cannot say)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    # the command name (field 2) may hold spaces and parentheses: fields resume after the last ")"
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19]  # field 22 of the whole line


def this_process() -> ProcessIdentity:
    pid = os.getpid()
    return ProcessIdentity(socket.gethostname(), pid, _boot_id(), _start_ticks(pid) or "")


def gone_reason(identity: ProcessIdentity, beat_at: datetime, now: datetime,
                stale_after: timedelta) -> str | None:
    """Why the process that last beat at ``beat_at`` is dead, or None when it may be alive."""
    age = now - beat_at
    here = this_process()
    if identity.host == here.host and identity.boot_id and identity.boot_id == here.boot_id:
        started = _start_ticks(identity.pid)
        if started is None:
            return f"process {identity.pid} on {identity.host} is gone"
        if identity.process_start and started and started != identity.process_start:
            return f"process {identity.pid} on {identity.host} is gone (its pid was reused)"
        return None  # alive, however old its heartbeat: a busy process is not a dead one
    if identity.host == here.host and identity.boot_id and here.boot_id:
        return f"{identity.host} was restarted since process {identity.pid} last beat"
    if age > stale_after:
        return (f"no heartbeat from process {identity.pid} on {identity.host} for "
                f"{int(age.total_seconds())} s (limit {int(stale_after.total_seconds())} s)")
    return None
