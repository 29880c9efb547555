"""``verify``: recompute the ledger's hash chain, compare every record with its chained copy,
and (optionally) re-hash the stored content at every location, reporting exactly what differs.

Why compare against the copy and not just the hash: an auditor needs "metrics #12: value was
31.2, is now 29.0", not "something in metrics #12 changed". The copy is itself protected by the
chain, so it cannot be edited to match without breaking every later link (and the head hash,
which ``expected_head`` checks against a value written down elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from quantmill.registry.chain import GENESIS, entry_hash, payload_text, row_payload, sha256_text
from quantmill.registry.convert import artifact_locations
from quantmill.registry.entities import ArtifactLocation
from quantmill.registry.models import (
    CHAINED_TABLES,
    ArtifactLocationRow,
    ArtifactRow,
    LedgerRow,
    MetricRow,
    RunCompletionRow,
    RunEdgeRow,
    RunRow,
)

#: Links read per query: memory stays flat on a registry of any size.
BATCH = 2000
#: Artifacts per query when re-hashing (their ids go into an ``IN (...)`` for the locations).
FILE_BATCH = 500

#: ``rehash(location) -> (sha256, size)`` of the content stored at ``location.uri``; raises
#: ``FileNotFoundError`` when the content is gone. Supplied by the caller (storage knows how to
#: read a URI, and may use the location's ``details``, e.g. an S3 endpoint; the registry does
#: not).
Rehash = Callable[[ArtifactLocation], tuple[str, int]]


@dataclass(frozen=True, slots=True)
class Problem:
    """One difference: where (``record``, e.g. ``metrics #12`` or ``ledger #40``) and what."""

    kind: str
    record: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "record": self.record, "detail": self.detail}


@dataclass(slots=True)
class VerifyReport:
    """The outcome: ``ok`` when nothing differs; ``head_hash`` to write down for next time."""

    entries: int = 0
    head_hash: str = GENESIS
    files_checked: int = 0
    #: how many runs are running, succeeded, failed, abandoned
    runs: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head_hash": self.head_hash,
            "files_checked": self.files_checked,
            "runs": dict(self.runs),
            "problems": [problem.to_json() for problem in self.problems],
        }


def _links(session: Session) -> Iterator[LedgerRow]:
    last = 0
    while True:
        batch = session.scalars(
            select(LedgerRow).where(LedgerRow.seq > last).order_by(LedgerRow.seq).limit(BATCH)
        ).all()
        if not batch:
            return
        yield from batch
        last = batch[-1].seq
        session.expunge_all()


def _field_diff(chained: dict[str, Any], current: dict[str, Any]) -> str:
    changed = sorted(set(chained) | set(current))
    parts = [
        f"{name}: chained {chained.get(name)!r}, now {current.get(name)!r}"
        for name in changed
        if payload_text({"v": chained.get(name)}) != payload_text({"v": current.get(name)})
    ]
    return "; ".join(parts) or "content differs (same fields)"


def verify_chain(session: Session, report: VerifyReport) -> None:
    """Walk the ledger in order: links, hashes, and each record against its copy."""
    expected_seq, prev = 1, GENESIS
    chained_ids: dict[str, set[int]] = {name: set() for name in CHAINED_TABLES}
    tables = {name: model.__table__ for name, model in CHAINED_TABLES.items()}
    for link in _links(session):
        where = f"ledger #{link.seq}"
        report.entries += 1
        if link.seq != expected_seq:
            report.problems.append(Problem(
                "chain", where, f"links {expected_seq}..{link.seq - 1} are missing"))
        if link.prev_hash != prev:
            report.problems.append(Problem(
                "chain", where, f"prev_hash {link.prev_hash[:16]}... does not match the previous "
                f"link's entry_hash {prev[:16]}..."))
        if sha256_text(link.payload) != link.record_sha256:
            report.problems.append(Problem(
                "chain", where, "the chained copy of the record does not match its sha256"))
        recomputed = entry_hash(link.prev_hash, link.seq, link.record_type, link.record_id,
                                link.record_sha256)
        if recomputed != link.entry_hash:
            report.problems.append(Problem("chain", where, "entry_hash does not recompute"))
        prev, expected_seq = link.entry_hash, link.seq + 1
        table = tables.get(link.record_type)
        if table is None:
            report.problems.append(Problem(
                "chain", where, f"unknown record type {link.record_type!r}"))
            continue
        chained_ids[link.record_type].add(link.record_id)
        record = f"{link.record_type} #{link.record_id}"
        row = session.execute(select(table).where(table.c.id == link.record_id)).first()
        if row is None:
            report.problems.append(Problem("deleted", record, f"chained at {where}, now gone"))
            continue
        current = row_payload(table, row)
        # compared as canonical text: as dicts, 4 == 4.0 == True would hide a changed type
        if payload_text(current) != link.payload:
            chained = json.loads(link.payload)
            report.problems.append(Problem("changed", record, _field_diff(chained, current)))
    report.head_hash = prev
    for name, table in tables.items():
        ids = session.scalars(select(table.c.id).order_by(table.c.id))
        for record_id in ids:
            if record_id not in chained_ids[name]:
                report.problems.append(Problem(
                    "unchained", f"{name} #{record_id}",
                    "not in the ledger: written around quantmill's registry"))


