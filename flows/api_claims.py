"""What a writer token may register: outputs whose content a configured storage holds.

The registry records claims; it cannot read storage. Over the HTTP API a writer is a remote
party, so every output it registers (its URI and each of its locations) must name an object in
the layout of a storage backend this service was started with, and that object must re-hash to
the claimed sha256 and size. Anything else (a URI outside the storage, ``file:///etc/shadow``,
``http://...``, a real checkpoint's URI with another sha256, content never stored) is refused
with one line and nothing is written.
"""

from __future__ import annotations

from quantmill.plugins.base import StorageBackend
from quantmill.plugins.errors import QuantmillError
from quantmill.registry import InvalidClaim, NewArtifact


class StorageClaims:
    """The ``ClaimCheck`` the API passes to ``remote.record_run``."""

    def __init__(self, storages: list[StorageBackend]) -> None:
        self.storages = storages

    def describe(self) -> str:
        return ", ".join(f"{type(s).name} {getattr(s, 'root', '') or s.location_details()}"
                         for s in self.storages) or "none"

    def __call__(self, output: NewArtifact) -> None:
        for uri in dict.fromkeys([output.uri, *(location.uri for location in output.locations)]):
            backend = next((s for s in self.storages if s.holds(uri)), None)
            if backend is None:
                raise InvalidClaim(f"output {output.name!r}: {uri[:200]!r} is not an object of "
                                   f"a storage this service accepts ({self.describe()})")
            try:
                sha256, size = backend.rehash(uri)
            except (QuantmillError, OSError) as exc:
                raise InvalidClaim(f"output {output.name!r}: nothing readable is stored at "
                                   f"{uri} ({exc})") from None
            if (sha256, size) != (output.sha256, output.size_bytes):
                raise InvalidClaim(
                    f"output {output.name!r}: {uri} holds sha256 {sha256[:16]}... ({size} "
                    f"bytes), not the claimed {output.sha256[:16]}... ({output.size_bytes} "
                    "bytes)")
