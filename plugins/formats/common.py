"""The last steps every checkpoint reader shares, once its quantized modules are in place.

Why one function: the GPTQ, look-up-table and compressed-tensors readers each build their own
quantized modules, then must do the same delicate things in the same order (cast only the float
tensors, keep tied embeddings tied, assign without copying, rebuild the non-persistent buffers,
find the tokenizer). Written once, a fix reaches all three.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantmill.plugins.base import LoadedModel, ModelSource
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models.headers import check_safetensors_file
from quantmill.plugins.models.materialize import alias_tied, materialize_non_persistent_buffers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def swap_quantized_module(model: torch.nn.Module, name: str,
                          build: Callable[[torch.nn.Module], torch.nn.Module]) -> torch.nn.Module:
    """Replace the model's module ``name`` by ``build(module)`` (a reader's quantized linear),
    refusing a checkpoint that names a module the model lacks; returns the new module."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise QuantmillError(f"checkpoint quantizes '{name}', which the model lacks") from None
    new = build(module)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def assign_checkpoint_tensors(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    keep_dtype: set[str],
    dtype: torch.dtype,
    path: Path,
    device: torch.device | str,
) -> None:
    """Load ``tensors`` into ``model`` (strict, by assignment) and leave it ready to run.

    Float tensors are cast to ``dtype`` except those named in ``keep_dtype`` (scales, codebooks:
    their precision is part of the format). ``tensors`` is emptied: the model owns them now.
    """
    for key, tensor in tensors.items():
        if key not in keep_dtype and tensor.is_floating_point() and tensor.dtype != dtype:
            tensors[key] = tensor.to(dtype)
    alias_tied(model, tensors)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise QuantmillError(f"{path} does not match its config.json: {exc}") from exc
    tensors.clear()
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    materialize_non_persistent_buffers(model, device)
    model.eval()


def directory_tokenizer(path: Path) -> Any | None:
    """The tokenizer saved next to a checkpoint, or None when the directory has none."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class OwnLayoutSource(ModelSource):
    """A checkpoint directory in one of quantmill's own layouts (``model.safetensors`` and a
    ``config.json`` whose quantization_config ``read_config`` checks)."""

    #: the layout's name in messages ("lut", "trellis")
    layout: str

    @abc.abstractmethod
    def read_config(self, path: Path) -> Any:
        """The layout's checked quantization_config (raises QuantmillError otherwise)."""

    @abc.abstractmethod
    def load_checked(self, path: Path, device: torch.device) -> LoadedModel:
        """Load a directory ``check`` has accepted."""

    def check(self, path: Path) -> None:
        if not path.is_dir():
            raise QuantmillError(f"{self.layout} checkpoint path is not a directory: {path}")
        if not (path / "model.safetensors").is_file():
            raise QuantmillError(f"no model.safetensors in {self.layout} checkpoint "
                                 f"directory {path}")
        check_safetensors_file(path / "model.safetensors")
        self.read_config(path)

    def accepts(self, path: Path) -> bool:
        try:
            self.check(path)
        except QuantmillError:
            return False
        return True

    def load(self, path: Path, device: torch.device) -> LoadedModel:
        self.check(path)
        return self.load_checked(path, device)

    def load_tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
