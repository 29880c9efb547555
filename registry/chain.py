"""The tamper-evident ledger: every registry record is appended to one hash chain.

Why a chain over copies of the records: an auditor must be able to tell whether anything was
changed after the fact, and what. Each link stores the record's canonical JSON (``payload``), its
sha256, and ``entry_hash = sha256(prev_hash, seq, record_type, record_id, record_sha256)``. Editing
a record makes it differ from its copy; editing the copy breaks its hash; rewriting the whole
chain from some point changes the head hash, which auditors can write down (``verify`` prints it
and checks it against an expected value).

Writers are serialised while they append (``lock_for_append``): a PostgreSQL transaction-level
advisory lock, and on SQLite the database write lock the transaction already takes (every write
transaction starts with ``BEGIN IMMEDIATE``, see ``quantmill.registry.db``). ``seq`` is also the
primary key, so even a writer that bypassed the lock could not fork the chain.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, select, text
from sqlalchemy.orm import Session

from quantmill.registry.hashing import canonical_json
from quantmill.registry.models import CHAINED_TABLES, LedgerRow, utcnow

#: The ``prev_hash`` of the first link.
GENESIS = "0" * 64
#: Arbitrary, fixed key of the PostgreSQL advisory lock guarding the chain's tail ("qmledger").
ADVISORY_LOCK_KEY = 0x716D6C6564676572


def normalize_value(value: Any) -> Any:
    """A column value as the same JSON whichever database returned it.

    SQLite gives back naive datetimes, PostgreSQL aware ones in the session's zone: both become
    UTC ISO strings with microseconds.
    """
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return aware.replace(tzinfo=None).isoformat(timespec="microseconds")
    return value


def row_payload(table: Table, row: Any) -> dict[str, Any]:
    """Every column of a Core result row, by column name, normalised."""
    mapping = row._mapping
    return {column.name: normalize_value(mapping[column.name]) for column in table.columns}


def payload_text(payload: dict[str, Any]) -> str:
    return canonical_json(payload)


def sha256_text(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def entry_hash(prev_hash: str, seq: int, record_type: str, record_id: int, record_sha: str) -> str:
    """The hash that links one entry to the one before it."""
    return sha256_text(f"{prev_hash}\n{seq}\n{record_type}\n{record_id}\n{record_sha}")


def lock_for_append(session: Session) -> None:
    """Serialise chain appends across processes for the rest of this transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})


def tail(session: Session) -> tuple[int, str]:
    """``(seq, entry_hash)`` of the last link, or ``(0, GENESIS)`` for an empty chain."""
    last = session.execute(
        select(LedgerRow.seq, LedgerRow.entry_hash).order_by(LedgerRow.seq.desc()).limit(1)
    ).first()
    return (int(last[0]), last[1]) if last else (0, GENESIS)


def stored_payload(session: Session, record_type: str, record_id: int) -> dict[str, Any]:
    """The record as the database holds it now (read back, so the hash matches later reads)."""
    table = CHAINED_TABLES[record_type].__table__
    row = session.execute(select(table).where(table.c.id == record_id)).one()
    return row_payload(table, row)


class ChainWriter:
    """Appends links for the records one transaction writes, in the order it writes them."""

    def __init__(self, session: Session) -> None:
        lock_for_append(session)
        self._session = session
        self._seq, self._hash = tail(session)

    def append(self, record_type: str, record_id: int) -> str:
        """Chain the record (already added to the session); returns the new head hash."""
        if record_type not in CHAINED_TABLES:
            raise ValueError(f"{record_type!r} is not a chained table")
        self._session.flush()
        text_ = payload_text(stored_payload(self._session, record_type, record_id))
        record_sha = sha256_text(text_)
        prev, self._seq = self._hash, self._seq + 1
        self._hash = entry_hash(prev, self._seq, record_type, record_id, record_sha)
        self._session.add(
            LedgerRow(
                seq=self._seq,
                record_type=record_type,
                record_id=record_id,
                payload=text_,
                record_sha256=record_sha,
                prev_hash=prev,
                entry_hash=self._hash,
                created_at=utcnow(),
            )
        )
        return self._hash
