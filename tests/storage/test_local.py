"""Local content-addressed storage: atomic writes, dedup, hash checked on read."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hashing import sha256_path
from quantmill.storage.errors import StorageIntegrityError
from quantmill.storage.local import LocalStorage


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)))
    return root


def test_put_tree_is_content_addressed(tmp_path: Path) -> None:
    store = LocalStorage.from_options({"root": tmp_path / "store"})
    src = _tree(tmp_path / "src")
    first = store.put_tree(src)
    again = store.put_tree(src)
    assert first == again
    assert first.sha256 == sha256_path(src)[0]
    fetched = store.fetch(first.uri)
    assert (fetched / "sub" / "b.bin").read_bytes() == bytes(range(256))
    assert not any((tmp_path / "store" / "tmp").iterdir())  # no staging leftovers


def test_single_file(tmp_path: Path) -> None:
    store = LocalStorage.from_options({"root": tmp_path / "store"})
    f = tmp_path / "x.bin"
    f.write_bytes(b"123")
    obj = store.put_tree(f)
    assert obj.size_bytes == 3 and store.fetch(obj.uri).read_bytes() == b"123"


def test_tampering_is_detected(tmp_path: Path) -> None:
    store = LocalStorage.from_options({"root": tmp_path / "store"})
    obj = store.put_tree(_tree(tmp_path / "src"))
    path = store.fetch(obj.uri)
    (path / "a.txt").write_text("ALPHA")
    with pytest.raises(StorageIntegrityError, match="was modified"):
        store.fetch(obj.uri)
    assert store.fetch(obj.uri, verify=False) == path


def test_renaming_a_file_changes_the_hash(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    before = sha256_path(src)[0]
    (src / "a.txt").rename(src / "c.txt")
    assert sha256_path(src)[0] != before


def test_failed_copy_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStorage.from_options({"root": tmp_path / "store"})
    src = _tree(tmp_path / "src")

    def broken_copytree(a, b, **kwargs):
        Path(b).mkdir(parents=True)
        (Path(b) / "partial").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr("quantmill.storage.local.shutil.copytree", broken_copytree)
    with pytest.raises(OSError, match="disk full"):
        store.put_tree(src)
    assert not store.object_path(sha256_path(src)[0]).exists()
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert not any((tmp_path / "store" / "tmp").iterdir())


def test_damaged_object_is_replaced_on_put(tmp_path: Path) -> None:
    store = LocalStorage.from_options({"root": tmp_path / "store"})
    src = _tree(tmp_path / "src")
    obj = store.put_tree(src)
    (store.fetch(obj.uri) / "a.txt").write_text("tampered")
    again = store.put_tree(src)
    assert again == obj
    assert (store.fetch(obj.uri) / "a.txt").read_text() == "alpha"


def test_publish_writes_a_plain_directory_at_once(tmp_path: Path) -> None:
    store = LocalStorage.from_options({"root": tmp_path / "store"})
    src = _tree(tmp_path / "src")
    target = tmp_path / "published" / "model"
    published = store.publish(src, str(target))
    assert published.uri == target.resolve().as_uri()
    assert published.sha256 == sha256_path(src)[0] == sha256_path(target)[0]
    assert (target / "sub" / "b.bin").read_bytes() == bytes(range(256))
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no staging left beside it
    assert store.publish(src, target.as_uri()).sha256 == published.sha256  # identical: no-op
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("different")
    with pytest.raises(QuantmillError, match="already exists with other content"):
        store.publish(tmp_path / "other", str(target))
    assert (target / "a.txt").read_text() == "alpha"  # the published copy is untouched


def test_rehash_reports_missing_content(tmp_path: Path) -> None:
    store = LocalStorage.from_options({"root": tmp_path / "store"})
    obj = store.put_tree(_tree(tmp_path / "src"))
    assert store.rehash(obj.uri) == (obj.sha256, obj.size_bytes)
    import shutil

    shutil.rmtree(store.fetch(obj.uri))
    with pytest.raises(FileNotFoundError, match="missing"):
        store.rehash(obj.uri)
