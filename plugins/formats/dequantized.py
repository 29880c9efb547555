"""The ``dequantized`` exporter: plain fp16 Hugging Face safetensors from any quantized weights.

Why: a look-up-table checkpoint (or a GPTQ width no kernel supports) runs nowhere but in
quantmill. Writing the quantized weights back as ordinary fp16 tensors gives a directory every
runtime loads (``transformers``, llama.cpp converters, vLLM) that computes exactly what the
quantized model computes, at fp16 size. It is not smaller than the original, so it is labelled
for what it is: the export summary (stored in the registry with the checkpoint) and
``config.json`` (key ``quantmill_dequantized_from``) say which kind of weights at which bits
it was dequantized from. ``format_name`` is ``hf``: the ``hf`` model source reads it back.

Sample recipe section::

    export: {format: dequantized}

The directory layout (``save_hf_layout``) is shared with the ``lut`` format, which is this
layout with packed tensors in place of some fp16 weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from quantmill.plugins.base import (
    Exporter,
    LoadedModel,
    QuantizationResult,
    QuantizedTensor,
    weight_kind,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.formats.gptq import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    WEIGHTS_NAME,
    _config_dict,
    _dump_json,
    _generation_config_dict,
    _prepare_out_dir,
    float_tensors,
)
from quantmill.plugins.hookspecs import hookimpl

CONFIG_KEY = "quantmill_dequantized_from"


def check_module(model: torch.nn.Module, name: str, weight: QuantizedTensor) -> torch.nn.Module:
    """The model's module ``name``, which must be a linear layer of the weight's shape."""
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise QuantmillError(f"quantized module '{name}' does not exist in the model")
    shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if not isinstance(module, torch.nn.Linear) or shape != (weight.out_features,
                                                            weight.in_features):
        what = "x".join(map(str, shape)) if isinstance(module, torch.nn.Linear) else "not linear"
        raise QuantmillError(f"quantized module '{name}' is {weight.out_features}x"
                             f"{weight.in_features} but the model's module is {what}")
    return module


def module_bias(module: torch.nn.Module, weight: QuantizedTensor) -> torch.Tensor | None:
    """The bias to write: the quantizer's copy, else the module's own (biases stay float)."""
    if weight.bias is not None:
        return weight.bias
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def save_hf_layout(loaded: LoadedModel, tensors: dict[str, torch.Tensor],
                   config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write ``model.safetensors``, ``config.json``, the generation config and the tokenizer.

    Everything goes into a temporary sibling directory renamed to ``out_dir`` at the end, so an
    error never leaves a half-written checkpoint; ``out_dir`` must be absent or empty. Returns
    the files written and their total size.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    generation = _generation_config_dict(loaded.model)
    mode = out_dir.stat().st_mode & 0o777 if out_dir.exists() else 0o755
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _dump_json(config, tmp / CONFIG_NAME)
        if generation is not None:
            _dump_json(generation, tmp / GENERATION_CONFIG_NAME)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp))
        os.chmod(tmp, mode)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return {"out_dir": str(out_dir), "files": files,
            "size_bytes": sum((out_dir / f).stat().st_size for f in files)}


def provenance(result: QuantizationResult) -> dict[str, Any]:
    """What the weights were before dequantization: kinds, bits, method, and a one-line label."""
    kinds = sorted({weight_kind(w) for w in result.weights.values()})
    bits = Counter(w.bits for w in result.weights.values())
    widths = sorted(bits)
    width = f"{widths[0]}-bit" if len(widths) == 1 else f"mixed {widths[0]}-{widths[-1]}-bit"
    method = result.details.get("method")
    label = (f"fp16 weights dequantized from {width} {' and '.join(kinds)} weights"
             + (f" ({method})" if method else ""))
    return {"weight_kinds": kinds, "bits": widths[0] if len(widths) == 1 else dict(bits),
            "method": method, "label": label}


def write_dequantized_checkpoint(loaded: LoadedModel, result: QuantizationResult,
                                 out_dir: Path) -> dict[str, Any]:
    """Write ``loaded.model`` with ``result``'s weights dequantized, as fp16 HF safetensors."""
    if not result.weights:
        raise QuantmillError("nothing to export: the quantization result holds no weights")
    model = loaded.model
    tensors, untie = float_tensors(model, set(result.weights), result.float_overrides)
    for name, weight in result.weights.items():
        module = check_module(model, name, weight)
        tensors[f"{name}.weight"] = weight.dequantize(torch.float16).cpu().contiguous()
        bias = module_bias(module, weight)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().to("cpu", torch.float16).contiguous()
    origin = provenance(result)
    config = _config_dict(model, {}, untie=untie)
    del config["quantization_config"]  # plain weights: nothing for a runtime to decode
    config[CONFIG_KEY] = origin
    summary = save_hf_layout(loaded, tensors, config, out_dir)
    return {"format": "hf", "dequantized": True, "dequantized_from": origin,
            "label": origin["label"], "quantized_modules": len(result.weights),
            "bits": {name: w.bits for name, w in result.weights.items()}, **summary}


class DequantizedExporter(Exporter):
    """Plain fp16 safetensors for runtimes without a kernel for the quantized format."""

    name = "dequantized"
    format_name = "hf"
    accepts_weight_kinds = frozenset({"uniform", "codebook", "trellis"})
    accepts_float_overrides = True

    def export(
        self, loaded: LoadedModel, result: QuantizationResult, out_dir: Path
    ) -> dict[str, Any]:
        return write_dequantized_checkpoint(loaded, result, out_dir)


@hookimpl
def register_exporters() -> list[type[Exporter]]:
    return [DequantizedExporter]
