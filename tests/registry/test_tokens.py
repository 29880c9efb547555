"""API tokens on SQLite and PostgreSQL: stored hashed, unique names, appended revocations."""

import hashlib

import pytest
from sqlalchemy import select, text

from quantmill.registry import Registry
from quantmill.registry.models import ApiTokenRevocationRow, ApiTokenRow
from quantmill.registry.tokens import (
    TOKEN_PREFIX,
    TokenError,
    TokenNotFound,
    authenticate,
    create_token,
    list_tokens,
    revoke_token,
)

ALL_TABLES = ("artifacts", "runs", "run_edges", "run_completions", "metrics", "corrections",
              "api_tokens", "api_token_revocations", "ledger")


def database_text(registry: Registry) -> str:
    """Every value of every registry table, as one string (to search for a leaked secret)."""
    with registry.session() as session:
        return "\n".join(
            repr(tuple(row)) for table in ALL_TABLES
            for row in session.execute(text(f"SELECT * FROM {table}"))
        )


def token_rows(registry: Registry) -> list[tuple[str, str, str]]:
    with registry.session() as session:
        return [tuple(row) for row in session.execute(
            select(ApiTokenRow.name, ApiTokenRow.role, ApiTokenRow.token_sha256)
            .order_by(ApiTokenRow.id))]


def test_create_stores_only_the_sha256_and_authenticates(registry: Registry) -> None:
    secret, token = create_token(registry, "ci-auditor", "auditor", created_by="alice")
    assert secret.startswith(TOKEN_PREFIX) and len(secret) >= len(TOKEN_PREFIX) + 43
    assert (token.name, token.role, token.created_by, token.revoked_at) == (
        "ci-auditor", "auditor", "alice", None)
    assert token_rows(registry) == [
        ("ci-auditor", "auditor", hashlib.sha256(secret.encode()).hexdigest())]
    stored = database_text(registry)
    assert secret not in stored and secret[len(TOKEN_PREFIX):] not in stored
    assert authenticate(registry, secret) == token
    assert registry.head()[0] == 1 and registry.verify().ok  # the token row is chained


def test_each_token_is_a_fresh_random_secret(registry: Registry) -> None:
    first, _ = create_token(registry, "w1", "writer")
    second, _ = create_token(registry, "w2", "writer")
    assert first != second
    assert authenticate(registry, first).name == "w1"
    assert authenticate(registry, second).name == "w2"


@pytest.mark.parametrize("wrong", ["", "qm_", "qm_nope", "not-a-token", "Bearer qm_x",
                                   "qm_" + "a" * 500, "' OR 1=1 --"])
def test_unknown_or_malformed_tokens_do_not_authenticate(registry: Registry, wrong: str) -> None:
    secret, _ = create_token(registry, "w1", "writer")
    assert authenticate(registry, wrong) is None
    assert authenticate(registry, secret + "x") is None
    assert authenticate(registry, secret[:-1]) is None


def test_names_are_unique_and_a_duplicate_changes_nothing(registry: Registry) -> None:
    create_token(registry, "worker", "writer")
    head = registry.head()
    with pytest.raises(TokenError, match="'worker' exists already"):
        create_token(registry, "worker", "auditor")
    assert registry.head() == head
    assert [t.name for t in list_tokens(registry)] == ["worker"]


@pytest.mark.parametrize("name", ["", "Upper", "-lead", "has space", "a" * 65, "x;drop",
                                  "name\n", "ünï", "' OR 1=1 --", "%", "_x"])
def test_invalid_names_are_refused(registry: Registry, name: str) -> None:
    with pytest.raises(TokenError, match="invalid token name"):
        create_token(registry, name, "auditor")
    assert list_tokens(registry) == [] and registry.head()[0] == 0


@pytest.mark.parametrize("role", ["admin", "", "Writer", "auditor "])
def test_invalid_roles_are_refused(registry: Registry, role: str) -> None:
    with pytest.raises(TokenError, match="invalid token role"):
        create_token(registry, "someone", role)
    assert list_tokens(registry) == []


def test_longest_valid_name_is_accepted(registry: Registry) -> None:
    name = "a" + "b.c_d-" * 10 + "xyz"
    assert len(name) == 64
    _, token = create_token(registry, name, "auditor")
    assert token.name == name


def test_revocation_is_appended_and_the_token_stops_working(registry: Registry) -> None:
    secret, token = create_token(registry, "worker", "writer")
    assert authenticate(registry, secret) is not None
    revoked = revoke_token(registry, "worker", revoked_by="bob", reason="laptop stolen")
    assert revoked.id == token.id and revoked.revoked_at is not None
    assert authenticate(registry, secret) is None
    assert list_tokens(registry) == [revoked]
    # The token row is untouched: the revocation is a row of its own, chained like the token.
    assert token_rows(registry)[0][2] == hashlib.sha256(secret.encode()).hexdigest()
    with registry.session() as session:
        rows = session.execute(select(ApiTokenRevocationRow.token_id,
                                      ApiTokenRevocationRow.revoked_by,
                                      ApiTokenRevocationRow.reason)).all()
    assert [tuple(r) for r in rows] == [(token.id, "bob", "laptop stolen")]
    assert registry.head()[0] == 2 and registry.verify().ok


def test_revoking_twice_or_an_unknown_name_is_an_error_and_changes_nothing(
    registry: Registry,
) -> None:
    create_token(registry, "worker", "writer")
    revoke_token(registry, "worker")
    head = registry.head()
    with pytest.raises(TokenError, match="already revoked"):
        revoke_token(registry, "worker")
    with pytest.raises(TokenNotFound, match="no token named 'ghost'"):
        revoke_token(registry, "ghost")
    assert registry.head() == head


def test_a_revoked_name_cannot_be_reused(registry: Registry) -> None:
    create_token(registry, "worker", "writer")
    revoke_token(registry, "worker")
    with pytest.raises(TokenError, match="exists already"):
        create_token(registry, "worker", "writer")


def test_list_shows_every_token_oldest_first(registry: Registry) -> None:
    create_token(registry, "a1", "auditor", created_by="alice")
    create_token(registry, "w1", "writer", created_by="bob")
    revoke_token(registry, "a1")
    listed = list_tokens(registry)
    assert [(t.name, t.role, t.created_by, t.revoked) for t in listed] == [
        ("a1", "auditor", "alice", True), ("w1", "writer", "bob", False)]
    assert set(listed[0].to_json()) == {"id", "name", "role", "created_by", "created_at",
                                        "revoked_at"}
