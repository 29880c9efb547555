"""``verify``: recompute the ledger's hash chain, compare every record with its chained copy,
and (optionally) re-hash the stored files, reporting exactly what differs.

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

from sqlalchemy import select
from sqlalchemy.orm import Session

from quantmill.registry.chain import GENESIS, entry_hash, payload_text, row_payload, sha256_text
from quantmill.registry.models import CHAINED_TABLES, ArtifactRow, LedgerRow

#: Links read per query: memory stays flat on a registry of any size.
BATCH = 2000

#: ``rehash(uri) -> (sha256, size)`` of the stored content; raises ``FileNotFoundError`` when
#: the content is gone. Supplied by the caller (storage knows how to read a URI; the registry
#: does not).
Rehash = Callable[[str], tuple[str, int]]


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


def verify_files(session: Session, rehash: Rehash, report: VerifyReport) -> None:
    """Re-hash every artifact's stored content and compare with the registered sha256/size."""
    for artifact in session.scalars(select(ArtifactRow).order_by(ArtifactRow.id)):
        record = f"artifacts #{artifact.id} ({artifact.name})"
        try:
            sha, size = rehash(artifact.uri)
        except FileNotFoundError:
            report.problems.append(Problem("file", record, f"stored content missing: "
                                                           f"{artifact.uri}"))
            continue
        except Exception as exc:  # noqa: BLE001 - any storage failure is a finding, not a crash
            report.problems.append(Problem("file", record, f"cannot read {artifact.uri}: {exc}"))
            continue
        report.files_checked += 1
        if sha != artifact.sha256 or size != artifact.size_bytes:
            report.problems.append(Problem(
                "file", record, f"content differs: registered sha256 {artifact.sha256[:16]}... "
                f"{artifact.size_bytes} bytes, stored {sha[:16]}... {size} bytes"))


def verify(
    session: Session, rehash: Rehash | None = None, expected_head: str | None = None
) -> VerifyReport:
    """The full check; ``expected_head``: a head hash written down earlier, which must still be
    in the chain (a chain rewritten from before that point would no longer contain it)."""
    report = VerifyReport()
    verify_chain(session, report)
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
