"""The local cache of content read from object storage: bounded, evictable, hash-checked.

Layout under ``$QUANTMILL_HOME/cache`` (or the ``root`` given)::

    blobs/<ab>/<sha256>      one file whose content hashes to its name
    trees/<sha256>/          a directory tree (``plugins.hashing``), its files hard links to blobs
    refs/<key>.json          what an external S3 location listed as, and the content it held
    locks/<entry>.lock       one per entry: its mtime is the entry's last use; a process that
                             was handed the entry's path holds a shared lock on it
    tmp/                     downloads in progress (never read as content)

Why hard links: a tokenizer or a shard shared by many checkpoints is stored once, and a tree
can be assembled without copying. Why locks: eviction must never delete a model a running job
is reading layer by layer; it takes an exclusive lock without waiting and skips entries it
cannot lock. ``release_pins()`` drops a process's shared locks (end of a job in a long-lived
worker).

Size bound: ``QUANTMILL_CACHE_MAX_GB`` (default 50); after each insertion the least recently
used entries that no process holds are removed until the cache fits. A cached entry is re-hashed
before it is handed out (once per process while its files' inode, size and mtime stay the same),
so a damaged copy is discarded and fetched again, never used.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from quantmill.plugins.hashing import manifest_sha256, sha256_file, sha256_path
from quantmill.plugins.home import quantmill_home

DEFAULT_MAX_GB = 50.0

_PINS: dict[str, int] = {}  # lock path -> fd held with LOCK_SH for the life of the process
_VERIFIED: dict[str, tuple] = {}  # entry path -> stat signature of its files when last hashed
_GUARD = threading.Lock()


def release_pins() -> None:
    """Let eviction remove entries this process was handed (their paths may then vanish)."""
    with _GUARD:
        for fd in _PINS.values():
            os.close(fd)
        _PINS.clear()


def _signature(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), (s := p.stat()).st_ino, s.st_size, s.st_mtime_ns) for p in files)


class ContentCache:
    """Content-addressed files and trees fetched from elsewhere, on this machine."""

    def __init__(self, root: Path | None = None, max_bytes: int | None = None) -> None:
        self.root = (root or quantmill_home() / "cache").expanduser()
        if max_bytes is None:
            max_bytes = int(float(os.environ.get("QUANTMILL_CACHE_MAX_GB", DEFAULT_MAX_GB))
                            * (1 << 30))
        self.max_bytes = max_bytes
        self._usage: int | None = None  # running total since the last walk (``_added``)

    # --- paths ---------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def tree_path(self, sha256: str) -> Path:
        return self.root / "trees" / sha256

    def temp_path(self, label: str = "") -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f"{label}{uuid.uuid4().hex}"

    def _lock_path(self, entry: Path) -> Path:
        return self.root / "locks" / f"{entry.parent.name}-{entry.name}.lock"

    # --- reading -------------------------------------------------------------------------------

    def get(self, sha256: str, tree: bool) -> Path | None:
        """The verified cached file or tree with this hash (pinned, marked used), or None;
        a copy that no longer hashes to its name is discarded."""
        path = self.tree_path(sha256) if tree else self.blob_path(sha256)
        if not path.exists():
            return None
        self._pin(path)
        if not self._intact(path, sha256):
            self._remove(path)
            return None
        return path

    def _intact(self, path: Path, sha256: str) -> bool:
        signature = _signature(path)
        if _VERIFIED.get(str(path)) == signature:
            return True
        actual = sha256_file(path) if path.is_file() else sha256_path(path)[0]
        if actual != sha256:
            return False
        _VERIFIED[str(path)] = signature
        return True

    # --- writing -------------------------------------------------------------------------------

    def add_blob(self, downloaded: Path, sha256: str) -> Path:
        """Move a downloaded file, already hashed to ``sha256`` by its downloader, into place."""
        target = self.blob_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(downloaded, target)
        _VERIFIED[str(target)] = _signature(target)
        self._pin(target)
        self._added(target.stat().st_size, target)
        return target

    def add_tree(self, sha256: str, files: list[tuple[str, str]]) -> Path:
        """Assemble the tree ``sha256`` from cached blobs: ``files`` are (relative path, blob
        sha256). Each blob is checked (hashed, or known intact since it was) and the manifest
        they make must hash to ``sha256`` before the tree is renamed into place, so no byte is
        read twice."""
        target = self.tree_path(sha256)
        staging = self.temp_path("tree-")
        try:
            entries = []
            for rel, blob in files:
                source = self.blob_path(blob)
                if not source.is_file() or not self._intact(source, blob):
                    raise ValueError(f"cached blob {blob[:16]}... is missing or damaged")
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(source, dest)
                entries.append((rel, blob, source.stat().st_size))
            if not files:
                staging.mkdir(parents=True)
            if manifest_sha256(entries) != sha256:
                raise ValueError(f"the files assembled for tree {sha256[:16]}... do not hash to it")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, target)
            except OSError:
                if not target.exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _VERIFIED[str(target)] = _signature(target)
        self._pin(target)
        self._added(0, target)  # hard links to blobs already counted
        return target

    def _added(self, nbytes: int, entry: Path) -> None:
        """Keep the size bound without walking the cache on every insertion: the walk happens
        once per process, and again only when the running total says the bound is passed
        (other processes' insertions are seen at that walk)."""
        if self._usage is None:
            self._usage = self.usage()
        else:
            self._usage += nbytes
        if self._usage > self.max_bytes:
            self.evict(keep={entry})
            self._usage = self.usage()

    def read_ref(self, key: str) -> dict[str, Any] | None:
        path = self.root / "refs" / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def write_ref(self, key: str, document: dict[str, Any]) -> None:
        path = self.root / "refs" / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.temp_path("ref-")
        tmp.write_text(json.dumps(document, sort_keys=True))
        os.replace(tmp, path)

    # --- pinning and eviction ----------------------------------------------------------------

    def _pin(self, entry: Path) -> None:
        lock = self._lock_path(entry)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with _GUARD:
            held = _PINS.get(str(lock))
            if held is not None and not lock.exists():  # the cache was wiped under us
                os.close(_PINS.pop(str(lock)))
                held = None
            if held is None:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_SH)
                _PINS[str(lock)] = fd
            os.utime(lock)  # last use, for least-recently-used eviction

    def _entries(self) -> list[Path]:
        blobs = [p for p in (self.root / "blobs").glob("*/*") if p.is_file()]
        trees = [p for p in (self.root / "trees").glob("*") if p.is_dir()]
        return blobs + trees

    def _files(self, entry: Path) -> list[tuple[int, int]]:
        """``(inode, size)`` of an entry's files."""
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        return [((stat := file.stat()).st_ino, stat.st_size) for file in files]

    def usage(self) -> int:
        """Bytes on disk: every distinct inode of the cache's entries counted once."""
        return sum({ino: size for entry in self._entries()
                    for ino, size in self._files(entry)}.values())

    def evict(self, keep: set[Path] = frozenset()) -> list[Path]:  # type: ignore[assignment]
        """Remove least recently used, unheld entries until the cache fits its bound (one walk:
        an inode's bytes are freed when its last entry goes)."""
        entries = self._entries()
        files = {entry: self._files(entry) for entry in entries}
        links = Counter(ino for found in files.values() for ino, _ in found)
        sizes = {ino: size for found in files.values() for ino, size in found}
        total = sum(sizes.values())
        removed: list[Path] = []
        if total <= self.max_bytes:
            return removed
        guard = self.root / "locks" / ".evict"
        guard.parent.mkdir(parents=True, exist_ok=True)
        with guard.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)

            def last_use(entry: Path) -> float:
                lock = self._lock_path(entry)
                return lock.stat().st_mtime if lock.exists() else 0.0

            for entry in sorted(entries, key=last_use):
                if total <= self.max_bytes:
                    break
                if entry in keep or not self._try_remove_unheld(entry):
                    continue
                removed.append(entry)
                for ino, _ in files[entry]:
                    links[ino] -= 1
                    if links[ino] == 0:
                        total -= sizes[ino]
        return removed

    def _try_remove_unheld(self, entry: Path) -> bool:
        lock = self._lock_path(entry)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a process (maybe this one) is using it
            self._remove(entry)
            return True
        finally:
            os.close(fd)

    def _remove(self, entry: Path) -> None:
        aside = self.temp_path("evicted-")
        try:
            os.rename(entry, aside)
        except FileNotFoundError:
            return
        _VERIFIED.pop(str(entry), None)
        if aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)