def verify_runs(session: Session, report: VerifyReport) -> None:
    """Count runs by status, and check that no abandoned run has outputs or metrics (its
    process died: nothing it claims after that can be trusted, so nothing may be recorded)."""
    counts = session.execute(
        select(RunCompletionRow.status, func.count(RunRow.id)).select_from(RunRow)
        .outerjoin(RunCompletionRow, RunCompletionRow.run_id == RunRow.id)
        .group_by(RunCompletionRow.status)).all()
    report.runs = {status or "running": int(count) for status, count in counts}
    abandoned = select(RunCompletionRow.run_id).where(RunCompletionRow.status == "abandoned")
    for table, what in ((RunEdgeRow, "output edge"), (MetricRow, "metric")):
        query = select(table.run_id, func.count()).where(table.run_id.in_(abandoned))
        if table is RunEdgeRow:
            query = query.where(RunEdgeRow.direction == "output")
        for run_id, count in session.execute(query.group_by(table.run_id)):
            report.problems.append(Problem(
                "abandoned", f"runs #{run_id}",
                f"abandoned, yet it has {count} {what}(s): an abandoned run gains nothing"))


def _artifact_batches(session: Session) -> Iterator[list[Any]]:
    """``(id, name, sha256, size_bytes, uri)`` of every artifact, by id, ``FILE_BATCH`` at a
    time (plain rows: nothing accumulates in the session however large the registry)."""
    artifacts = ArtifactRow.__table__
    columns = (artifacts.c.id, artifacts.c.name, artifacts.c.sha256, artifacts.c.size_bytes,
               artifacts.c.uri)
    last = 0
    while True:
        batch = session.execute(select(*columns).where(artifacts.c.id > last)
                                .order_by(artifacts.c.id).limit(FILE_BATCH)).all()
        if not batch:
            return
        yield batch
        last = batch[-1].id


def _locations_by_artifact(
    session: Session, artifact_ids: list[int]
) -> dict[int, list[ArtifactLocationRow]]:
    """The location records of these artifacts, in one query."""
    found: dict[int, list[ArtifactLocationRow]] = {}
    rows = session.scalars(select(ArtifactLocationRow)
                           .where(ArtifactLocationRow.artifact_id.in_(artifact_ids)))
    for row in rows:
        found.setdefault(row.artifact_id, []).append(row)
    return found


def _check_location(rehash: Rehash, artifact: Any, location: ArtifactLocation,
                    report: VerifyReport) -> None:
    """Re-hash one location of ``artifact`` and report what differs."""
    record = f"artifacts #{artifact.id} ({artifact.name})"
    try:
        sha, size = rehash(location)
    except FileNotFoundError as exc:
        # a tree's location can be intact while one of its objects is gone: name that object
        text = str(exc)
        detail = text if "://" in text and location.uri not in text else ""
        report.problems.append(Problem("file", record, f"stored content missing: {location.uri}"
                                       + (f" ({detail})" if detail else "")))
        return
    except Exception as exc:  # noqa: BLE001 - any storage failure is a finding, not a crash
        report.problems.append(Problem("file", record, f"cannot read {location.uri}: {exc}"))
        return
    report.files_checked += 1
    if sha != artifact.sha256 or size != artifact.size_bytes:
        report.problems.append(Problem(
            "file", record, f"content differs: registered sha256 {artifact.sha256[:16]}... "
            f"{artifact.size_bytes} bytes, stored {sha[:16]}... {size} bytes at {location.uri}"))


def verify_files(session: Session, rehash: Rehash, report: VerifyReport) -> None:
    """Re-hash the content at every location of every artifact (its primary ``uri`` and each
    recorded copy) and compare with the registered sha256/size; each re-hash counts in
    ``files_checked``. Two queries per ``FILE_BATCH`` artifacts, not one per artifact."""
    for artifacts in _artifact_batches(session):
        recorded = _locations_by_artifact(session, [artifact.id for artifact in artifacts])
        for artifact in artifacts:
            for location in artifact_locations(artifact.id, artifact.uri,
                                               recorded.get(artifact.id, [])):
                _check_location(rehash, artifact, location, report)
        session.expunge_all()


def verify(
    session: Session, rehash: Rehash | None = None, expected_head: str | None = None
) -> VerifyReport:
    """The full check; ``expected_head``: a head hash written down earlier, which must still be
    in the chain (a chain rewritten from before that point would no longer contain it)."""
    report = VerifyReport()
    verify_chain(session, report)
    verify_runs(session, report)
    if expected_head is not None:
        found = session.scalars(
            select(LedgerRow.seq).where(LedgerRow.entry_hash == expected_head.lower())
        ).first()
        if found is None:
            report.problems.append(Problem(
                "anchor", "ledger", f"the expected head {expected_head} is not in the chain: "
                "the ledger was rewritten or belongs to another registry"))
    if rehash is not None:
        verify_files(session, rehash, report)
    return report
