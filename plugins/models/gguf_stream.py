"""Reading a GGUF file one tensor at a time.

transformers' ``load_gguf_checkpoint`` dequantizes every tensor into a dict; here each tensor is
dequantized and converted by transformers' own per-architecture processor (e.g. the q/k head
permutation of llama.cpp) on demand, from the memory-mapped file: streamed in order for a full
load, or fetched by name for deferred weights (``plugins.models.deferred``).

Only architectures whose GGUF name equals their transformers ``model_type`` and whose processor
keeps tensor names are handled; others fall back to transformers' loader.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

STREAMABLE = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"})


def _architecture(reader: object) -> str:
    from transformers.modeling_gguf_pytorch_utils import read_field

    return str(read_field(reader, "general.architecture")[0])


ROWS_PER_CHUNK = 4096


def _dequantize_rows(data: np.ndarray, tensor_type: Any) -> np.ndarray:
    """``gguf.dequantize`` a few thousand rows at a time into one float32 array.

    Dequantizing a whole tensor at once makes several full-size temporaries (block scales,
    unpacked nibbles...): +280 MB for SmolLM2's 113 MB embedding. GGUF quantization blocks run
    along a row, so rows can be dequantized independently.
    """
    from gguf import dequantize

    if data.ndim < 2 or data.shape[0] <= ROWS_PER_CHUNK:
        return dequantize(data, tensor_type)
    first = dequantize(data[:ROWS_PER_CHUNK], tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    out[:ROWS_PER_CHUNK] = first
    for start in range(ROWS_PER_CHUNK, data.shape[0], ROWS_PER_CHUNK):
        out[start : start + ROWS_PER_CHUNK] = dequantize(data[start : start + ROWS_PER_CHUNK],
                                                         tensor_type)
    return out


class TensorRef(NamedTuple):
    """Where one tensor lies in the mapped file and how to read it (GGUF name and type)."""

    name: str
    tensor_type: Any
    data_offset: int
    n_bytes: int
    shape: tuple[int, ...]
    dtype: np.dtype


class GGUFTensors:
    """The tensors of a GGUF file under their transformers names, dequantized on demand.

    ``GGUFReader`` parses the file's metadata and tensor headers into small numpy views, one per
    value: for SmolLM2's 49k-token vocabulary and 272 tensors that is ~150 MB of Python objects.
    Only each tensor's type, offset, size and shape are kept (``TensorRef``); the reader's parsed
    fields and tensor list are dropped right away, and the data stays memory-mapped.
    """

    def __init__(self, path: Path, model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                 config: dict | None = None):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        self.dtype = dtype
        if config is None:
            config = load_gguf_checkpoint(str(path), return_tensors=False).get("config", {})
        self.config = config
        self.reader = GGUFReader(str(path))  # memory-mapped
        self.architecture = _architecture(self.reader)
        self.reader.fields.clear()  # the metadata (vocabulary...) is not needed from here on
        self.processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(
            config=self.config)
        self.mapping = get_gguf_hf_weights_map(model, self.processor)
        self.index = {self.mapping[t.name]: TensorRef(t.name, t.tensor_type, int(t.data_offset),
                                                      int(t.n_bytes), tuple(t.data.shape),
                                                      t.data.dtype)
                      for t in self.reader.tensors if t.name in self.mapping}
        self.reader.tensors = []

    def names(self) -> list[str]:
        return list(self.index)

    def load(self, name: str) -> torch.Tensor:

        tensor = self.index[name]
        data = self.reader.data[tensor.data_offset : tensor.data_offset + tensor.n_bytes]
        weights = _dequantize_rows(data.view(tensor.dtype).reshape(tensor.shape),
                                   tensor.tensor_type)
        self._drop_pages(tensor.data_offset, tensor.n_bytes)
        result = self.processor.process(weights=weights, name=tensor.name,
                                        tensor_key_mapping=self.mapping,
                                        parsed_parameters={"config": self.config, "tensors": {}})
        array = result.weights
        if not array.flags.writeable:  # a view of the read-only mapped file
            array = np.array(array)  # a private, writable copy for torch.from_numpy
        # a writable view of a freshly dequantized array is used as it is (no second copy: the
        # embedding of SmolLM2 alone is 113 MB in float32)
        return torch.from_numpy(array).to(self.dtype)

    def _drop_pages(self, offset: int, length: int) -> None:
        """Let the kernel drop the file pages just read from this process's resident set.

        Each tensor is read once (dequantized into its own array), but its mapped pages would
        otherwise stay resident and count towards the job's peak memory: the whole file, by the
        end of a layer-by-layer pass. They remain in the page cache, so a re-read costs little.
        """
        handle = getattr(self.reader.data, "_mmap", None)
        if handle is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        try:
            handle.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
        except (OSError, ValueError):  # not all platforms/mappings allow it; only an optimisation
            pass

    def fetch(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.load(name) for name in names}

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.index:
            yield name, self.load(name)

