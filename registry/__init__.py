"""quantmill's registry: artifacts, runs, lineage and metrics in SQLite or PostgreSQL.

Callers use ``Registry.open(url)`` and get frozen entities back. The registry never imports
the plugins or the flows (it sits below both), nor prefect.
"""

from quantmill.registry.db import resolve_database_url
from quantmill.registry.entities import (
    Artifact,
    ArtifactLocation,
    LineageGraph,
    MetricRecord,
    NewArtifact,
    NewLocation,
    NewMetric,
    Run,
    RunEdge,
)
from quantmill.registry.errors import (
    AmbiguousReference,
    ArtifactConflict,
    ArtifactNotFound,
    InvalidClaim,
    InvalidQuery,
    RegistryError,
    RegistryUnavailable,
    RunNotFound,
    RunStateError,
    SchemaMismatch,
    SchemaOutdated,
    SchemaTooNew,
)
from quantmill.registry.migrate import (
    current_revision,
    downgrade,
    head_revision,
    is_up_to_date,
    upgrade,
)
from quantmill.registry.store import Registry, upgrade_command

__all__ = [
    "AmbiguousReference",
    "Artifact",
    "ArtifactConflict",
    "ArtifactLocation",
    "ArtifactNotFound",
    "InvalidClaim",
    "InvalidQuery",
    "LineageGraph",
    "MetricRecord",
    "NewArtifact",
    "NewLocation",
    "NewMetric",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "Run",
    "RunEdge",
    "RunNotFound",
    "RunStateError",
    "SchemaMismatch",
    "SchemaOutdated",
    "SchemaTooNew",
    "current_revision",
    "downgrade",
    "head_revision",
    "is_up_to_date",
    "resolve_database_url",
    "upgrade",
    "upgrade_command",
]
