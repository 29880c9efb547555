"""Finished blocks kept in a job's work area, so an interrupted job continues from the first
unfinished block and produces the same bytes as an uninterrupted one.

What is kept (each object written whole, under a name the pipeline chooses):

- ``block-00007.safetensors``: block 7's outcome: its quantized weights, changed float
  tensors and per-module details. Tensors go into the safetensors file, everything else
  (integers, floats, strings, the dataclass each weight is) into its JSON metadata, so nothing
  is unpickled on the way back: only dataclasses of ``quantmill.plugins`` are rebuilt.
- ``stream-00007.safetensors``: what the next block needs after block 7: the calibration
  activations (the block's outputs, computed with its quantized weights) and the method's own
  streams (e.g. block tuning's float stream). Only the latest is kept: the one before is
  removed once the index names the new one.
- ``index.json``, written last: the key (the job's fingerprint), the last finished block and
  the sha256 of every file above. A file that does not hash to its entry (truncated, changed)
  makes the whole area unusable: the job starts afresh rather than trusting any of it, because
  the stream after a later block cannot be rebuilt without the damaged one.

``BlockStore`` is the storage the work area lives in; ``DirectoryBlockStore`` keeps it in a
local directory (the flow supplies one inside its configured storage).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

INDEX = "index.json"
#: only dataclasses from these modules are rebuilt from a work area
_TRUSTED_MODULES = ("quantmill.plugins.",)


class BlockStore(Protocol):
    """Named byte objects of one job's work area. ``write`` must be atomic: an object is either
    absent or whole (a crash mid-write leaves the previous version or nothing)."""

    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes) -> None: ...

    def remove(self, name: str) -> None: ...

    def clear(self) -> None: ...


class DirectoryBlockStore:
    """A work area in a local directory: one file per object, replaced by atomic rename."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.root / name)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def clear(self) -> None:
        if self.root.is_dir():
            for path in self.root.iterdir():
                path.unlink()
            self.root.rmdir()


_KEY = re.compile(r"^[0-9a-f]{16,64}$")


def work_key(key: str) -> str:
    """A work-area key as storage may use it in a path: a hex fingerprint, nothing else (a key
    is never a path, so no work area can name a place outside its backend's work folder)."""
    if not _KEY.match(key):
        raise ValueError(f"not a work-area key: {key!r}")
    return key


def block_object(index: int) -> str:
    return f"block-{index:05d}.safetensors"


def stream_object(index: int) -> str:
    return f"stream-{index:05d}.safetensors"


# --- values <-> (tensors, JSON) ------------------------------------------------------------------


class _Tensors:
    """The tensors of one object being written: one entry per tensor object (a rotation
    shared by q/k/v is written once and shared again when read back); a tensor whose memory
    another one already uses (rows split from one result) is copied, as safetensors requires."""

    def __init__(self) -> None:
        self.by_path: dict[str, torch.Tensor] = {}
        self._paths: dict[int, str] = {}
        self._storages: set[int] = set()

    def add(self, value: torch.Tensor, path: str) -> str:
        known = self._paths.get(id(value))
        if known is not None:
            return known
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in self._storages:
            tensor = tensor.clone()
        self._storages.add(tensor.untyped_storage().data_ptr())
        self._paths[id(value)] = path
        self.by_path[path] = tensor
        return path


