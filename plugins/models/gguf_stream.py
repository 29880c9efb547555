"""Reading a GGUF file one tensor at a time.

transformers' ``load_gguf_checkpoint`` dequantizes every tensor into a dict and copies each
array once more before converting it, so loading briefly needs well over two float32 copies of
the largest tensors on top of the model. Here each tensor is dequantized, converted by
transformers' own per-architecture processor (e.g. the q/k head permutation of llama.cpp) and
handed to the caller before the next one is read; the file itself is memory-mapped by ``gguf``.

Only architectures whose GGUF name equals their transformers ``model_type`` and whose processor
needs no cross-tensor state are streamed; others fall back to transformers' loader.
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


def stream_gguf_tensors(
    path: Path, model: torch.nn.Module, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(transformers parameter name, tensor)`` for every tensor of the file that the
    (meta-device) ``model`` has, one at a time."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # metadata only
    config = parsed.get("config", {})
    reader = GGUFReader(str(path))
    architecture = gguf_architecture(path)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    mapping = get_gguf_hf_weights_map(model, processor)
    state = {"config": config, "tensors": {}}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(weights=weights, name=tensor.name,
                                   tensor_key_mapping=mapping, parsed_parameters=state)
        if result.name not in mapping:
            continue
        array = result.weights
        if not (array.flags.writeable and array.flags.owndata):
            array = np.array(array)  # a private, writable copy for torch.from_numpy
        yield mapping[result.name], torch.from_numpy(array).to(dtype)
