"""The local cache of fetched content: bounded by size, least recently used first, never
evicting what a process holds, re-hashing what it hands out."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from quantmill.plugins.hashing import sha256_path
from quantmill.storage.cache import ContentCache, release_pins


def _add(cache: ContentCache, data: bytes) -> tuple[str, Path]:
    sha = hashlib.sha256(data).hexdigest()
    tmp = cache.temp_path("test-")
    tmp.write_bytes(data)
    return sha, cache.add_blob(tmp, sha)


def test_least_recently_used_unheld_entries_are_evicted(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache", max_bytes=2500)
    first, _ = _add(cache, b"a" * 1000)
    time.sleep(0.01)
    second, _ = _add(cache, b"b" * 1000)
    release_pins()  # this process no longer reads them
    os.utime(cache._lock_path(cache.blob_path(first)), (1, 1))  # the first is the oldest
    third, _ = _add(cache, b"c" * 1000)
    assert cache.get(first, tree=False) is None
    assert cache.get(second, tree=False) is not None and cache.get(third, tree=False)
    assert cache.usage() <= 2500
    release_pins()


def test_entries_held_by_another_process_are_kept(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache", max_bytes=1500)
    held, path = _add(cache, b"h" * 1000)
    release_pins()
    lock = cache._lock_path(path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_SH)\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        os.utime(lock, (1, 1))
        _add(cache, b"n" * 1000)
        assert cache.blob_path(held).exists()  # over the bound, but in use elsewhere
    finally:
        holder.kill()
        holder.wait()
    release_pins()
    _add(cache, b"m" * 1000)
    assert not cache.blob_path(held).exists()
    release_pins()


def test_damaged_entry_is_discarded(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache", max_bytes=1 << 20)
    sha, path = _add(cache, b"x" * 100)
    path.write_bytes(b"y" * 100)  # changed on disk after it was verified
    assert cache.get(sha, tree=False) is None and not path.exists()
    release_pins()


def test_tree_is_assembled_from_shared_blobs(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache", max_bytes=1 << 20)
    a, _ = _add(cache, b"shared tokenizer")
    b, _ = _add(cache, b"weights one")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "tokenizer.json").write_bytes(b"shared tokenizer")
    (src / "sub" / "w.bin").write_bytes(b"weights one")
    sha = sha256_path(src)[0]
    tree = cache.add_tree(sha, [("tokenizer.json", a), ("sub/w.bin", b)])
    assert sha256_path(tree)[0] == sha
    assert (tree / "tokenizer.json").stat().st_ino == cache.blob_path(a).stat().st_ino
    assert cache.usage() == len(b"shared tokenizer") + len(b"weights one")  # stored once
    assert cache.get(sha, tree=True) == tree
    release_pins()


def test_a_cache_wiped_while_in_use_is_refilled(tmp_path: Path) -> None:
    import shutil

    cache = ContentCache(tmp_path / "cache", max_bytes=1 << 20)
    sha, _ = _add(cache, b"z" * 10)
    shutil.rmtree(tmp_path / "cache")  # e.g. an operator freeing disk space
    again, path = _add(cache, b"z" * 10)
    assert again == sha and cache.get(sha, tree=False) == path
    release_pins()
