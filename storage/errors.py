"""Errors of the storage backends: one clear sentence each, never a credential in it."""

from __future__ import annotations

from quantmill.plugins.errors import QuantmillError


class StorageError(QuantmillError):
    """A store or read failed (unreachable server, refused credentials, unknown bucket...)."""


class StorageIntegrityError(StorageError):
    """Stored bytes no longer match the hash they were stored under."""


class StorageObjectMissing(StorageError, FileNotFoundError):
    """The stored content is gone (``verify`` reports it as missing, not as unreadable)."""
