"""Finding an artifact's row by what a person types: its id, or its sha256 or a prefix."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from quantmill.registry.errors import AmbiguousReference, ArtifactNotFound
from quantmill.registry.models import ArtifactRow

#: The shortest sha256 prefix accepted as an artifact reference (shorter ones collide too often).
MIN_PREFIX = 6
HEX_RE = re.compile(r"^[0-9a-f]+$")


def find_artifact_row(session: Session, ref: int | str) -> ArtifactRow:
    """The artifact with id ``ref`` (int), or whose sha256 is or starts with ``ref`` (str, at
    least ``MIN_PREFIX`` hex characters)."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        row = session.get(ArtifactRow, ref)
        if row is None:
            raise ArtifactNotFound(f"no artifact with id {ref}")
        return row
    if not isinstance(ref, str):
        raise TypeError(f"an artifact reference is an int id or a sha256 str, not {ref!r}")
    prefix = ref.strip().lower()
    if len(prefix) < MIN_PREFIX or len(prefix) > 64 or not HEX_RE.match(prefix):
        raise ArtifactNotFound(
            f"no artifact matches {ref!r}: a reference is an id or a sha256 prefix of "
            f"{MIN_PREFIX} to 64 hex characters"
        )
    # The prefix is plain hex, so it cannot contain LIKE wildcards.
    rows = session.scalars(
        select(ArtifactRow).where(ArtifactRow.sha256.like(f"{prefix}%")).limit(2)
    ).all()
    if not rows:
        raise ArtifactNotFound(f"no artifact with a sha256 starting with {ref!r}")
    if len(rows) > 1:
        raise AmbiguousReference(
            f"more than one artifact has a sha256 starting with {ref!r}; give more characters"
        )
    return rows[0]
