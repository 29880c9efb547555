"""What the compress flow's steps return to each other: frozen records of stored artifacts
(ids, URIs, hashes) and JSON-ready facts, never tensors or paths in a local scratch directory,
so consecutive steps may run in different processes or on different machines."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (numbers, strings, lists, dicts)."""
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class Inputs:
    """The registered inputs: the base model and every data file the job reads (by the path
    the recipe resolved to)."""

    base_model_id: int
    base_model_sha256: str
    datasets: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """The registered calibration set, and the hash of its token ids (what a quantization's
    fingerprint depends on; the file's hash also covers its metadata)."""

    artifact_id: int
    token_ids_sha256: str


@dataclass(frozen=True)
class PlanResult:
    """The allocator's plan in its JSON form (module -> spec), how it was reached, its cost."""

    modules: Mapping[str, Any]
    details: Mapping[str, Any]
    seconds: float


@dataclass(frozen=True)
class StoredCheckpoint:
    """An exported checkpoint in the job's storage, confirmed there, not yet registered."""

    uri: str
    sha256: str
    size_bytes: int
    details: Mapping[str, Any]
    transfer: Mapping[str, Any]


@dataclass(frozen=True)
class QuantizeResult:
    """A quantized, exported and stored checkpoint and how it was made.

    ``reused`` is True when the checkpoint was found in the work area of an interrupted run of
    the same job (nothing was quantized); ``resumed_at_block`` says where block-wise work
    continued (0: from the start)."""

    checkpoint: StoredCheckpoint
    quantize_seconds: float
    details: Mapping[str, Any]
    export: Mapping[str, Any]
    work_key: str
    resumed_at_block: int = 0
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QuantizeResult:
        values = dict(data)
        values["checkpoint"] = StoredCheckpoint(**values["checkpoint"])
        return cls(**values)


@dataclass(frozen=True)
class Evaluation:
    """One evaluator's measurement of one model (``target``: ``base`` or ``quantized``).

    ``reused_from_run`` names the registered run whose identical measurement was returned
    instead of measuring again; ``recorded_by_run`` the run that recorded this measurement
    (None until it is recorded)."""

    evaluator: str
    target: str
    metrics: Mapping[str, float]
    units: Mapping[str, str]
    protocol: Mapping[str, Any]
    dataset: str | None = None
    reused_from_run: int | None = None
    recorded_by_run: int | None = None

    def to_json(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Evaluation:
        return cls(**dict(data))


@dataclass(frozen=True)
class Published:
    """Where ``export.publish`` wrote the plain copy, and the details to read it there."""

    uri: str
    details: Mapping[str, Any]
