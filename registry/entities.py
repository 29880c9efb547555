"""Plain, frozen values that cross the registry's API: what callers get and what they pass in.

Why not ORM rows: a row is tied to a session (lazy loads, expiry, accidental writes); an entity
is just data, safe to cache, compare, log or hand to another thread. ``to_json()`` gives a
JSON-ready ``dict`` (datetimes as ISO 8601 strings) for the CLI and reports.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

#: What a location is to its artifact: where the run ``stored`` it, a ``copy`` made later (a
#: mirror, a cache, another bucket), or the ``published`` copy others should download.
LOCATION_ROLES = ("stored", "copy", "published")
#: Names that say "this is a secret": a location is chained into the append-only ledger, so a
#: secret recorded there could never be removed again. Credentials come from the environment.
_SECRET_NAME_RE = re.compile(
    r"secret|password|passwd|token|credential|signature|private[_-]?key|access[_-]?key|^sig$",
    re.IGNORECASE,
)

Direction = Literal["input", "output"]


def _json_value(value: Any) -> Any:
    """Make one field value JSON-ready (datetimes to ISO strings, containers recursively)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    return value


class _JsonMixin:
    """``to_json()`` for flat dataclasses: every field, JSON-ready."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return {f.name: _json_value(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Artifact(_JsonMixin):
    """A registered, content-addressed artifact (its identity is ``sha256``)."""

    id: int
    kind: str
    name: str
    sha256: str
    size_bytes: int
    uri: str
    format: str
    metadata: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Run(_JsonMixin):
    """One execution with everything needed to audit or repeat it."""

    id: int
    job_id: str
    kind: str
    name: str
    status: str
    recipe: dict[str, Any]
    recipe_sha256: str
    plugins: dict[str, str]
    versions: dict[str, str]
    details: dict[str, Any]
    flow_run_id: str | None
    host: str
    started_by: str
    started_at: datetime
    finished_at: datetime | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ArtifactLocation(_JsonMixin):
    """One place where the bytes of ``artifact_id`` can be read.

    ``details`` holds the non-secret facts a reader needs besides the URI (e.g. the S3
    endpoint and region). The artifact's primary ``uri`` is always a location: when no record
    names it, the store synthesizes one with ``id``, ``created_by`` and ``created_at`` None.
    """

    id: int | None
    artifact_id: int
    uri: str
    role: str
    details: dict[str, Any]
    created_by: str | None
    created_at: datetime | None


@dataclass(frozen=True, slots=True)
class RunEdge(_JsonMixin):
    """``run_id`` consumed (input) or produced (output) ``artifact_id`` in ``role``."""

    run_id: int
    artifact_id: int
    direction: str
    role: str


@dataclass(frozen=True, slots=True)
class MetricRecord(_JsonMixin):
    """A stored measurement of ``artifact_id``, optionally on data set ``dataset_artifact_id``."""

    id: int
    run_id: int
    artifact_id: int
    evaluator: str
    dataset_artifact_id: int | None
    name: str
    value: float
    unit: str | None
    protocol: dict[str, Any]
    protocol_sha256: str
    created_at: datetime
    supersedes_id: int | None = None


@dataclass(frozen=True, slots=True)
class Correction(_JsonMixin):
    """A later statement that a recorded fact of ``target_type`` #``target_id`` was wrong.

    The corrected record is never changed: readers see it and its corrections side by side.
    """

    id: int
    target_type: str
    target_id: int
    changes: dict[str, Any]
    reason: str
    author: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LineageGraph:
    """Artifacts and runs reachable from ``root_id`` in one direction, within ``max_depth`` hops.

    ``depths`` gives each artifact's shortest distance (in runs) from the root. ``edges`` are the
    edges between the graph's runs and artifacts; ``metrics`` are those of the graph's artifacts.
    Collections are ordered by id, so two graphs of the same history compare equal.
    """

    root_id: int
    direction: Literal["upstream", "downstream"]
    max_depth: int
    artifacts: Mapping[int, Artifact]
    depths: Mapping[int, int]
    runs: Mapping[int, Run]
    edges: tuple[RunEdge, ...]
    metrics: tuple[MetricRecord, ...]

    def to_json(self) -> dict[str, Any]:
        """The graph as JSON-ready lists (JSON objects cannot have integer keys)."""
        return {
            "root_id": self.root_id,
            "direction": self.direction,
            "max_depth": self.max_depth,
            "artifacts": [
                {**artifact.to_json(), "depth": self.depths[artifact_id]}
                for artifact_id, artifact in sorted(self.artifacts.items())
            ],
            "runs": [run.to_json() for _, run in sorted(self.runs.items())],
            "edges": [edge.to_json() for edge in self.edges],
            "metrics": [metric.to_json() for metric in self.metrics],
        }


# --- inputs ------------------------------------------------------------------------------------


def check_sha256(value: str) -> str:
    """Return ``value`` lower-cased if it is a full hex sha256, else raise ``ValueError``."""
    lowered = value.lower()
    if not SHA256_RE.match(lowered):
        raise ValueError(f"not a sha256 (64 hex characters): {value!r}")
    return lowered


def _secret_names(value: Any, where: str) -> list[str]:
    """Paths of the keys in a JSON-like document whose names look like secrets."""
    found: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{where}.{key}"
            if _SECRET_NAME_RE.search(str(key)):
                found.append(path)
            found.extend(_secret_names(item, path))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found.extend(_secret_names(item, f"{where}[{index}]"))
    return found


def check_location_uri(uri: str) -> str:
    """Refuse an empty URI, and one that carries credentials (a password in it, or a
    pre-signed query): it would be kept in the ledger for good, and expire anyway."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"a location needs a non-empty uri, not {uri!r}")
    parts = urlsplit(uri)
    secret_params = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)
                     if _SECRET_NAME_RE.search(name)]
    if parts.password is not None or secret_params:
        raise ValueError(
            "a location uri must not carry credentials (a password or a signed query such as "
            f"{', '.join(secret_params) or 'user:password@'}); record the plain object URI"
        )
    return uri


