"""Reading a GGUF file one tensor at a time.

transformers' ``load_gguf_checkpoint`` dequantizes every tensor into a dict; here each tensor is
dequantized and converted by transformers' own per-architecture processor (e.g. the q/k head
permutation of llama.cpp) on demand, from the memory-mapped file: streamed in order for a full
load, or fetched by name for deferred weights (``plugins.models.deferred``).

Only architectures whose GGUF name equals their transformers ``model_type`` and whose processor
keeps tensor names are handled; others fall back to transformers' loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

STREAMABLE = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"})


def gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    return str(read_field(GGUFReader(str(path)), "general.architecture")[0])


class GGUFTensors:
    """The tensors of a GGUF file under their transformers names, dequantized on demand."""

    def __init__(self, path: Path, model: torch.nn.Module, dtype: torch.dtype = torch.float32):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        self.dtype = dtype
        self.config = load_gguf_checkpoint(str(path), return_tensors=False).get("config", {})
        self.reader = GGUFReader(str(path))  # memory-mapped
        self.processor = TENSOR_PROCESSORS.get(gguf_architecture(path), TensorProcessor)(
            config=self.config)
        self.mapping = get_gguf_hf_weights_map(model, self.processor)
        self.index = {self.mapping[t.name]: t for t in self.reader.tensors
                      if t.name in self.mapping}

    def names(self) -> list[str]:
        return list(self.index)

    def load(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        tensor = self.index[name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = self.processor.process(weights=weights, name=tensor.name,
                                        tensor_key_mapping=self.mapping,
                                        parsed_parameters={"config": self.config, "tensors": {}})
        array = result.weights
        if not (array.flags.writeable and array.flags.owndata):
            array = np.array(array)  # a private, writable copy for torch.from_numpy
        return torch.from_numpy(array).to(self.dtype)

    def fetch(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.load(name) for name in names}

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.index:
            yield name, self.load(name)

