"""The ``probe`` flow: a job that computes nothing and reports where it ran.

``quantmill jobs probe --pool P`` sends one through a pool and prints what the worker that took it
sees (host, process, software environment against the submitter's, input roots, heavy-step
limit): a check of the whole path submit -> server -> worker -> flow run before real jobs are
queued. The service benchmark drains a queue of them to measure Prefect's own overhead.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from quantmill.flows.environment import check_skew, current_environment
from quantmill.flows.input_roots import InputRoots
from quantmill.flows.limits import heavy_limit_name

#: the key of the artifact ``quantmill jobs probe`` reads the report from: an artifact is
#: written by a direct API call before the run completes, while a log line is shipped in a
#: background batch that a busy server can miss when the run's process exits
REPORT_KEY = "probe-report"


@flow(name="probe", flow_run_name="probe-{label}", log_prints=True)
def probe(label: str = "probe", environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """Report this worker's view; ``environment`` is the submitter's software record."""
    roots = InputRoots.from_environment()
    report = {
        "host": socket.gethostname(), "pid": os.getpid(),
        "python": platform.python_version(),
        "environment_sha256": current_environment().sha256,
        "environment_skew": check_skew(environment, "the probe's submitter"),
        "input_roots": roots.describe() if roots is not None else "(unbounded)",
        "heavy_limit": heavy_limit_name(),
    }
    text = json.dumps(report, sort_keys=True)
    print(f"probe report: {text}")
    create_markdown_artifact(key=REPORT_KEY, markdown=f"```json\n{text}\n```",
                             description="what the worker that ran this probe sees")
    return report
