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

Besides the pipeline's finished blocks the area holds the flow's own record (``flow.json``):
the checkpoint once it is exported and stored, and each measurement of it, so a job that dies
after exporting (while evaluating, publishing or registering) neither quantizes nor measures
again. A record is only trusted after the stored checkpoint it names is fetched intact.

Fault injection for tests (and for trying resume by hand): ``QUANTMILL_FAILPOINT=
kill-after-block:N`` makes the process SIGKILL itself right after block N is recorded, the
same as a crash at that point; ``hang-after-block:N`` makes it stop there until it is killed
from outside (a machine lost mid-job).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch

from quantmill.flows.environment import software_versions
from quantmill.flows.results import Evaluation, QuantizeResult
from quantmill.plugins.base import Quantizer, QuantPlan, StorageBackend
from quantmill.plugins.blockwise.resume import INDEX, WorkArea

FAILPOINT = "QUANTMILL_FAILPOINT"
#: the flow's record in a work area (the pipeline's objects are block-*, stream-*, index.json)
FLOW_RECORD = "flow.json"


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
        failpoint(f"kill-after-block:{index}")

    def index_extra(self) -> dict[str, Any]:
        return {"about": self.about}

    def _flow_record(self) -> dict[str, Any]:
        raw = self.store.read(FLOW_RECORD)
        try:
            record = json.loads(raw) if raw is not None else {}
        except ValueError:
            return {}
        return record if isinstance(record, dict) and record.get("key") == self.key else {}

    def _write_flow_record(self, record: dict[str, Any]) -> None:
        record = {**record, "key": self.key, "about": self.about}
        self.store.write(FLOW_RECORD, json.dumps(record, sort_keys=True).encode())

    def recorded_checkpoint(self) -> QuantizeResult | None:
        """The stored checkpoint an interrupted run of this quantization left, as recorded
        (the caller checks that storage still holds it intact)."""
        data = self._flow_record().get("checkpoint")
        try:
            return QuantizeResult.from_json(data) if data else None
        except (TypeError, KeyError):
            return None

    def record_checkpoint(self, result: QuantizeResult) -> None:
        """The checkpoint is exported and stored; measurements of an older one are dropped."""
        self._write_flow_record({"checkpoint": result.to_json(), "evaluations": []})
        failpoint("kill-after-export")

    def recorded_evaluations(self) -> list[Evaluation]:
        """Measurements of the recorded checkpoint, in the order they were made."""
        found = []
        for item in self._flow_record().get("evaluations") or []:
            try:
                found.append(Evaluation.from_json(item))
            except TypeError:
                return []
        return found

    def record_evaluation(self, evaluation: Evaluation) -> None:
        record = self._flow_record()
        record["evaluations"] = [*record.get("evaluations", []), evaluation.to_json()]
        self._write_flow_record(record)
        failpoint(f"kill-after-evaluation:{evaluation.evaluator}")


def failpoint(name: str) -> None:
    """SIGKILL this process when ``QUANTMILL_FAILPOINT`` names this point (fault injection);
    ``hang-...`` instead of ``kill-...`` makes it stop there and wait to be killed from outside
    (a machine that dies mid-job, for the worker tests)."""
    value = os.environ.get(FAILPOINT, "")
    if value == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if value.startswith("hang-") and value.removeprefix("hang-") == name.removeprefix("kill-"):
        while True:
            time.sleep(3600)


@dataclass(frozen=True)
class WorkAreaSummary:
    key: str
    last_block: int | None  # None: no readable index (no block-wise work, or none finished)
    about: dict[str, Any]
    checkpoint_sha256: str | None = None  # an exported checkpoint waiting for registration


def summaries(storage: StorageBackend) -> list[WorkAreaSummary]:
    """Every work area in ``storage`` with what its index says."""
    found = []
    for key in storage.work_area_keys():
        raw = storage.work_area(key).read(INDEX)
        try:
            index = json.loads(raw) if raw is not None else {}
        except ValueError:
            index = {}
        flow = FlowWorkArea(storage, key, {})._flow_record()
        checkpoint = (flow.get("checkpoint") or {}).get("checkpoint") or {}
        last = index.get("last_block")
        found.append(WorkAreaSummary(key, int(last) if last is not None else None,
                                     dict(index.get("about") or flow.get("about") or {}),
                                     checkpoint.get("sha256")))
    return found
