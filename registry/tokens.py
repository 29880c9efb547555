"""Bearer tokens of the HTTP API: created and revoked from the CLI, checked on every request.

Only a token's sha256 is stored. Why not a slow password hash (bcrypt, scrypt, argon2): those
exist to slow down guessing of low-entropy secrets that people choose. A token here is
``qm_`` + 32 random bytes from ``secrets`` (256 bits): no dictionary exists and brute force over
2**256 is out of reach, so one sha256 is as safe as any slow hash and lets ``authenticate`` find
the token with one indexed lookup. A leaked database therefore gives no usable token.

Tokens and revocations are append-only records on the ledger like every other registry record:
revoking adds an ``api_token_revocations`` row, the token row never changes.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quantmill.registry.convert import as_utc
from quantmill.registry.errors import RegistryError
from quantmill.registry.models import TOKEN_ROLES, ApiTokenRevocationRow, ApiTokenRow, utcnow
from quantmill.registry.store import Registry
from quantmill.registry.writes import current_user

#: Every token starts with this, so a leaked one is recognisable (e.g. by secret scanners).
TOKEN_PREFIX = "qm_"
#: Random bytes per token (``secrets.token_urlsafe`` turns 32 bytes into 43 characters).
TOKEN_BYTES = 32
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
#: Longer than any token we issue: anything longer is refused without hashing it.
_MAX_TOKEN_CHARS = 128
_MAX_PERSON_CHARS = ApiTokenRow.__table__.c.created_by.type.length


class TokenError(RegistryError, ValueError):
    """A token cannot be created or revoked as asked (bad name or role, duplicate, revoked)."""


class TokenNotFound(TokenError, LookupError):
    """No token has the given name."""


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A token's public facts; the secret itself is never kept (nor its hash, here)."""

    id: int
    name: str
    role: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def token_sha256(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _entity(row: ApiTokenRow, revocation: ApiTokenRevocationRow | None) -> ApiToken:
    return ApiToken(
        id=row.id,
        name=row.name,
        role=row.role,
        created_by=row.created_by,
        created_at=as_utc(row.created_at),
        revoked_at=as_utc(revocation.revoked_at) if revocation is not None else None,
    )


def _tokens_query() -> Any:
    return select(ApiTokenRow, ApiTokenRevocationRow).outerjoin(
        ApiTokenRevocationRow, ApiTokenRevocationRow.token_id == ApiTokenRow.id
    )


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise TokenError(
            f"invalid token name {name!r}: use 1 to 64 characters from a-z, 0-9, '_', '.', '-', "
            f"starting with a letter or digit"
        )


def _who(person: str | None) -> str:
    """Who created or revoked a token (the local user by default), as the column can hold it."""
    who = person or current_user()
    if "\x00" in who:
        raise TokenError("a creator or revoker name cannot contain a NUL character")
    if len(who) > _MAX_PERSON_CHARS:
        raise TokenError(f"{who[:40]!r}...: a creator or revoker name has at most "
                         f"{_MAX_PERSON_CHARS} characters")
    return who


def create_token(
    registry: Registry, name: str, role: str, created_by: str | None = None
) -> tuple[str, ApiToken]:
    """Create a token; returns ``(secret, token)``. The secret is shown to the caller once and
    stored nowhere: only its sha256 is written."""
    _check_name(name)
    if role not in TOKEN_ROLES:
        raise TokenError(f"invalid token role {role!r}: use one of {', '.join(TOKEN_ROLES)}")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    # The chain lock serialises writers, so the name check below cannot race another create.
    with registry.writer() as write:
        session, chain = write.session, write.chain
        taken = session.scalars(select(ApiTokenRow.id).where(ApiTokenRow.name == name)).first()
        if taken is not None:
            raise TokenError(f"a token named {name!r} exists already (names are never reused)")
        row = ApiTokenRow(
            name=name,
            role=role,
            token_sha256=token_sha256(secret),
            created_by=_who(created_by),
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        chain.append("api_tokens", row.id)
        return secret, _entity(row, None)


def _token_by_name(
    session: Session, name: str
) -> tuple[ApiTokenRow, ApiTokenRevocationRow | None]:
    found = session.execute(_tokens_query().where(ApiTokenRow.name == name)).first()
    if found is None:
        raise TokenNotFound(f"no token named {name!r}")
    return found[0], found[1]


def revoke_token(
    registry: Registry, name: str, revoked_by: str | None = None, reason: str = ""
) -> ApiToken:
    """Revoke the token ``name`` for good: from this commit on, ``authenticate`` refuses it."""
    if not isinstance(name, str):
        raise TokenNotFound(f"no token named {name!r}")
    if "\x00" in str(reason):
        raise TokenError("a revocation reason cannot contain a NUL character")
    with registry.writer() as write:
        session, chain = write.session, write.chain
        row, earlier = _token_by_name(session, name)
        if earlier is not None:
            raise TokenError(
                f"token {name!r} was already revoked at {as_utc(earlier.revoked_at).isoformat()}"
            )
        revocation = ApiTokenRevocationRow(
            token_id=row.id, revoked_by=_who(revoked_by), reason=str(reason), revoked_at=utcnow()
        )
        session.add(revocation)
        session.flush()
        chain.append("api_token_revocations", revocation.id)
        return _entity(row, revocation)


def list_tokens(registry: Registry) -> list[ApiToken]:
    """Every token ever created, revoked ones included, oldest first."""
    with registry.session() as session:
        rows = session.execute(_tokens_query().order_by(ApiTokenRow.id))
        return [_entity(row, revocation) for row, revocation in rows]


def authenticate(registry: Registry, token: str) -> ApiToken | None:
    """The live token matching ``token``, or ``None`` for an unknown, malformed or revoked one.

    The lookup compares sha256 digests: timing can at most reveal something about a digest,
    which does not help anyone build a token that hashes to it.
    """
    if (
        not isinstance(token, str)
        or not token.startswith(TOKEN_PREFIX)
        or len(token) > _MAX_TOKEN_CHARS
    ):
        return None
    query = _tokens_query().where(ApiTokenRow.token_sha256 == token_sha256(token))
    with registry.session() as session:
        found = session.execute(query).first()
        if found is None or found[1] is not None:
            return None
        return _entity(found[0], None)
