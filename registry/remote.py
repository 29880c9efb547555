"""Registering a whole run at once, for workers that report over the HTTP API.

Why one call and one transaction: a local flow starts a run, works for minutes, then finishes it
(``Registry.start_run`` / ``finish_run``). A remote worker reports only when it is done, and an
API request can fail half-way: the run's start, inputs, outputs, metrics and end must therefore
be stored together or not at all, so a broken request never leaves a run "running" forever.

The run is described as plain data (``writes.EndedRun``, or the same as a JSON-like ``dict``) and
checked here, before any SQL, against everything the database would otherwise refuse with a
driver error: unknown or missing keys, column lengths (PostgreSQL enforces them, SQLite does
not), NaN and infinities (not JSON), integers too large for their column. Whoever calls this
(the API) names the submitter in ``started_by``; the body cannot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any

from sqlalchemy import Table

from quantmill.registry.convert import run_entity
from quantmill.registry.entities import NewArtifact, NewLocation, NewMetric, Run
from quantmill.registry.errors import RegistryError
from quantmill.registry.models import (
    ArtifactRow,
    MetricRow,
    RunEdgeRow,
    RunRow,
)
from quantmill.registry.store import Registry
from quantmill.registry.writes import ClaimCheck, EndedRun, RunCompletion, RunInput

#: Largest id of an ``Integer`` primary key, and largest ``BigInteger`` (sizes in bytes).
MAX_ID = 2**31 - 1
MAX_SIZE_BYTES = 2**63 - 1
#: Recorded as the run's host when the worker does not say where it ran.
UNKNOWN_HOST = "unknown"

class InvalidRun(RegistryError, ValueError):
    """The run description is malformed: the message names the field and the problem."""


def max_length(table: Table, column: str) -> int:
    """The declared length of a string column (what PostgreSQL enforces)."""
    length = getattr(table.c[column].type, "length", None)
    if length is None:
        raise ValueError(f"{table.name}.{column} has no length limit")
    return int(length)


def _text(where: str, value: Any, table: Table | None, column: str | None,
          optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise InvalidRun(f"{where} must be a string, not {type(value).__name__}")
    if not optional and not value.strip():
        raise InvalidRun(f"{where} must not be empty")
    if "\x00" in value:  # PostgreSQL text cannot hold NUL; refuse it on SQLite alike
        raise InvalidRun(f"{where} contains a NUL character")
    _utf8(where, value)
    if table is not None and column is not None:
        limit = max_length(table, column)
        if len(value) > limit:
            raise InvalidRun(f"{where} has {len(value)} characters; at most {limit} are allowed")


def _utf8(where: str, value: str) -> None:
    """Refuse lone surrogates: they cannot be stored or hashed as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRun(f"{where} is not valid Unicode text (a lone surrogate)") from None


#: Nesting deeper than this is refused (the canonical JSON encoder recurses).
MAX_JSON_DEPTH = 64


