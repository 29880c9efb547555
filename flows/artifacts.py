"""Artifacts wherever they are stored: pick a backend for a location, read an artifact from
its first reachable and intact location, copy it to another store, re-hash it for ``verify``.

The registry records *where* (append-only locations, each with the non-secret details a reader
needs, such as an S3 endpoint); storage backends know *how*. This module joins the two, so
neither the registry nor storage imports the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantmill.plugins.base import StorageBackend, StoredObject
from quantmill.plugins.catalog import Catalog
from quantmill.plugins.errors import ConfigError, QuantmillError
from quantmill.plugins.manager import get_plugin_manager
from quantmill.registry import Artifact, ArtifactLocation, Registry

log = logging.getLogger(__name__)


class NoIntactLocation(QuantmillError):
    """None of an artifact's recorded locations could be read with the right content."""


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


class Backends:
    """Storage backends by URI scheme, each built for the location it is asked to read."""

    def __init__(self, catalog: Catalog | None = None, like: StorageBackend | None = None):
        self._catalog = catalog
        self.like = like

    def _classes(self) -> dict[str, type[StorageBackend]]:
        catalog = self._catalog or Catalog(get_plugin_manager())
        self._catalog = catalog
        found: dict[str, type[StorageBackend]] = {}
        for cls in catalog.storage_backends.classes():
            found.setdefault(cls.scheme, cls)
        return found

    def class_for(self, uri: str) -> type[StorageBackend]:
        """The installed backend class for the URI's scheme."""
        scheme = scheme_of(uri)
        classes = self._classes()
        if scheme not in classes:
            raise ConfigError(f"no installed storage backend handles {scheme}:// URIs ({uri})")
        return classes[scheme]

    def for_location(self, uri: str, details: dict[str, Any] | None = None) -> StorageBackend:
        return self.class_for(uri).for_location(uri, dict(details or {}), like=self.like)

    def for_destination(self, uri: str, **options: Any) -> StorageBackend:
        """A backend that stores into ``uri`` (``s3://bucket/prefix`` or a local root)."""
        cls = self.class_for(uri)
        base = self.like.config.model_dump(exclude_none=True) \
            if isinstance(self.like, cls) else {}
        merged = {**base, **cls.options_from_url(uri),
                  **{k: v for k, v in options.items() if v is not None}}
        return cls(cls.Config.model_validate(merged))


def as_uri(destination: str) -> str:
    """A destination given as a path becomes a file:// URI."""
    return destination if "://" in destination else Path(destination).expanduser().resolve()\
        .as_uri()


@dataclass(frozen=True)
class Fetched:
    """An artifact's content on this machine, the location it came from, and why the
    locations tried before it could not serve it."""

    path: Path
    location: ArtifactLocation
    skipped: tuple[str, ...] = ()


def fetch_artifact(reg: Registry, artifact: Artifact, backends: Backends) -> Fetched:
    """The artifact's content from the first location that can be reached and still holds
    the registered content; the problems of the others are logged and returned."""
    problems: list[str] = []
    for location in reg.locations(artifact.id):
        try:
            path = backends.for_location(location.uri, location.details).fetch(location.uri)
        except (QuantmillError, OSError) as exc:
            problems.append(f"{location.uri}: {exc}")
            log.warning("artifact %s: location %s unusable: %s", artifact.id, location.uri, exc)
            continue
        if path.name != artifact.sha256 and not _same_content(path, artifact):
            problems.append(f"{location.uri}: content differs from the registered sha256")
            continue
        return Fetched(path, location, tuple(problems))
    raise NoIntactLocation(f"artifact {artifact.id} ({artifact.name}) has no reachable, intact "
                           f"location: {'; '.join(problems) or 'none recorded'}")


def _same_content(path: Path, artifact: Artifact) -> bool:
    from quantmill.plugins.hashing import sha256_path

    return sha256_path(path)[0] == artifact.sha256


def copy_artifact(reg: Registry, ref: int | str, destination: str, backends: Backends,
                  **options: Any) -> tuple[ArtifactLocation, StoredObject]:
    """Store the artifact into ``destination`` too, check the copy, record the location."""
    artifact = reg.get_artifact(ref)
    source = fetch_artifact(reg, artifact, backends).path
    target = backends.for_destination(as_uri(destination), **options)
    stored = target.put_tree(source)
    if stored.sha256 != artifact.sha256 or stored.size_bytes != artifact.size_bytes:
        raise QuantmillError(f"the copy of artifact {artifact.id} at {stored.uri} has sha256 "
                             f"{stored.sha256[:16]}..., not the registered "
                             f"{artifact.sha256[:16]}...; nothing was recorded")
    location = reg.add_location(artifact.id, stored.uri, role="copy",
                                details=target.location_details())
    return location, stored


class Rehasher:
    """``rehash(location) -> (sha256, size)`` for ``Registry.verify``: each location read where
    it is stored (an S3 object from the bucket, never a cached copy). Missing content raises
    ``FileNotFoundError``, which verify reports as missing rather than unreadable."""

    def __init__(self, backends: Backends | None = None) -> None:
        self.backends = backends or Backends()

    def __call__(self, location: ArtifactLocation) -> tuple[str, int]:
        if "://" not in location.uri:
            raise OSError(f"not a URI: {location.uri}")
        backend = self.backends.for_location(location.uri, location.details)
        return backend.rehash(location.uri)
