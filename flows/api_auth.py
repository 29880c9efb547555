"""Who may call the HTTP API: bearer tokens checked against the registry, per role.

Roles (issue #5): an ``auditor`` token reads, and alone may export lineage and verify the
ledger; a ``writer`` token reads and appends runs (remote workers), but cannot audit. No token,
no data: every route but ``/health`` (and the schema) needs one.

FastAPI's ``HTTPBearer`` runs with ``auto_error=False`` because its own error is a 403 without a
``WWW-Authenticate`` header; RFC 6750 wants 401 with ``WWW-Authenticate: Bearer`` for a missing or
bad token, and 403 only for a valid token lacking the role.
"""

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from quantmill.registry import Registry
from quantmill.registry.tokens import ApiToken, authenticate

bearer = HTTPBearer(
    auto_error=False,
    description="A token from `quantmill registry token create NAME --role auditor|writer`.",
)


def get_registry(request: Request) -> Registry:
    """The registry the app was created with (opened once, checked at start-up)."""
    return request.app.state.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


def _unauthorized(message: str, error: str = "invalid_token") -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail=message,
        headers={"WWW-Authenticate": f'Bearer error="{error}"'},
    )


def current_token(
    request: Request,
    registry: RegistryDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiToken:
    """The caller's live token, or a 401 saying what is wrong with the request."""
    if credentials is None:
        if request.headers.get("authorization"):
            raise _unauthorized(
                "malformed Authorization header: send 'Authorization: Bearer <token>'",
                "invalid_request",
            )
        raise _unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>' (create one with "
            "`quantmill registry token create NAME --role auditor|writer`)",
            "invalid_request",
        )
    token = authenticate(registry, credentials.credentials)
    if token is None:
        raise _unauthorized("the bearer token is unknown or revoked")
    return token


def require(*roles: str) -> Callable[[ApiToken], ApiToken]:
    """A dependency admitting only tokens of ``roles`` (403 for the others)."""
    wanted = " or ".join(roles)

    def dependency(token: Annotated[ApiToken, Depends(current_token)]) -> ApiToken:
        if token.role not in roles:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"this route needs a{'n' if wanted[0] in 'aeiou' else ''} {wanted} "
                f"token; token {token.name!r} is a{'n' if token.role[0] in 'aeiou' else ''} "
                f"{token.role} token",
            )
        return token

    return dependency


Reader = Annotated[ApiToken, Depends(require("auditor", "writer"))]
Auditor = Annotated[ApiToken, Depends(require("auditor"))]
Writer = Annotated[ApiToken, Depends(require("writer"))]
