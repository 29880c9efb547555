"""Cheap checks of model files at validation: read their headers, not their tensors, so a corrupt
or truncated safetensors or GGUF file is refused with one line naming the file before any work
starts, instead of failing inside a task with the library's own message."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from quantmill.plugins.errors import QuantmillError

#: bytes per element of each safetensors dtype
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                "F64": 8}
#: the safetensors library's own limit on the JSON header
_MAX_HEADER = 100_000_000


def check_safetensors_file(path: Path) -> None:
    """Refuse a safetensors file whose header is unreadable or whose tensors do not fit in it."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise QuantmillError(f"{path} is not a safetensors file: {size} bytes, shorter "
                                 "than its header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER or 8 + length > size:
            raise QuantmillError(f"{path} is truncated or not a safetensors file: its header "
                                 f"claims {length} bytes, the file has {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantmillError(f"{path} has a corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise QuantmillError(f"{path} has a corrupt safetensors header (not a JSON object)")
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        _check_tensor(path, name, entry, data)


def _check_tensor(path: Path, name: str, entry: object, data: int) -> None:
    try:
        dtype, shape = entry["dtype"], entry["shape"]  # type: ignore[index]
        start, end = entry["data_offsets"]  # type: ignore[index]
        count = math.prod(int(d) for d in shape)
        expected = count * _DTYPE_BYTES[dtype]
    except (KeyError, TypeError, ValueError):
        raise QuantmillError(f"{path}: tensor {name!r} has a corrupt header entry") from None
    if not (0 <= start <= end) or end - start != expected:
        raise QuantmillError(f"{path}: tensor {name!r} ({dtype} {list(shape)}) does not match "
                             f"its byte range {start}-{end}")
    if end > data:
        raise QuantmillError(f"{path} is truncated: tensor {name!r} ends at byte {end} of "
                             f"the data, which has {data}")


def check_gguf_file(path: Path) -> None:
    """Refuse a GGUF file whose header or tensor table is unreadable or runs past its end.

    ``gguf.GGUFReader`` parses the metadata and tensor table and maps (does not read) the
    tensor data, so this costs about as much as opening the file."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except (ValueError, struct.error, IndexError, KeyError, OverflowError,
            UnicodeDecodeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QuantmillError(f"{path} is truncated or not a valid GGUF file ({detail})") \
            from None