@dataclass(frozen=True, slots=True)
class NewLocation:
    """A place to record for an artifact: ``uri``, its ``role`` (one of ``LOCATION_ROLES``) and
    the non-secret ``details`` a reader needs, e.g. ``{"backend": "s3", "endpoint_url": ...,
    "region": ...}``. Keys that look like secrets are refused (the record is permanent)."""

    uri: str
    role: str = "stored"
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_location_uri(self.uri)
        if self.role not in LOCATION_ROLES:
            raise ValueError(
                f"location role {self.role!r} is not one of {', '.join(LOCATION_ROLES)}"
            )
        if not isinstance(self.details, Mapping):
            raise ValueError(f"location details must be a mapping, not {self.details!r}")
        secrets = _secret_names(self.details, "details")
        if secrets:
            raise ValueError(
                f"location {', '.join(secrets)} look(s) like a secret: details are kept in the "
                "append-only ledger for good, so record credentials nowhere in the registry"
            )
        object.__setattr__(self, "details", dict(self.details))


@dataclass(frozen=True, slots=True)
class NewArtifact:
    """An output artifact to register in ``Registry.finish_run``, with its role in the run.

    ``locations`` are recorded with it, in the same transaction, whether the content is new or
    already registered (a place recorded before for this artifact is skipped).
    """

    kind: str
    name: str
    sha256: str
    size_bytes: int
    uri: str
    format: str
    role: str
    metadata: dict[str, Any] = field(default_factory=dict)
    locations: tuple[NewLocation, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", check_sha256(self.sha256))
        if self.size_bytes < 0:
            raise ValueError(f"size_bytes must be >= 0, got {self.size_bytes}")
        locations = tuple(self.locations)
        for location in locations:
            if not isinstance(location, NewLocation):
                raise TypeError(f"locations must be NewLocation values, not {location!r}")
        object.__setattr__(self, "locations", locations)


@dataclass(frozen=True, slots=True)
class NewMetric:
    """A measurement to record in ``Registry.finish_run``.

    The measured artifact is named by exactly one of ``artifact_sha256`` (e.g. an output created
    in the same call, whose id is not known yet) or ``artifact_id`` (an existing artifact).
    """

    evaluator: str
    name: str
    value: float
    unit: str | None = None
    protocol: dict[str, Any] = field(default_factory=dict)
    artifact_sha256: str | None = None
    artifact_id: int | None = None
    dataset_artifact_id: int | None = None

    def __post_init__(self) -> None:
        if (self.artifact_sha256 is None) == (self.artifact_id is None):
            raise ValueError("a NewMetric needs exactly one of artifact_sha256 or artifact_id")
        if self.artifact_sha256 is not None:
            object.__setattr__(self, "artifact_sha256", check_sha256(self.artifact_sha256))
        value = float(self.value)
        # NaN would become NULL in SQLite and infinities are not JSON: refuse both up front.
        if not math.isfinite(value):
            raise ValueError(f"metric {self.name!r} has a non-finite value: {self.value!r}")
        object.__setattr__(self, "value", value)
