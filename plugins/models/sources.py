"""Built-in model sources: Hugging Face safetensors directories, GGUF files, and quantmill's own
GPTQ-layout checkpoints.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused outright: unpickling runs
arbitrary code, and an audited pipeline must not execute what it is asked to measure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from quantmill.plugins.base import LoadedModel, ModelSource
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.models import deferred as deferred_weights
from quantmill.plugins.models.gguf_stream import STREAMABLE, GGUFTensors
from quantmill.plugins.models.headers import check_gguf_file, check_safetensors_file
from quantmill.plugins.models.lazy_tokenizer import LazyTokenizer
from quantmill.plugins.models.materialize import alias_tied, materialize_non_persistent_buffers
from quantmill.plugins.models.memory import release_free_memory
from quantmill.plugins.models.quant_linear import GPTQ_METHODS

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
GGUF_MAGIC = b"GGUF"


def _safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _has_quantization_config(path: Path, *methods: str) -> bool:
    for name in ("quantize_config.json", "config.json"):
        config_file = path / name
        if not config_file.is_file():
            continue
        try:
            data = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        section = data.get("quantization_config", data) if name == "config.json" else data
        if isinstance(section, dict) and section.get("quant_method") in methods:
            return True
    return False


def check_weights_directory(path: Path) -> None:
    """Raise a one-line QuantmillError unless ``path`` is a directory with safetensors weights."""
    if not path.exists():
        raise QuantmillError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise QuantmillError(f"model path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise QuantmillError(f"no config.json in model directory {path}")
    files = _safetensors_files(path)
    if files:
        for file in files:
            check_safetensors_file(file)
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise QuantmillError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); quantmill refuses "
            "pickle files because loading them can run arbitrary code: convert them to "
            "safetensors first"
        )
    raise QuantmillError(f"no weights in model directory {path} (expected *.safetensors)")


class SafetensorsTensors:
    """Tensors of safetensors files by name, read one at a time (float32, CPU)."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self.where[key] = file

    def names(self) -> list[str]:
        return list(self.where)

    def fetch(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for file in {self.where[n] for n in names}:
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    if self.where[name] == file:
                        tensor = handle.get_tensor(name)
                        out[name] = tensor.float() if tensor.is_floating_point() else tensor
        return out


def _assign(model: torch.nn.Module, tensors: dict[str, torch.Tensor], deferred: set[str],
            device: torch.device, path: Path) -> None:
    """Assign loaded tensors into a meta-device model; only ``deferred`` may stay meta."""
    alias_tied(model, tensors)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    deferred_params = {id(params[k]) for k in deferred if k in params}
    # a key tied to a deferred one (lm_head tied to the embedding) is deferred with it
    missing = {k for k in set(result.missing_keys) - deferred
               if id(params.get(k)) not in deferred_params}
    if missing or result.unexpected_keys:
        raise QuantmillError(
            f"{path}: weights do not fit the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]})"
        )
    model.tie_weights()
    materialize_non_persistent_buffers(model, device, allowed_meta=deferred)


class HFDirectorySource(ModelSource):
    """A local Hugging Face model directory with safetensors weights."""

    name = "hf"

    def check(self, path: Path) -> None:
        check_weights_directory(path)

    def accepts(self, path: Path) -> bool:
        return path.is_dir() and not _has_quantization_config(path, *GPTQ_METHODS,
                                                              "compressed-tensors",
                                                              "quantmill_trellis")

    def load(self, path: Path, device: torch.device) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.check(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, use_safetensors=True, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        files = _safetensors_files(path) + [path / "config.json"]
        return LoadedModel(model.to(device).eval(), tokenizer, path, "hf-safetensors", files)

    def load_deferred(self, path: Path, device: torch.device) -> LoadedModel:
        """Decoder-block linear weights stay on the meta device, read from the safetensors
        files (memory-mapped by ``safe_open``) when a consumer fetches them."""
        from transformers import AutoConfig, AutoModelForCausalLM

        self.check(path)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fetcher = SafetensorsTensors(_safetensors_files(path))
        is_deferred = deferred_weights.deferrable(model)
        deferred = {name for name in fetcher.names() if is_deferred(name)}
        tensors = fetcher.fetch([n for n in fetcher.names() if n not in deferred])
        tensors = {k: v.to(device) for k, v in tensors.items()}
        if deferred:
            deferred_weights.attach(model, fetcher)
        _assign(model, tensors, deferred, device, path)
        tokenizer = LazyTokenizer(lambda: self.load_tokenizer(path))
        release_free_memory()
        files = _safetensors_files(path) + [path / "config.json"]
        return LoadedModel(model.eval(), tokenizer, path, "hf-safetensors", files)

    def load_tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)


class GGUFSource(ModelSource):
    """A ``.gguf`` file, dequantized to float32 by transformers (needs the ``gguf`` package)."""

    name = "gguf"

    def check(self, path: Path) -> None:
        if not path.exists():
            raise QuantmillError(f"model path does not exist: {path}")
        if not path.is_file():
            raise QuantmillError(f"GGUF model path is not a file: {path}")
        with path.open("rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise QuantmillError(f"{path} is not a GGUF file (bad magic bytes)")
        check_gguf_file(path)

    def accepts(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".gguf"

    def load(self, path: Path, device: torch.device) -> LoadedModel:
        """Dequantize the GGUF tensors straight into a model skeleton built on the meta device.

        transformers' own ``from_pretrained(gguf_file=...)`` marks the model as quantized (it
        then refuses to save it) and holds more than one copy of the weights while loading;
        here the tensors are assigned in place, so peak memory is one float32 copy.
        """
        return self._load(path, device, defer=False)

    def load_deferred(self, path: Path, device: torch.device) -> LoadedModel:
        return self._load(path, device, defer=True)

    def _load(self, path: Path, device: torch.device, defer: bool) -> LoadedModel:
        from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        self.check(path)
        kwargs = {"gguf_file": path.name, "local_files_only": True}
        # the metadata is parsed once, for the config and the tensor processor alike (this is
        # what AutoConfig.from_pretrained(gguf_file=...) does with it)
        config_dict = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        model_type = config_dict.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise QuantmillError(f"{path}: unsupported GGUF architecture '{model_type}'")
        config = CONFIG_MAPPING[model_type].from_dict(config_dict)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        deferred: set[str] = set()
        source = (GGUFTensors(path, model, config=config_dict)
                  if config.model_type in STREAMABLE else None)
        if source is not None and source.architecture == config.model_type:
            is_deferred = deferred_weights.deferrable(model) if defer else None
            tensors = {}
            for name in source.names():
                if is_deferred is not None and is_deferred(name):
                    deferred.add(name)
                else:
                    tensors[name] = source.load(name).to(device)
            if deferred:
                deferred_weights.attach(model, source)
        else:  # architectures the streaming reader does not know: everything, eagerly
            tensors = load_gguf_checkpoint(str(path), return_tensors=True,
                                           model_to_load=model,
                                           torch_dtype=torch.float32)["tensors"]
            tensors = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(v)).to(device)
                       for k, v in tensors.items()}
        _assign(model, tensors, deferred, device, path)
        # a deferred load is for layer-by-layer quantization, which needs no tokenizer until
        # the checkpoint is written
        tokenizer = (LazyTokenizer(lambda: self.load_tokenizer(path)) if defer
                     else AutoTokenizer.from_pretrained(path.parent, **kwargs))
        release_free_memory()  # the parsed metadata and transient tensors, now freed
        return LoadedModel(model.eval(), tokenizer, path, "gguf", [path])

    def load_tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                             local_files_only=True)


class GPTQCheckpointSource(ModelSource):
    """A GPTQ-layout checkpoint directory (quantmill's own output, or AutoGPTQ/GPTQModel's)."""

    name = "gptq"

    def check(self, path: Path) -> None:
        check_weights_directory(path)
        if not _has_quantization_config(path, *GPTQ_METHODS):
            raise QuantmillError(f"{path} has no GPTQ quantization_config")

    def accepts(self, path: Path) -> bool:
        return path.is_dir() and _has_quantization_config(path, *GPTQ_METHODS)

    def load(self, path: Path, device: torch.device) -> LoadedModel:
        from quantmill.plugins.formats.gptq import load_gptq_checkpoint

        self.check(path)
        return load_gptq_checkpoint(path, device=device)

    def load_tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)


@hookimpl
def register_model_sources() -> list[type[ModelSource]]:
    return [GPTQCheckpointSource, HFDirectorySource, GGUFSource]
