"""The ``quantmill-trellis`` checkpoint format (trellis-coded weights): the run-time module,
writer, reader, the ``trellis`` exporter and the ``trellis`` model source.

Why a format of our own: no common runtime stores trellis paths (QTIP's own kernels read a
layout tied to its CUDA code). Users of other runtimes export ``dequantized`` instead.

Layout, format version 1. A Hugging Face model directory (the ``dequantized`` layout) with:

* ``model.safetensors``, per trellis-coded linear ``<name>`` (``plugins/quantizers/trellis``):

  - ``<name>.trellis_paths`` int32 [in / tile_width, ceil(out / r), T * k / 32] with
    r = T / tile_width: for each block of ``tile_width`` input columns, each sequence of T
    weights (r consecutive rows of the block, row after row) as one little-endian bit stream of
    its T k-bit symbols (``packing.pack_cols``); the path is tail-biting: state t is the last L
    bits of the circular stream up to symbol t;
  - ``<name>.row_scales`` fp16 [out] and ``<name>.col_scales`` fp16 [in]:
    ``W_stored[i, j] = row_scales[i] * col_scales[j] * table[state]``;
  - ``<name>.input_rotation_signs`` int8 [in] and ``<name>.input_rotation_block`` float32
    [m, m] (``plugins/hadamard.py``): the layer computes ``(x @ T) @ W_stored.T``;
  - ``<name>.bias`` fp16 [out] when the layer has a bias;

  ``quantmill_trellis.table`` fp16 [2^L]: the values states stand for, shared by every module;
  every other tensor in fp16.
* ``config.json``: the model's config with ``quantization_config``::

    {"quant_method": "quantmill_trellis", "format_version": 1, "state_bits": 10,
     "sequence_length": 64, "tile_width": 8, "bits": 3,              # the most common width
     "modules": {"model.layers.0.self_attn.q_proj": {"bits": 3}, ...},
     "meta": {"quantizer": ["quantmill:<version>"], "uri": "..."}}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quantmill.plugins.base import Exporter, LoadedModel, ModelSource, QuantizationResult
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
from quantmill.plugins.hadamard import BLOCK_SUFFIX, SIGNS_SUFFIX, InputRotation, split_dimension
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.quantizers.trellis.algorithm import TrellisWeight
from quantmill.plugins.quantizers.trellis.code import Trellis

QUANT_METHOD = "quantmill_trellis"
FORMAT_VERSION = 1
TABLE_KEY = "quantmill_trellis.table"
TRELLIS_SUFFIXES = ("trellis_paths", "row_scales", "col_scales", SIGNS_SUFFIX, BLOCK_SUFFIX,
                    "bias")


class TrellisLinear(torch.nn.Module):
    """``y = (x @ T) @ W.T + b`` with W held as trellis paths and scales (decoded per forward,
    in float32, exactly as ``TrellisWeight.dequantize_stored``). The table is shared by every
    module of a model and set with ``set_table`` (not part of the module's state dict)."""

    #: the buffers that stand for the weight (the size evaluator counts their bits)
    QUANTIZED_BUFFERS: tuple[str, ...] = ("trellis_paths", "row_scales", "col_scales",
                                          SIGNS_SUFFIX, BLOCK_SUFFIX)

    def __init__(self, in_features: int, out_features: int, bits: int, state_bits: int,
                 sequence_length: int, tile_width: int, *, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % tile_width or sequence_length % tile_width:
            raise ValueError(f"in_features {in_features} and sequence_length "
                             f"{sequence_length} must be multiples of tile_width {tile_width}")
        if (sequence_length * bits) % 32:
            raise ValueError(f"a path of {sequence_length} {bits}-bit symbols is not whole "
                             "32-bit words")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.state_bits = bits, state_bits
        self.sequence_length, self.tile_width = sequence_length, tile_width
        per = sequence_length // tile_width
        shape = (in_features // tile_width, -(-out_features // per), sequence_length * bits // 32)
        m, _ = split_dimension(in_features)
        self.register_buffer("trellis_paths", torch.empty(shape, dtype=torch.int32,
                                                          device=device))
        self.register_buffer("row_scales", torch.empty(out_features, dtype=torch.float16,
                                                       device=device))
        self.register_buffer("col_scales", torch.empty(in_features, dtype=torch.float16,
                                                       device=device))
        self.register_buffer(SIGNS_SUFFIX, torch.empty(in_features, dtype=torch.int8,
                                                       device=device))
        self.register_buffer(BLOCK_SUFFIX, torch.empty(m, m, dtype=torch.float32,
                                                       device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16,
                                                 device=device) if bias else None)
        self.register_buffer("table", None, persistent=False)  # set_table, after loading

    @classmethod
    def from_trellis(cls, weight: TrellisWeight) -> TrellisLinear:
        if weight.input_rotation is None:
            raise ValueError("the trellis format stores rotated weights only")
        tr = weight.trellis
        module = cls(weight.in_features, weight.out_features, tr.k, tr.L, weight.T,
                     weight.tile_width, bias=weight.bias is not None)
        module.trellis_paths = weight.packed.to(torch.int32).contiguous()
        module.row_scales = weight.row_scales.to(torch.float16).contiguous()
        module.col_scales = weight.col_scales.to(torch.float16).contiguous()
        for suffix, tensor in weight.input_rotation.to_checkpoint().items():
            setattr(module, suffix, tensor)
        if weight.bias is not None:
            module.bias = weight.bias.detach().to(torch.float16).contiguous()
        module.set_table(tr.table)
        return module

    def set_table(self, table: torch.Tensor) -> None:
        if tuple(table.shape) != (1 << self.state_bits,):
            raise ValueError(f"a trellis of {self.state_bits} state bits needs a table of "
                             f"{1 << self.state_bits} values, got {tuple(table.shape)}")
        self.table = table.to(torch.float32)

    def weight_object(self) -> TrellisWeight:
        """The stored weight as a ``TrellisWeight`` (shares the buffers)."""
        if self.table is None:
            raise RuntimeError("TrellisLinear has no table (set_table was never called)")
        rotation = InputRotation(getattr(self, SIGNS_SUFFIX).to(torch.float32),
                                 getattr(self, BLOCK_SUFFIX))
        return TrellisWeight(self.trellis_paths, self.row_scales.float(),
                             self.col_scales.float(),
                             Trellis(self.state_bits, self.bits, self.table),
                             self.sequence_length, self.tile_width, self.in_features, rotation)

    def dequantize_weight(self) -> torch.Tensor:
        """The weight the layer stands for (unrotated), float32 [out, in]."""
        return self.weight_object().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_object()
        x = weight.input_rotation.apply(x)  # type: ignore[union-attr]
        stored = weight.dequantize_stored().to(x.dtype)  # transient: never cached
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, stored, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, state_bits={self.state_bits}, T={self.sequence_length}, "
                f"tile_width={self.tile_width}, bias={self.bias is not None}")


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def _shared_settings(result: QuantizationResult) -> tuple[int, torch.Tensor, int, int]:
    """L, the table, T and the tile width every module shares (refused otherwise)."""
    first = None
    for name, weight in sorted(result.weights.items()):
        if not isinstance(weight, TrellisWeight):
            raise QuantmillError(f"the trellis format stores trellis weights; '{name}' holds "
                                 f"{type(weight).__name__}")
        key = (weight.trellis.L, weight.T, weight.tile_width)
        if first is None:
            first = (key, weight.trellis.table.cpu())
        elif key != first[0] or not torch.equal(weight.trellis.table.cpu(), first[1]):
            raise QuantmillError(f"module '{name}' has another trellis (state bits, sequence "
                                 "length, tile width or table) than the others")
    if first is None:
        raise QuantmillError("nothing to export: the quantization result holds no weights")
    (L, T, tile), table = first
    return L, table, T, tile


def write_trellis_checkpoint(loaded: LoadedModel, result: QuantizationResult,
                             out_dir: Path) -> dict[str, Any]:
    """Write ``loaded.model`` with ``result``'s trellis-coded linears as a ``quantmill-trellis``
    checkpoint (into a temporary directory renamed at the end: nothing half-written stays)."""
    L, table, T, tile = _shared_settings(result)
    tensors, untie = float_tensors(loaded.model, set(result.weights), result.float_overrides)
    bits: dict[str, int] = {}
    for name, weight in result.weights.items():
        module = check_module(loaded.model, name, weight)
        try:
            packed = TrellisLinear.from_trellis(replace(weight,
                                                        bias=module_bias(module, weight)))
        except ValueError as exc:
            raise QuantmillError(f"cannot store module '{name}': {exc}") from exc
        for suffix, buf in packed.state_dict().items():
            tensors[f"{name}.{suffix}"] = buf.detach().to("cpu").contiguous()
        bits[name] = weight.bits
    tensors[TABLE_KEY] = table.to(torch.float16).contiguous()
    quant_config = {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
        "state_bits": L, "sequence_length": T, "tile_width": tile,
        "bits": Counter(bits.values()).most_common(1)[0][0],
        "modules": {name: {"bits": b} for name, b in sorted(bits.items())},
        "rotation": {"kind": "randomized_hadamard", "applies_to": "inputs"},
        "meta": {"quantizer": [f"quantmill:{_quantmill_version()}"], "uri": PROJECT_URI},
    }
    config = _config_dict(loaded.model, quant_config, untie=untie)
    summary = save_hf_layout(loaded, tensors, config, out_dir)
    return {"format": "trellis", "quantized_modules": len(bits), "bits": bits,
            "quantization_config": quant_config, **summary}


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def read_trellis_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json without its quantization_config, the quantization_config), checked."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise QuantmillError(f"no {CONFIG_NAME} in trellis checkpoint directory {path}")
    config = _read_json(config_file)
    qcfg = config.pop("quantization_config", None)
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
        raise QuantmillError(f"{path} is not a quantmill-trellis checkpoint (quant_method "
                             f"{method!r}, expected {QUANT_METHOD!r})")
    if qcfg.get("format_version") != FORMAT_VERSION:
        raise QuantmillError(f"{path}: trellis format_version {qcfg.get('format_version')!r} "
                             f"is not supported (this quantmill reads {FORMAT_VERSION})")
    for key in ("state_bits", "sequence_length", "tile_width"):
        if not isinstance(qcfg.get(key), int):
            raise QuantmillError(f"{path}: trellis quantization_config has no integer {key}")
    return config, qcfg


def _build(name: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor],
           qcfg: dict[str, Any]) -> TrellisLinear:
    if not isinstance(module, torch.nn.Linear):
        raise QuantmillError(f"checkpoint quantizes '{name}', which is not a linear layer")
    bits = ((qcfg.get("modules") or {}).get(name) or {}).get("bits", qcfg.get("bits"))
    if not isinstance(bits, int):
        raise QuantmillError(f"trellis quantization_config gives '{name}' no integer bits")
    try:
        built = TrellisLinear(module.in_features, module.out_features, bits, qcfg["state_bits"],
                              qcfg["sequence_length"], qcfg["tile_width"],
                              bias=f"{name}.bias" in tensors, device="meta")
    except ValueError as exc:
        raise QuantmillError(f"cannot build trellis module '{name}': {exc}") from exc
    for suffix, buf in built.state_dict().items():
        found = tensors.get(f"{name}.{suffix}")
        if found is None:
            raise QuantmillError(f"checkpoint module '{name}' lacks tensor {name}.{suffix}")
        if tuple(found.shape) != tuple(buf.shape):
            raise QuantmillError(f"{name}.{suffix} has shape {tuple(found.shape)}, expected "
                                 f"{tuple(buf.shape)} for a {bits}-bit {module.out_features}x"
                                 f"{module.in_features} trellis layer")
    try:
        InputRotation.from_tensors(tensors[f"{name}.{SIGNS_SUFFIX}"],
                                   tensors[f"{name}.{BLOCK_SUFFIX}"])
    except ValueError as exc:
        raise QuantmillError(f"bad input rotation of checkpoint module '{name}': {exc}") from exc
    return built


