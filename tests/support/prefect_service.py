"""A real Prefect server and real quantmill workers, as subprocesses on loopback, for tests.

``PrefectServer(home).start()`` runs ``prefect server start`` on a free port with its own
``PREFECT_HOME`` (SQLite there, or ``database_url``) and waits for ``/api/health``.
``Worker(...)`` runs ``quantmill worker`` (which execs Prefect's process worker) in a process
group of its own; ``stop()`` sends SIGINT (the worker ignores SIGTERM), ``kill()`` is a crash:
SIGKILL to the worker and to every flow-run process it started (those run in sessions of their
own, so killing the worker's group alone would leave them running).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupt(process: subprocess.Popen | None, timeout: float) -> bool:
    """SIGINT the process's group (Prefect's server and workers stop on it) and wait; False if
    it is still running after ``timeout``."""
    if process is None or process.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class PrefectServer:
    def __init__(self, home: Path, database_url: str | None = None) -> None:
        self.home = Path(home)
        self.port = free_port()
        self.database_url = database_url
        self.process: subprocess.Popen | None = None
        self.log_path = self.home / "server.log"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        """What a client of this server needs (a submitting test, a worker)."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def start(self, timeout: float = 120.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_HOME": str(self.home),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
               "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
               # schedules become runs within seconds, not the default minute
               "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
        env.pop("PREFECT_API_URL", None)
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
             str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server not healthy after {timeout} s")

    def stop(self) -> None:
        if not interrupt(self.process, 20):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Worker:
    """``quantmill worker --pool POOL`` as a real process."""

    def __init__(self, log_path: Path, pool: str, env: dict[str, str],
                 args: tuple[str, ...] = ()) -> None:
        self.log_path, self.pool, self.env, self.args = Path(log_path), pool, env, args
        self.process: subprocess.Popen | None = None

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(BIN / "quantmill"), "worker", "--pool", self.pool, *self.args],
            env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **self.env},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_started(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "started!" in self.log() or "Worker" in self.log() and "started" in self.log():
                return
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log()[-3000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"worker did not start: {self.log()[-3000:]}")

    def kill(self) -> None:
        """A crash: SIGKILL the worker and every flow-run process below it."""
        if self.process is None:
            return
        victims = [self.process.pid, *descendants(self.process.pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if not interrupt(self.process, 30):
            self.kill()