def _json(where: str, value: Any, depth: int = 0) -> None:
    """Refuse what the JSON columns and the ledger's canonical JSON cannot hold."""
    if depth > MAX_JSON_DEPTH:
        raise InvalidRun(f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        _utf8(where, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRun(f"{where} is {value!r}: NaN and infinities are not JSON")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRun(f"{where} has a non-string key {key!r}")
            _utf8(f"{where} key", key)
            _json(f"{where}.{key}", item, depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _json(f"{where}[{index}]", item, depth + 1)
    elif not isinstance(value, str | int | float | bool | type(None)):
        raise InvalidRun(f"{where} holds a {type(value).__name__}, which is not JSON")


def _document(where: str, value: Any, values_are_text: bool = False) -> None:
    if not isinstance(value, Mapping):
        raise InvalidRun(f"{where} must be an object, not {type(value).__name__}")
    _json(where, value)
    if values_are_text:
        for key, item in value.items():
            if not isinstance(item, str):
                raise InvalidRun(f"{where}.{key} must be a string")


def _integer(where: str, value: Any, low: int, high: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRun(f"{where} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise InvalidRun(f"{where} is {value}; it must be between {low} and {high}")


def _reference(where: str, value: Any) -> None:
    """An artifact id, or a sha256 (prefix) string: the store explains unknown ones."""
    if isinstance(value, str):
        _text(where, value, None, None)
        if len(value) > 64:
            raise InvalidRun(f"{where} is longer than a sha256 (64 hex characters)")
    else:
        _integer(where, value, 1, MAX_ID)


def ended_run_from_dict(data: Mapping[str, Any] | EndedRun) -> EndedRun:
    """An ``EndedRun`` from plain data, refusing unknown and missing keys (a typo must not
    vanish)."""
    if isinstance(data, EndedRun):
        return data
    values = _fields_of(EndedRun, data, "run")
    values["completion"] = RunCompletion(
        **_fields_of(RunCompletion, values["completion"], "completion"))
    values["inputs"] = tuple(
        RunInput(**_fields_of(RunInput, item, f"inputs[{index}]"))
        for index, item in enumerate(_items(values.get("inputs", ()), "inputs"))
    )
    values["outputs"] = tuple(
        _output(item, f"outputs[{index}]")
        for index, item in enumerate(_items(values.get("outputs", ()), "outputs"))
    )
    values["metrics"] = tuple(
        _build(NewMetric, item, f"metrics[{index}]")
        for index, item in enumerate(_items(values.get("metrics", ()), "metrics"))
    )
    _check_completion(values["completion"], values["outputs"], values["metrics"])
    return EndedRun(**values)


def check_ended_run(run: EndedRun) -> None:
    """Everything the database would refuse, as one clear ``InvalidRun``."""
    runs = RunRow.__table__
    for name in ("job_id", "kind", "name"):
        _text(name, getattr(run, name), runs, name)
    _text("flow_run_id", run.flow_run_id, runs, "flow_run_id", optional=True)
    _text("host", run.host, runs, "host", optional=True)
    _document("recipe", run.recipe)
    _document("plugins", run.plugins, values_are_text=True)
    _document("versions", run.versions, values_are_text=True)
    _document("details", run.details)
    _check_completion(run.completion, run.outputs, run.metrics)
    _document("completion.details", run.completion.details)
    if run.completion.status == "failed":
        _text("completion.error", run.completion.error, None, None)
    for index, item in enumerate(run.inputs):
        _reference(f"inputs[{index}].artifact", item.artifact)
        _text(f"inputs[{index}].role", item.role, RunEdgeRow.__table__, "role")
    for index, output in enumerate(run.outputs):
        _check_output(f"outputs[{index}]", output)
    for index, metric in enumerate(run.metrics):
        _check_metric(f"metrics[{index}]", metric)


def _check_completion(completion: RunCompletion, outputs: Any, metrics: Any) -> None:
    if completion.status not in ("succeeded", "failed"):
        raise InvalidRun(
            f"completion.status is {completion.status!r}; use 'succeeded' or 'failed'"
        )
    if completion.status == "failed":
        if outputs or metrics:
            raise InvalidRun(
                "a failed run records no outputs or metrics (as Registry.fail_run); "
                "report them in a succeeded run"
            )
    elif completion.error is not None:
        raise InvalidRun("completion.error is only for failed runs")


def _items(value: Any, where: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise InvalidRun(f"{where} must be a list, not {type(value).__name__}")
    return value


def _fields_of(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` as keyword arguments of dataclass ``cls``: no unknown key, none missing."""
    if isinstance(data, cls):
        return {f.name: getattr(data, f.name) for f in fields(cls)}
    if not isinstance(data, Mapping):
        raise InvalidRun(f"{where} must be an object, not {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise InvalidRun(f"{where} has unknown field(s): {', '.join(unknown)}")
    required = [
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise InvalidRun(f"{where} lacks required field(s): {', '.join(missing)}")
    return dict(data)


def _build(cls: type, data: Any, where: str) -> Any:
    """An entity from plain data; its own checks (sha256 form, sizes, finite values) become
    ``InvalidRun`` naming where the bad value is."""
    values = _fields_of(cls, data, where)
    try:
        return cls(**values)
    except (TypeError, ValueError, AttributeError) as exc:
        raise InvalidRun(f"{where}: {exc}") from None


def _output(data: Any, where: str) -> NewArtifact:
    """An output from plain data, its ``locations`` (plain data too) built and checked first."""
    values = _fields_of(NewArtifact, data, where)
    if "locations" in values:
        values["locations"] = tuple(
            _build(NewLocation, item, f"{where}.locations[{index}]")
            for index, item in enumerate(_items(values["locations"], f"{where}.locations"))
        )
    return _build(NewArtifact, values, where)


def _check_output(where: str, output: NewArtifact) -> None:
    artifacts = ArtifactRow.__table__
    for name in ("kind", "name", "format"):
        _text(f"{where}.{name}", getattr(output, name), artifacts, name)
    _text(f"{where}.uri", output.uri, None, None)
    _text(f"{where}.role", output.role, RunEdgeRow.__table__, "role")
    _integer(f"{where}.size_bytes", output.size_bytes, 0, MAX_SIZE_BYTES)
    _document(f"{where}.metadata", output.metadata)
    # (NewLocation already refused unknown roles and secret-looking details)
    for index, location in enumerate(output.locations):
        _text(f"{where}.locations[{index}].uri", location.uri, None, None)
        _document(f"{where}.locations[{index}].details", location.details)


def _check_metric(where: str, metric: NewMetric) -> None:
    metrics = MetricRow.__table__
    _text(f"{where}.evaluator", metric.evaluator, metrics, "evaluator")
    _text(f"{where}.name", metric.name, metrics, "name")
    _text(f"{where}.unit", metric.unit, metrics, "unit", optional=True)
    _document(f"{where}.protocol", metric.protocol)
    _integer(f"{where}.artifact_id", metric.artifact_id, 1, MAX_ID, optional=True)
    _integer(f"{where}.dataset_artifact_id", metric.dataset_artifact_id, 1, MAX_ID, optional=True)


def record_run(registry: Registry, run: EndedRun | Mapping[str, Any], started_by: str,
               claims: ClaimCheck | None = None) -> Run:
    """Register a finished run with its inputs, outputs, metrics and end, in ONE transaction.

    Inputs must already be registered (by id or sha256 prefix); outputs are upserted by sha256,
    with their locations recorded as written by ``started_by``, after ``claims`` confirmed
    each; metrics may name an output of this very run by sha256. Any error stores nothing.
    """
    ended = ended_run_from_dict(run)
    check_ended_run(ended)
    _text("started_by", started_by, RunRow.__table__, "started_by")
    with registry.writer(recorded_by=started_by, claims=claims) as write:
        row, done = write.record_ended(ended, started_by, UNKNOWN_HOST)
        return run_entity(row, done)