def load_trellis_checkpoint(path: Path, device: torch.device | str = torch.device("cpu"),
                            dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a ``quantmill-trellis`` checkpoint as a model whose coded linears are
    ``TrellisLinear`` (skeleton on the meta device, the file's tensors assigned into it)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    device = torch.device(device)
    if not path.is_dir():
        raise QuantmillError(f"trellis checkpoint path is not a directory: {path}")
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        raise QuantmillError(f"no {WEIGHTS_NAME} in trellis checkpoint directory {path}")
    config_dict, qcfg = read_trellis_config(path)
    config = _config_from_dict(config_dict, path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors([weights_file], device)
    table = tensors.pop(TABLE_KEY, None)
    if table is None or tuple(table.shape) != (1 << qcfg["state_bits"],):
        raise QuantmillError(f"{path}: {TABLE_KEY} is missing or not {1 << qcfg['state_bits']} "
                             "values")
    built: list[TrellisLinear] = []
    keep_dtype: set[str] = set()
    for name in sorted(k.removesuffix(".trellis_paths") for k in tensors
                       if k.endswith(".trellis_paths")):
        new = swap_quantized_module(
            model, name, lambda module, name=name: _build(name, module, tensors, qcfg))
        keep_dtype.update(f"{name}.{suffix}" for suffix in TRELLIS_SUFFIXES)
        built.append(new)
    assign_checkpoint_tensors(model, tensors, keep_dtype, dtype, path, device)
    for module in built:
        module.set_table(table.to(device))
    tokenizer = directory_tokenizer(path)
    return LoadedModel(model, tokenizer, path, "trellis", [weights_file, path / CONFIG_NAME])


# --------------------------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------------------------


class TrellisExporter(Exporter):
    """Writes ``quantmill-trellis`` checkpoints (packed paths, scales, rotations, one table)."""

    name = "trellis"
    format_name = "trellis"
    accepts_weight_kinds = frozenset({"trellis"})

    def export(self, loaded: LoadedModel, result: QuantizationResult,
               out_dir: Path) -> dict[str, Any]:
        return write_trellis_checkpoint(loaded, result, out_dir)


class TrellisCheckpointSource(OwnLayoutSource):
    """A ``quantmill-trellis`` checkpoint directory (the ``trellis`` exporter's output)."""

    name = "trellis"
    layout = "trellis"

    def read_config(self, path: Path) -> Any:
        return read_trellis_config(path)

    def load_checked(self, path: Path, device: torch.device) -> LoadedModel:
        return load_trellis_checkpoint(path, device=device)


@hookimpl
def register_exporters() -> list[type[Exporter]]:
    return [TrellisExporter]


@hookimpl
def register_model_sources() -> list[type[ModelSource]]:
    return [TrellisCheckpointSource]
