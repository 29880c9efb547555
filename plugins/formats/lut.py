"""The ``quantmill-lut`` checkpoint format (look-up tables): writer, reader, the ``lut`` exporter
and the ``lut`` model source.

Why a format of our own: GPTQ-style layouts store affine integers (scale and zero per group) and
cannot express a per-row table of arbitrary values; no common runtime has a look-up-table layout
for per-row codebooks. Users of other runtimes export ``dequantized`` instead.

Layout, format version 1. A Hugging Face model directory (the ``dequantized`` layout) with:

* ``model.safetensors``, per clustered linear ``<name>``:

  - ``<name>.qindices`` int32 [out, ceil(in / 32) * bits]: row i holds the indices of W[i, :]
    as one little-endian bit stream of ``bits``-bit values (index j starts at stream bit
    j * bits; word w holds stream bits 32w .. 32w + 31; values may straddle two words, as
    ``packing.pack_cols`` writes them), zero-padded to a multiple of 32 indices;
  - ``<name>.codebook`` fp16 [ceil(out / r), 2**bits], r = rows_per_codebook: row g is the
    table of output rows g*r .. g*r + r - 1, so ``W[i, j] = codebook[i // r, idx[i, j]]``;
  - ``<name>.bias`` fp16 [out] when the layer has a bias;

  every other tensor in fp16 (a tied output embedding is stored once, as the input embedding,
  unless it was itself quantized; then the tie is broken and config.json says so).
* ``config.json``: the model's config (dtype float16) with ``quantization_config``::

    {"quant_method": "quantmill_lut", "format_version": 1,
     "bits": 3, "rows_per_codebook": 1,                      # the most common (defaults)
     "modules": {"model.layers.0.self_attn.q_proj": {"bits": 3, "rows_per_codebook": 1}, ...},
     "meta": {"quantizer": ["quantmill:<version>"], "uri": "..."}}

  ``modules`` lists every quantized linear explicitly, so each may have its own bit width.
* ``generation_config.json`` and the tokenizer files when the model has them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from quantmill.plugins.base import (
    ClusteredWeight,
    Exporter,
    LoadedModel,
    ModelSource,
    QuantizationResult,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.formats.common import (
    OwnLayoutSource,
    assign_checkpoint_tensors,
    directory_tokenizer,
    swap_quantized_module,
)
from quantmill.plugins.formats.dequantized import check_module, module_bias, save_hf_layout
from quantmill.plugins.formats.gptq import (
    CONFIG_NAME,
    PROJECT_URI,
    WEIGHTS_NAME,
    _config_dict,
    _config_from_dict,
    _quantmill_version,
    _read_json,
    _read_tensors,
    float_tensors,
)
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.models.lut_linear import LUTLinear, num_codebooks, padded_in_features

QUANT_METHOD = "quantmill_lut"
FORMAT_VERSION = 1
LUT_SUFFIXES = ("qindices", "codebook", "bias")


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def build_lut_config(bits: dict[str, int], rows_per_codebook: dict[str, int]) -> dict[str, Any]:
    """The ``quantization_config`` dict: defaults (most common, ties to the smaller value) plus
    every module's own settings."""
    if not bits:
        raise QuantmillError("nothing to export: the quantization result holds no weights")

    def most_common(values: dict[str, int]) -> int:
        return min(Counter(values.values()).items(), key=lambda item: (-item[1], item[0]))[0]

    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": most_common(bits),
        "rows_per_codebook": most_common(rows_per_codebook),
        "modules": {name: {"bits": bits[name], "rows_per_codebook": rows_per_codebook[name]}
                    for name in sorted(bits)},
        "meta": {"quantizer": [f"quantmill:{_quantmill_version()}"], "uri": PROJECT_URI},
    }


