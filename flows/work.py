"""Work areas of resumable quantizations, as the flow uses them: their key, where they live,
and how ``quantmill work list|clean`` finds them.

The key is a fingerprint of everything that decides a block's result: the base model's sha256,
the calibration token ids' sha256, the quantizer (name, plugin version and resolved config),
the plan, quantmill's version, and the arithmetic (torch's version, the device type and torch's
CPU kernel capability: the same inputs on AVX2 and on AVX-512 give different floats). A rerun
with any of them changed finds no area under its key and starts from block 0; the old area
stays until ``quantmill work clean`` (or its own job finishes).

The area lives in the job's storage backend (``StorageBackend.work_area``: a folder beside
local storage, objects under ``<prefix>/work/`` in S3), so a job retried on another machine
resumes there too. It is removed once the job's run is registered.

Fault injection for tests (and for trying resume by hand): ``QUANTMILL_FAILPOINT=
kill-after-block:N`` makes the process SIGKILL itself right after block N is recorded, the
same as a crash at that point.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch

from quantmill.flows.runtime import software_versions
from quantmill.plugins.base import Quantizer, QuantPlan, StorageBackend
from quantmill.plugins.blockwise.resume import INDEX, WorkArea

FAILPOINT = "QUANTMILL_FAILPOINT"


def fingerprint(base_model_sha256: str, calibration_sha256: str | None, quantizer: Quantizer,
                plan: QuantPlan, device: torch.device) -> str:
    """The work-area key of one quantization (see the module docstring)."""
    versions = software_versions()
    document = {
        "base_model": base_model_sha256,
        "calibration": calibration_sha256,
        "quantizer": quantizer.name,
        "quantizer_version": type(quantizer).version(),
        "config": quantizer.config.model_dump(mode="json"),
        "plan": plan.to_json(),
        "quantmill": versions["quantmill"],
        "torch": versions["torch"],
        "device": torch.device(device).type,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


class FlowWorkArea(WorkArea):
    """A work area that also writes who it belongs to into its index, and honours the
    ``QUANTMILL_FAILPOINT`` fault injection."""

    def __init__(self, storage: StorageBackend, key: str, about: dict[str, Any]):
        super().__init__(storage.work_area(key), key)
        self.about = about

    def record(self, index: int, outcome: Any, stream: Any) -> None:
        super().record(index, outcome, stream)
        if os.environ.get(FAILPOINT, "") == f"kill-after-block:{index}":
            os.kill(os.getpid(), signal.SIGKILL)

    def index_extra(self) -> dict[str, Any]:
        return {"about": self.about}


@dataclass(frozen=True)
class WorkAreaSummary:
    key: str
    last_block: int | None  # None: no readable index (an area cut short before its first block)
    about: dict[str, Any]


def summaries(storage: StorageBackend) -> list[WorkAreaSummary]:
    """Every work area in ``storage`` with what its index says."""
    found = []
    for key in storage.work_area_keys():
        raw = storage.work_area(key).read(INDEX)
        try:
            index = json.loads(raw) if raw is not None else {}
        except ValueError:
            index = {}
        last = index.get("last_block")
        found.append(WorkAreaSummary(key, int(last) if last is not None else None,
                                     dict(index.get("about") or {})))
    return found
