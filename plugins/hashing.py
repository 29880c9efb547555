"""Content hashes: one definition for files and directory trees, used by storage and provenance.

A tree's hash is the sha256 of its manifest: one line ``<sha256> <size> <relative/posix/path>\n``
per regular file, sorted by path. Renaming, adding or editing any file changes it; timestamps and
permissions do not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def tree_files(root: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every regular file under ``root``, in manifest order."""
    return [(path.relative_to(root).as_posix(), path)
            for path in sorted(p for p in root.rglob("*") if p.is_file())]


def tree_manifest(root: Path) -> list[tuple[str, str, int]]:
    """``(relative path, sha256, size)`` for every regular file under ``root``, sorted."""
    return [(rel, sha256_file(path), path.stat().st_size) for rel, path in tree_files(root)]


def manifest_text(entries: list[tuple[str, str, int]]) -> str:
    """The manifest whose sha256 is the tree's hash. Storage backends that keep a tree as one
    object per file store exactly this text as the tree's own object, so the object that lists
    a tree's files is content-addressed by the tree hash itself."""
    return "".join(f"{sha} {size} {rel}\n" for rel, sha, size in sorted(entries))


def parse_manifest(text: str) -> list[tuple[str, str, int]]:
    """``manifest_text`` read back: ``(relative path, sha256, size)`` per line (raises
    ``ValueError`` on a malformed line)."""
    entries = []
    for line in text.splitlines():
        sha, size, rel = line.split(" ", 2)
        if len(sha) != 64 or not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"malformed manifest line: {line[:120]!r}")
        entries.append((rel, sha, int(size)))
    return entries


def manifest_sha256(entries: list[tuple[str, str, int]]) -> str:
    return hashlib.sha256(manifest_text(entries).encode()).hexdigest()


def sha256_path(path: Path) -> tuple[str, int]:
    """Hash and total size of a file or of a directory tree."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    entries = tree_manifest(path)
    return manifest_sha256(entries), sum(size for _, _, size in entries)