def lut_tensors(model: torch.nn.Module, result: QuantizationResult,
                rows_per_codebook: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Every tensor of the checkpoint (packed clustered linears + fp16 rest), CPU, contiguous;
    and whether a tied output embedding was quantized (see ``float_tensors``)."""
    tensors, untie = float_tensors(model, set(result.weights), result.float_overrides)
    for name, cw in result.weights.items():
        if not isinstance(cw, ClusteredWeight):
            raise QuantmillError(f"the lut format stores codebook weights; '{name}' holds "
                                 f"{type(cw).__name__} (export it with format gptq)")
        module = check_module(model, name, cw)
        try:
            packed = LUTLinear.from_clustered(replace(cw, bias=module_bias(module, cw)),
                                              rows_per_codebook)
        except ValueError as exc:
            raise QuantmillError(f"cannot pack module '{name}': {exc}") from exc
        for suffix, buf in packed.state_dict().items():
            tensors[f"{name}.{suffix}"] = buf.detach().to("cpu").contiguous()
    return tensors, untie


def write_lut_checkpoint(loaded: LoadedModel, result: QuantizationResult, out_dir: Path,
                         rows_per_codebook: int | None = None) -> dict[str, Any]:
    """Write ``loaded.model`` with ``result``'s clustered linears as a ``quantmill-lut``
    checkpoint. ``rows_per_codebook`` defaults to the quantizer's (``result.details``); the
    writer checks that the rows of each run really share their codebook."""
    if not result.weights:
        raise QuantmillError("nothing to export: the quantization result holds no weights")
    r = int(rows_per_codebook or result.details.get("rows_per_codebook", 1))
    if r < 1:
        raise QuantmillError(f"rows_per_codebook must be at least 1, got {r}")
    tensors, untie = lut_tensors(loaded.model, result, r)
    bits = {name: cw.bits for name, cw in result.weights.items()}
    quant_config = build_lut_config(bits, dict.fromkeys(bits, r))
    config = _config_dict(loaded.model, quant_config, untie=untie)
    summary = save_hf_layout(loaded, tensors, config, out_dir)
    return {"format": "lut", "quantized_modules": len(result.weights), "bits": bits,
            "rows_per_codebook": r, "quantization_config": quant_config, **summary}


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def read_lut_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json without its quantization_config, the quantization_config), checked."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise QuantmillError(f"no {CONFIG_NAME} in lut checkpoint directory {path}")
    config = _read_json(config_file)
    qcfg = config.pop("quantization_config", None)
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
        raise QuantmillError(f"{path} is not a quantmill-lut checkpoint (quant_method "
                             f"{method!r}, expected {QUANT_METHOD!r})")
    version = qcfg.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise QuantmillError(f"{path}: lut format_version {version!r} is not supported "
                             f"(this quantmill reads 1..{FORMAT_VERSION})")
    return config, qcfg


def module_settings(name: str, quant_config: dict[str, Any]) -> tuple[int, int]:
    """(bits, rows_per_codebook) of one module: its own entry, else the defaults."""
    own = (quant_config.get("modules") or {}).get(name) or {}
    bits = own.get("bits", quant_config.get("bits"))
    r = own.get("rows_per_codebook", quant_config.get("rows_per_codebook", 1))
    if not isinstance(bits, int) or not isinstance(r, int):
        raise QuantmillError(f"lut quantization_config gives '{name}' no integer bits and "
                             "rows_per_codebook")
    return bits, r


def _build_lut_linear(name: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor],
                      quant_config: dict[str, Any]) -> LUTLinear:
    """A meta-device LUTLinear shaped for ``name``, checked against the stored tensors."""
    if not isinstance(module, torch.nn.Linear):
        raise QuantmillError(f"checkpoint quantizes '{name}', which is not a linear layer")
    bits, r = module_settings(name, quant_config)
    out_features, in_features = module.out_features, module.in_features
    if f"{name}.codebook" not in tensors:
        raise QuantmillError(f"checkpoint has {name}.qindices but no {name}.codebook")
    expected = {
        "qindices": (out_features, padded_in_features(in_features) * bits // 32),
        "codebook": (num_codebooks(out_features, r), 2**bits),
    }
    for suffix, shape in expected.items():
        found = tuple(tensors[f"{name}.{suffix}"].shape)
        if found != shape:
            raise QuantmillError(
                f"{name}.{suffix} has shape {found}, expected {shape} for a {bits}-bit "
                f"{out_features}x{in_features} layer with rows_per_codebook {r}")
    try:
        return LUTLinear(in_features, out_features, bits, r, bias=f"{name}.bias" in tensors,
                         device="meta")
    except ValueError as exc:
        raise QuantmillError(f"cannot build lut module '{name}': {exc}") from exc


def load_lut_checkpoint(path: Path, device: torch.device | str = torch.device("cpu"),
                        dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a ``quantmill-lut`` checkpoint as a model whose clustered linears are ``LUTLinear``.

    The skeleton is built on the meta device and the file's tensors are assigned into it, so
    memory stays close to the file size (float tensors become ``dtype``; indices, codebooks and
    quantized-linear biases keep their stored dtypes).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    device = torch.device(device)
    if not path.is_dir():
        raise QuantmillError(f"lut checkpoint path is not a directory: {path}")
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        raise QuantmillError(f"no {WEIGHTS_NAME} in lut checkpoint directory {path}")
    config_dict, quant_config = read_lut_config(path)
    config = _config_from_dict(config_dict, path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors([weights_file], device)

    keep_dtype: set[str] = set()
    for name in sorted(k.removesuffix(".qindices") for k in tensors if k.endswith(".qindices")):
        swap_quantized_module(model, name, lambda module, name=name: _build_lut_linear(
            name, module, tensors, quant_config))
        keep_dtype.update(f"{name}.{suffix}" for suffix in LUT_SUFFIXES)
    assign_checkpoint_tensors(model, tensors, keep_dtype, dtype, path, device)
    tokenizer = directory_tokenizer(path)
    return LoadedModel(model, tokenizer, path, "lut", [weights_file, path / CONFIG_NAME])


# --------------------------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------------------------


class LUTExporter(Exporter):
    """Writes ``quantmill-lut`` checkpoints (packed indices + fp16 per-row codebooks)."""

    name = "lut"
    format_name = "lut"
    accepts_weight_kinds = frozenset({"codebook"})
    accepts_float_overrides = True

    def export(
        self, loaded: LoadedModel, result: QuantizationResult, out_dir: Path
    ) -> dict[str, Any]:
        return write_lut_checkpoint(loaded, result, out_dir)


class LUTCheckpointSource(OwnLayoutSource):
    """A ``quantmill-lut`` checkpoint directory (the ``lut`` exporter's output)."""

    name = "lut"
    layout = "lut"

    def read_config(self, path: Path) -> Any:
        return read_lut_config(path)

    def load_checked(self, path: Path, device: torch.device) -> LoadedModel:
        return load_lut_checkpoint(path, device=device)


@hookimpl
def register_exporters() -> list[type[Exporter]]:
    return [LUTExporter]


@hookimpl
def register_model_sources() -> list[type[ModelSource]]:
    return [LUTCheckpointSource]
