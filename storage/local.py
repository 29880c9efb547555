"""The ``local`` storage backend: a content-addressed directory on this machine.

Layout under the root (default ``$QUANTMILL_HOME/storage``)::

    objects/sha256/<first two hex>/<sha256>    a file, or a directory tree (see plugins.hashing)
    tmp/                                       staging; anything here is an unfinished write
    work/<key>/                                finished decoder blocks of an unfinished job

An object is copied into ``tmp/`` first and renamed into ``objects/`` only once complete, so a
crash never leaves a half-written object under its hash. Reads re-hash the content and refuse a
mismatch. Storing identical content twice is a no-op that returns the same URI.

Sample recipe section::

    storage:
      backend: local
      root: /data/quantmill-store     # optional
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from quantmill.plugins.base import PluginConfig, StorageBackend, StoredObject
from quantmill.plugins.blockwise.resume import DirectoryBlockStore
from quantmill.plugins.blockwise.resume import work_key as _work_key
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hashing import sha256_path
from quantmill.plugins.home import quantmill_home
from quantmill.plugins.hookspecs import hookimpl
from quantmill.storage.errors import StorageError, StorageIntegrityError, StorageObjectMissing


class LocalStorageConfig(PluginConfig):
    root: Path | None = None


class LocalStorage(StorageBackend):
    name = "local"
    scheme = "file"
    Config = LocalStorageConfig

    @property
    def root(self) -> Path:
        return (self.config.root or quantmill_home() / "storage").expanduser().resolve()

    def work_area(self, key: str) -> DirectoryBlockStore:
        return DirectoryBlockStore(self.root / "work" / _work_key(key))

    def work_area_keys(self) -> list[str]:
        work = self.root / "work"
        return sorted(p.name for p in work.iterdir() if p.is_dir()) if work.is_dir() else []

    def holds(self, uri: str) -> bool:
        """A file:// URI of an object in this root's layout, with no link leading out."""
        try:
            path = _local_path(uri)
        except QuantmillError:
            return False
        if not _SHA256_NAME.match(path.name) or ".." in path.parts:
            return False
        objects = self.root / "objects" / "sha256"
        return path == objects / path.name[:2] / path.name and path.resolve() == path

    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / "sha256" / sha256[:2] / sha256

    def put_tree(self, path: Path, consume: bool = False) -> StoredObject:
        path = Path(path)
        if not path.exists():
            raise QuantmillError(f"cannot store {path}: it does not exist")
        sha, size = sha256_path(path)
        target = self.object_path(sha)
        if target.exists() and sha256_path(target)[0] != sha:
            self._discard(target)  # a damaged copy must not stand in for the new content
        if not target.exists():
            staging = self.root / "tmp" / f"{sha}.{uuid.uuid4().hex}"
            staging.parent.mkdir(parents=True, exist_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                if not (consume and _moved(path, staging)):
                    if path.is_dir():
                        shutil.copytree(path, staging)
                    else:
                        shutil.copy2(path, staging)
                    staged_sha, _ = sha256_path(staging)
                    if staged_sha != sha:
                        raise StorageIntegrityError(f"{path} changed while it was being stored")
                try:
                    os.rename(staging, target)
                except OSError:
                    if not target.exists():  # not a lost race with an identical writer
                        raise
            finally:
                if staging.is_dir():
                    shutil.rmtree(staging, ignore_errors=True)
                elif staging.exists():
                    staging.unlink()
        if consume:
            _remove(path)
        return StoredObject(uri=target.as_uri(), sha256=sha, size_bytes=size)

    def _discard(self, target: Path) -> None:
        aside = self.root / "tmp" / f"damaged.{target.name}.{uuid.uuid4().hex}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, aside)
        if aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink()

    def fetch(self, uri: str, verify: bool = True) -> Path:
        """The object's path, re-hashed when ``verify``. Files outside this layout (a base
        model registered where it lies) are not named by their hash: the caller compares them
        with what it registered."""
        path = _local_path(uri)
        if not path.exists():
            raise StorageObjectMissing(f"stored object is missing: {path}")
        if verify and _SHA256_NAME.match(path.name):  # an object of this layout
            actual, _ = sha256_path(path)
            if actual != path.name:
                raise StorageIntegrityError(
                    f"stored object {path} was modified: sha256 is now {actual}"
                )
        return path

    def rehash(self, uri: str) -> tuple[str, int]:
        path = _local_path(uri)
        if not path.exists():
            raise StorageObjectMissing(f"stored content missing: {path}")
        return sha256_path(path)

    def publish(self, path: Path, destination: str) -> StoredObject:
        """Copy ``path`` to the directory ``destination`` (a path or file:// URI), all at once:
        it is assembled beside the destination and renamed into place. Identical content
        already there is left alone; other content is refused, never mixed or replaced."""
        target = _local_path(destination) if destination.startswith("file:") \
            else Path(destination).expanduser()
        sha, size = sha256_path(path)
        if target.exists():
            if target.is_dir() and sha256_path(target)[0] == sha:
                return StoredObject(uri=target.resolve().as_uri(), sha256=sha, size_bytes=size)
            raise StorageError(f"cannot publish to {target}: it already exists with other "
                               "content; choose a new directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.publishing-{uuid.uuid4().hex}"
        try:
            if path.is_dir():
                shutil.copytree(path, staging)
            else:
                staging.mkdir()
                shutil.copy2(path, staging / path.name)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return StoredObject(uri=target.resolve().as_uri(), sha256=sha, size_bytes=size)

    @classmethod
    def options_from_url(cls, url: str) -> dict[str, Any]:
        return {"root": str(_local_path(url))}


_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")


def _moved(path: Path, staging: Path) -> bool:
    """Rename ``path`` to ``staging`` (same file system: no copy); False when it cannot be."""
    try:
        os.rename(path, staging)
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise QuantmillError(f"local storage cannot read '{uri}' (expected a file:// URI)")
    if parsed.netloc not in ("", "localhost"):
        raise QuantmillError(f"a file URI on another host ({parsed.netloc}) cannot be read here")
    return Path(unquote(parsed.path))


@hookimpl
def register_storage_backends() -> list[type[StorageBackend]]:
    return [LocalStorage]
