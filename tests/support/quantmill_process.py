"""``quantmill run`` as a real process, for tests that kill it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


def run_quantmill(recipe: Path, home: Path, failpoint: str | None = None,
                  timeout: float = 1200) -> subprocess.CompletedProcess:
    """``quantmill run RECIPE`` with ``QUANTMILL_HOME=home`` (and ``QUANTMILL_FAILPOINT``).

    Output goes to files beside ``home`` and the child gets a process group of its own: a
    killed run cannot stop the Prefect server it started, which would hold pipes open and
    outlive the test, so the whole group is killed once the run has ended."""
    env = {**os.environ, "QUANTMILL_HOME": str(home), "COLUMNS": "200"}
    env.pop("QUANTMILL_DATABASE_URL", None)
    env.pop("QUANTMILL_FAILPOINT", None)
    if failpoint:
        env["QUANTMILL_FAILPOINT"] = failpoint
    home.parent.mkdir(parents=True, exist_ok=True)
    out, err = home.parent / f"{home.name}.out", home.parent / f"{home.name}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "quantmill.flows.cli", "run",
                                  str(recipe)], env=env, stdout=stdout, stderr=stderr,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(child.args, code, out.read_text(), err.read_text())