def _flatten(value: Any, path: str, tensors: _Tensors) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": tensors.add(value, path)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _flatten(getattr(value, f.name), f"{path}.{f.name}", tensors)
                           for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{path}: only string keys can be kept in a work area")
        return {"dict": {k: _flatten(v, f"{path}.{k}", tensors) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"list" if isinstance(value, list) else "tuple":
                [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"{path}: a {type(value).__name__} cannot be kept in a work area")


def _trusted_class(spec: str) -> type:
    module, _, name = spec.partition(":")
    if not module.startswith(_TRUSTED_MODULES):
        raise ValueError(f"work area names a class outside quantmill.plugins: {spec}")
    cls: Any = importlib.import_module(module)
    for part in name.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"work area names {spec}, which is not a dataclass")
    return cls


def _rebuild(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    kind = next(iter(node))
    payload = node[kind]
    if kind == "tensor":
        return tensors[payload]
    if kind == "dataclass":
        cls = _trusted_class(payload)
        obj = object.__new__(cls)  # fields as stored; no __init__/__post_init__ side effects
        for name, child in node["fields"].items():
            object.__setattr__(obj, name, _rebuild(child, tensors))
        return obj
    if kind == "dict":
        return {k: _rebuild(v, tensors) for k, v in payload.items()}
    if kind in ("list", "tuple"):
        items = [_rebuild(v, tensors) for v in payload]
        return items if kind == "list" else tuple(items)
    if kind == "dtype":
        return getattr(torch, payload)
    if kind == "value":
        return payload
    raise ValueError(f"unknown work-area entry {kind!r}")


def encode(value: Any) -> bytes:
    """``value`` (tensors, quantmill dataclasses, containers, scalars) as safetensors bytes."""
    tensors = _Tensors()
    tree = _flatten(value, "v", tensors)
    return save_tensors(tensors.by_path, metadata={"quantmill": json.dumps(tree)})


def decode(data: bytes) -> Any:
    """The value ``encode`` wrote (raises ValueError on anything it could not have written)."""
    try:
        tensors = load_tensors(data)
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_length]).get("__metadata__", {})
        return _rebuild(json.loads(metadata["quantmill"]), tensors)
    except ValueError:
        raise  # a refused class, or JSON that is not ours
    except Exception as exc:  # missing keys, unknown names, safetensors' damaged-file errors
        raise ValueError(f"not a usable work-area object ({type(exc).__name__}: {exc})") \
            from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class WorkArea:
    """The pipeline's view of a ``BlockStore``: which blocks are finished, reading them back
    (checked against the index) and recording a newly finished block."""

    def __init__(self, store: BlockStore, key: str):
        self.store = store
        self.key = key
        self._hashes: dict[str, str] = {}
        #: why the area could not be used, for the log ("" when it was, or was empty)
        self.discarded = ""

    def finished(self) -> tuple[int, list[Any], Any] | None:
        """``(first unfinished block, outcomes of the finished ones, stream)``, or None when
        there is nothing usable (empty, another key, or damaged: then it is cleared)."""
        raw = self.store.read(INDEX)
        if raw is None:
            return None
        try:
            index = json.loads(raw)
            if index.get("key") != self.key:
                return self._discard("it belongs to other inputs or settings")
            last, hashes = int(index["last_block"]), dict(index["files"])
            outcomes = [self._checked(block_object(i), hashes) for i in range(last + 1)]
            stream = self._checked(stream_object(last), hashes)
        except ValueError as exc:
            return self._discard(str(exc))
        self._hashes = hashes
        return last + 1, outcomes, stream

    def _checked(self, name: str, hashes: dict[str, str]) -> Any:
        data = self.store.read(name)
        if data is None:
            raise ValueError(f"{name} is missing")
        if sha256_bytes(data) != hashes.get(name):
            raise ValueError(f"{name} does not match its recorded sha256")
        return decode(data)

    def _discard(self, reason: str) -> None:
        self.discarded = reason
        self.store.clear()
        self._hashes = {}
        return None

    def index_extra(self) -> dict[str, Any]:
        """More facts for the index (who the area belongs to), for listings."""
        return {}

    def clear(self) -> None:
        self.store.clear()

    def record(self, index: int, outcome: Any, stream: Any) -> None:
        """Block ``index`` is finished: its outcome and the stream after it, then the index
        naming both, then the previous stream goes. A crash between any two writes leaves an
        index whose files are all present and whole."""
        previous = stream_object(index - 1)
        for name, value in ((block_object(index), outcome), (stream_object(index), stream)):
            data = encode(value)
            self.store.write(name, data)
            self._hashes[name] = sha256_bytes(data)
        self._hashes.pop(previous, None)
        self.store.write(INDEX, json.dumps({"key": self.key, "last_block": index,
                                            "files": self._hashes, **self.index_extra()},
                                           indent=1).encode())
        self.store.remove(previous)
