"""The registry's HTTP API (FastAPI): ``create_app(url)``, served by ``quantmill registry serve``.

Why the registry is opened in ``create_app`` and not per request: a database whose schema is
behind must stop the service before it binds a port, with the ``quantmill registry upgrade ...``
command in the message, instead of answering every request with an error.

Errors: every answer that is not a success is ``{"detail": "<one line>"}`` with a 4xx code for
anything the caller can fix (401/403 tokens, 404 unknown artifact or run, 409 ambiguous prefix or
conflicting content, 422 invalid parameter or body) and 503 when the database is unavailable.
Bad input never reaches SQL as text and never yields a 500; nothing is written on any error (each
write is one transaction).
"""

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from quantmill.flows.api_claims import StorageClaims
from quantmill.flows.api_limits import BodyLimit
from quantmill.flows.api_routes import auditor, public, reader, writer
from quantmill.plugins.base import StorageBackend
from quantmill.registry import (
    AmbiguousReference,
    ArtifactConflict,
    ArtifactNotFound,
    InvalidClaim,
    InvalidQuery,
    Registry,
    RegistryError,
    RegistryUnavailable,
    RunNotFound,
    SchemaMismatch,
    head_revision,
)
from quantmill.registry.remote import InvalidRun

#: Registry errors by HTTP status, most specific first (the first ``isinstance`` match wins).
ERROR_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (ArtifactNotFound, 404),
    (RunNotFound, 404),
    (AmbiguousReference, 409),
    (ArtifactConflict, 409),
    (InvalidQuery, 422),
    (InvalidRun, 422),
    (InvalidClaim, 422),
    (SchemaMismatch, 503),
    (RegistryUnavailable, 503),
    (RegistryError, 400),
)


def _error(status_code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)


def _registry_error(_request: Request, exc: Exception) -> JSONResponse:
    status_code = next(code for kind, code in ERROR_STATUS if isinstance(exc, kind))
    return _error(status_code, str(exc))


def _where(location: Sequence[Any]) -> str:
    """``("query", "limit")`` -> ``query parameter 'limit'``; body paths as ``body.a.0.b``."""
    kind, *rest = location or ("request",)
    names = {"query": "query parameter", "path": "path parameter", "header": "header"}
    if kind in names and rest:
        return f"{names[kind]} {rest[0]!r}"
    return ".".join(str(part) for part in location)


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's list of errors as one line: where, and what is wrong (never the input echoed,
    which may be huge)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    parts = [f"{_where(error.get('loc', ()))}: {error.get('msg', 'invalid')}" for error in errors]
    return _error(422, "; ".join(parts) or "invalid request")


def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    """Driver errors reach here only if a check above SQL missed a case: still the caller's
    problem (4xx) for bad data, a 503 for an unavailable database; never driver internals."""
    if isinstance(exc, IntegrityError):
        return _error(409, "the request conflicts with a stored record; nothing was written")
    if isinstance(exc, DataError):
        return _error(422, "a value does not fit the registry's schema; nothing was written")
    return _error(503, "the registry database is unavailable; try again later")


def create_app(database_url: str | None = None,
               storages: list[StorageBackend] | None = None) -> FastAPI:
    """The API over the registry at ``database_url`` (resolved as usual: argument, then
    ``$QUANTMILL_DATABASE_URL``, then the default SQLite file). Writers may register outputs
    stored in ``storages`` only (default: the default storage, ``$QUANTMILL_STORAGE_URL`` or
    the local one).

    Raises ``SchemaOutdated`` (naming the upgrade command) for an empty or older database: the
    service never creates or migrates a schema itself.
    """
    registry = Registry.open(database_url, auto_create=False)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        registry.close()

    app = FastAPI(
        title="quantmill registry",
        summary="Artifacts, runs, metrics and lineage of quantmill's compression batches.",
        description=(
            "Every route but `/health` needs `Authorization: Bearer <token>`. Create tokens with "
            "`quantmill registry token create NAME --role auditor|writer`: auditor tokens read, "
            "export lineage and verify the ledger; writer tokens read and register runs."
        ),
        version=_version(),
        lifespan=lifespan,
    )
    app.state.registry = registry
    if storages is None:
        from quantmill.flows.recipe import default_storage
        from quantmill.plugins.catalog import Catalog
        from quantmill.plugins.manager import get_plugin_manager

        storages = [default_storage(Catalog(get_plugin_manager()))]
    app.state.claims = StorageClaims(storages)
    app.state.schema_revision = head_revision()
    app.add_exception_handler(RegistryError, _registry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for driver_error in (IntegrityError, DataError, OperationalError):
        app.add_exception_handler(driver_error, _database_error)
    for router in (public, reader, auditor, writer):
        app.include_router(router)
    app.add_middleware(BodyLimit)  # before FastAPI parses any body, the token check included
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quantmill")
    except PackageNotFoundError:
        return "unknown"
