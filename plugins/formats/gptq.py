"""The GPTQ checkpoint format: writer, reader and the ``gptq`` exporter plugin.

Why this layout: it is what GPTQModel, transformers and vLLM load, so a quantmill checkpoint runs
in those runtimes without conversion. A checkpoint directory holds

* ``model.safetensors``: per quantized linear ``<name>.qweight`` (int32 [in*b/32, out]),
  ``<name>.qzeros`` (int32 [groups, out*b/32]), ``<name>.scales`` (fp16 [groups, out]),
  ``<name>.g_idx`` (int32 [in]) and ``<name>.bias`` (fp16) if any; every other tensor in fp16;
* ``quantize_config.json`` and the same dict as ``quantization_config`` in ``config.json``;
* ``generation_config.json`` and the tokenizer files when the model has them.

Symmetric weights are written as ``checkpoint_format: gptq`` (v1, stored zeros are
``zero - 1``: AutoGPTQ's convention, readable by every runtime); anything asymmetric as
``gptq_v2`` (zeros stored as they are), because v1 cannot store a zero point of 0.

Weights with input rotations (``rotation: hadamard``) add ``<name>.input_rotation_signs`` and
``<name>.input_rotation_block`` per linear and are written as ``quant_method:
quantmill_rotated_gptq``: only quantmill's reader runs those (see ``quant_linear``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from quantmill.plugins.base import (
    Exporter,
    LoadedModel,
    PluginConfig,
    QuantizationResult,
    QuantizedWeight,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.formats.common import (
    assign_checkpoint_tensors,
    directory_tokenizer,
    swap_quantized_module,
)
from quantmill.plugins.formats.packing import packed_length
from quantmill.plugins.hadamard import BLOCK_SUFFIX, SIGNS_SUFFIX, InputRotation
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.models import deferred
from quantmill.plugins.models.memory import release_free_memory
from quantmill.plugins.models.quant_linear import (
    GPTQ_METHODS,
    ROTATED_GPTQ_METHOD,
    GPTQLinear,
    zero_offset_for,
)

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"

#: Bit widths other GPTQ runtimes have kernels for; quantmill also writes 5, 6 and 7.
STANDARD_BITS = frozenset({2, 3, 4, 8})
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
PROJECT_URI = "https://github.com/quantmill/quantmill"
QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias", SIGNS_SUFFIX, BLOCK_SUFFIX)


# --------------------------------------------------------------------------------------------
# Pure helpers: format choice and quantize_config
# --------------------------------------------------------------------------------------------


def _quantmill_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quantmill")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "unknown"


def choose_checkpoint_format(
    weights: dict[str, QuantizedWeight], requested: str | None = None
) -> str:
    """``gptq`` (v1) when every module is symmetric, else ``gptq_v2``; never v1 asymmetric.

    ``requested`` None or "auto" picks; "gptq_v2" is always allowed; "gptq" is refused when
    some zero point could not be stored as ``zero - 1``.
    """
    v1_ok = all(qw.sym and (qw.zeros.numel() == 0 or int(qw.zeros.min()) >= 1)
                for qw in weights.values())
    if requested in (None, "auto"):
        return "gptq" if v1_ok else "gptq_v2"
    if requested == "gptq_v2":
        return requested
    if requested == "gptq":
        if not v1_ok:
            raise QuantmillError(
                "checkpoint_format 'gptq' (v1) cannot store asymmetric weights or zero points "
                "of 0; use checkpoint_format 'gptq_v2' or 'auto'"
            )
        return requested
    raise QuantmillError(
        f"unknown GPTQ checkpoint_format {requested!r} (expected auto, gptq or gptq_v2)"
    )


def _trivial_g_idx(qw: QuantizedWeight) -> bool:
    """Whether column i sits in group i // group_size (no act-order permutation)."""
    size = qw.in_features if qw.group_size == -1 else qw.group_size
    expected = torch.arange(qw.in_features, dtype=torch.int64) // size
    return torch.equal(qw.g_idx.to(torch.int64).cpu(), expected)


def dynamic_key(module_name: str) -> str:
    """GPTQModel's "dynamic" key that selects exactly one module (positive match)."""
    return f"+:^{re.escape(module_name)}$"


def build_quantize_config(
    weights: dict[str, QuantizedWeight],
    checkpoint_format: str,
    details: dict[str, Any] | None = None,
    *,
    lm_head: bool = False,
) -> dict[str, Any]:
    """The ``quantize_config.json`` dict (also written as config.json's quantization_config).

    The most common (bits, group_size) is the default; modules that differ are listed in
    GPTQModel's ``dynamic`` overrides, so mixed precision needs no format of our own. Weights
    with input rotations make it a ``quantmill_rotated_gptq`` config (see ``quant_linear``).
    """
    if not weights:
        raise QuantmillError("nothing to export: the quantization result holds no weights")
    details = details or {}
    shapes = Counter((qw.bits, qw.group_size) for qw in weights.values())
    # Most common first; ties broken by (bits, group_size) so the choice is deterministic.
    (bits, group_size), _ = min(shapes.items(), key=lambda item: (-item[1], item[0]))
    rotated = any(qw.input_rotation is not None for qw in weights.values())
    if rotated and not all(qw.input_rotation is not None for qw in weights.values()):
        plain = sorted(n for n, qw in weights.items() if qw.input_rotation is None)
        raise QuantmillError(f"a rotated GPTQ checkpoint needs every module rotated; "
                             f"{', '.join(plain[:3])}{' ...' if len(plain) > 3 else ''} are not")
    syms = Counter(qw.sym for qw in weights.values())
    sym = max(syms.items(), key=lambda item: (item[1], item[0]))[0]
    dynamic: dict[str, dict[str, Any]] = {}
    for name, qw in weights.items():
        if (qw.bits, qw.group_size, qw.sym) == (bits, group_size, sym):
            continue
        override: dict[str, Any] = {"bits": qw.bits, "group_size": qw.group_size}
        if qw.sym != sym:
            override["sym"] = qw.sym
        dynamic[dynamic_key(name)] = override
    config: dict[str, Any] = {
        "bits": bits,
        "group_size": group_size,
        # act-order with static groups keeps g_idx trivial; say so, as GPTQModel does
        "desc_act": bool(details.get("desc_act"))
        or not all(_trivial_g_idx(qw) for qw in weights.values()),
        "sym": sym,
        "lm_head": lm_head,
        "quant_method": ROTATED_GPTQ_METHOD if rotated else "gptq",
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "static_groups": bool(details.get("static_groups", False)),
        "true_sequential": True,
    }
    if rotated:
        config["rotation"] = {
            "kind": "randomized_hadamard",
            "applies_to": "inputs",
            "tensors": [SIGNS_SUFFIX, BLOCK_SUFFIX],
            "definition": "y = (x @ T) @ W.T with T = diag(signs) @ kron(block, H), H the "
                          "normalised Sylvester Hadamard matrix of size in_features / "
                          "block_size; W is the dequantized GPTQ weight",
        }
    if "damp_percent" in details:
        config["damp_percent"] = details["damp_percent"]
    if dynamic:
        config["dynamic"] = dynamic
    unusual = sorted({qw.bits for qw in weights.values()} - STANDARD_BITS)
    if unusual:
        config["quantmill_note"] = (
            f"modules at {', '.join(map(str, unusual))} bits are packed as a little-endian bit "
            "stream in int32 words (the rule AutoGPTQ uses for 2/3/4/8 bits); only quantmill "
            "reads them, other GPTQ runtimes have no kernels for these widths"
        )
    config["meta"] = {"quantizer": [f"quantmill:{_quantmill_version()}"], "uri": PROJECT_URI}
    return config


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """Make config values JSON-safe (GGUF-derived configs may hold dtypes, sets, paths...)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return str(value)


def _dump_json(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _module_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _tied_output_key(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    """The state-dict key of an output embedding tied to the input embedding, else None."""
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    get_text_config = getattr(config, "get_text_config", None)
    if not tied and callable(get_text_config):
        tied = bool(getattr(get_text_config(), "tie_word_embeddings", False))
    if not tied:
        return None
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        return None
    inp, out = get_in(), get_out()
    w_in, w_out = getattr(inp, "weight", None), getattr(out, "weight", None)
    if not isinstance(w_in, torch.Tensor) or not isinstance(w_out, torch.Tensor):
        return None
    same = w_in is w_out or (
        w_in.shape == w_out.shape
        and w_in.untyped_storage().data_ptr() == w_out.untyped_storage().data_ptr()
        and w_in.storage_offset() == w_out.storage_offset()
    )
    if not same:
        return None
    key = f"{_module_names(model)[id(out)]}.weight"
    return key if key in state_dict else None


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of a linear-like module, or None."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, GPTQLinear):
        return module.out_features, module.in_features
    return None


def checkpoint_tensors(
    model: torch.nn.Module, result: QuantizationResult, checkpoint_format: str
) -> tuple[dict[str, torch.Tensor], bool]:
    """Every tensor of the checkpoint (packed quantized linears + fp16 rest), CPU, contiguous.

    Returns the tensors and whether an output embedding tied to the input embedding was itself
    quantized (then the tie is broken in the checkpoint and config.json must say so).
    """
    tensors, quantized_tied = float_tensors(model, set(result.weights), result.float_overrides)
    modules = dict(model.named_modules())
    for name, qw in result.weights.items():
        module = modules.get(name)
        if module is None:
            raise QuantmillError(f"quantized module '{name}' does not exist in the model")
        shape = _linear_shape(module)
        if shape != (qw.out_features, qw.in_features):
            raise QuantmillError(
                f"quantized module '{name}' is {qw.out_features}x{qw.in_features} but the model's "
                f"module is {'not a linear layer' if shape is None else 'x'.join(map(str, shape))}"
            )
        bias = qw.bias
        if bias is None and isinstance(getattr(module, "bias", None), torch.Tensor):
            bias = module.bias
        try:
            packed = GPTQLinear.from_quantized(replace(qw, bias=bias), checkpoint_format)
        except ValueError as exc:
            raise QuantmillError(f"cannot pack module '{name}': {exc}") from exc
        for suffix, buf in packed.state_dict().items():
            tensors[f"{name}.{suffix}"] = buf.detach().to("cpu").contiguous()
    return tensors, quantized_tied


def float_tensors(
    model: torch.nn.Module,
    quantized: set[str],
    overrides: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Every tensor of the model except the ``quantized`` modules' weights and biases, in fp16
    (non-float tensors as they are), CPU, contiguous, deferred weights fetched: the part of a
    checkpoint every quantized format shares.

    ``overrides`` (``QuantizationResult.float_overrides``) replace the model's values of the
    float tensors they name (a quantizer that changed a norm never changes the model itself);
    one naming no float tensor that gets written is refused, as is one fp16 cannot hold.

    Returns the tensors and whether an output embedding tied to the input embedding is among
    ``quantized`` (then the tie is broken in the checkpoint and config.json must say so); an
    unquantized tied output embedding is left out, as it is the input embedding.
    """
    state_dict = model.state_dict()  # excludes non-persistent buffers (rotary inv_freq)
    tied_key = _tied_output_key(model, state_dict)
    quantized_tied = tied_key is not None and tied_key.removesuffix(".weight") in quantized
    skip: set[str] = set()
    for name in quantized:
        skip.update({f"{name}.weight", f"{name}.bias"})
    if tied_key is not None and not quantized_tied:
        skip.add(tied_key)  # written once, as the input embedding
    overrides = dict(overrides or {})
    _check_overrides(state_dict, skip, tied_key, overrides)

    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    fetcher = deferred.fetcher_of(model)
    for key, tensor in state_dict.items():
        if key in skip:
            continue
        t = overrides.get(key, tensor).detach()
        if t.is_meta and fetcher is not None:  # a deferred weight the quantizer did not touch
            t = fetcher.fetch([key])[key]
        if t.is_floating_point():
            t = t.to(torch.float16)
            if key in overrides and not bool(torch.isfinite(t).all()):
                raise QuantmillError(f"float override '{key}' does not fit in fp16 (largest "
                                     f"magnitude {float(overrides[key].abs().max()):.3g})")
        t = t.to("cpu").contiguous()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share memory or views of a larger buffer: copy them.
        if storage.data_ptr() in seen_storages or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen_storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    return tensors, quantized_tied


def _check_overrides(state_dict: dict[str, torch.Tensor], skip: set[str], tied_key: str | None,
                     overrides: dict[str, torch.Tensor]) -> None:
    """Refuse float overrides that would be silently dropped or change the model's shape."""
    for key, value in sorted(overrides.items()):
        if key not in state_dict:
            raise QuantmillError(f"float override '{key}' names no tensor of the model")
        if key == tied_key and key in skip:
            raise QuantmillError(f"float override '{key}' changes an output embedding tied to "
                                 "the input embedding, which the checkpoint writes only once")
        if key in skip:
            raise QuantmillError(f"float override '{key}' belongs to a quantized module; its "
                                 "new values must be in the quantized weights")
        original = state_dict[key]
        if not (value.is_floating_point() and original.is_floating_point()):
            raise QuantmillError(f"float override '{key}' must replace a float tensor with one")
        if tuple(value.shape) != tuple(original.shape):
            raise QuantmillError(f"float override '{key}' has shape {tuple(value.shape)}, the "
                                 f"model's tensor {tuple(original.shape)}")


def _config_dict(model: torch.nn.Module, quant_config: dict[str, Any], untie: bool) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        raise QuantmillError("the model has no config: cannot write config.json")
    data = dict(config.to_dict())
    data.pop("quantization_config", None)
    data["quantization_config"] = quant_config
    data["dtype"] = "float16"
    data["torch_dtype"] = "float16"  # older readers (vLLM, transformers 4) look here
    if untie:
        data["tie_word_embeddings"] = False
    return data


def _generation_config_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        return None
    try:
        to_diff = getattr(generation_config, "to_diff_dict", None)
        return dict(to_diff() if callable(to_diff) else generation_config.to_dict())
    except Exception as exc:  # a broken generation config must not block the checkpoint
        log.warning("not writing generation_config.json: %s", exc)
        return None


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise QuantmillError(f"checkpoint output directory {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def write_gptq_checkpoint(
    loaded: LoadedModel,
    result: QuantizationResult,
    out_dir: Path,
    *,
    checkpoint_format: str | None = None,
) -> dict[str, Any]:
    """Write ``loaded.model`` with ``result``'s quantized linears as a GPTQ checkpoint.

    Everything is written into a temporary sibling directory that is renamed to ``out_dir`` at
    the end, so an error never leaves a half-written checkpoint. ``out_dir`` must be absent or
    empty. Returns a summary: files, per-module bits and group sizes, checkpoint_format.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    fmt = choose_checkpoint_format(result.weights, checkpoint_format)
    _prepare_out_dir(out_dir)
    model = loaded.model
    mode = out_dir.stat().st_mode & 0o777 if out_dir.exists() else 0o755
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        # the tokenizer first: a deferred load builds it only now, and its transient memory is
        # better spent before the checkpoint's tensors exist than on top of them
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp))
        release_free_memory()
        tensors, quantized_tied = checkpoint_tensors(model, result, fmt)
        quant_config = build_quantize_config(result.weights, fmt, result.details, lm_head=False)
        if quantized_tied:
            quant_config["lm_head"] = True
        config = _config_dict(model, quant_config, untie=quantized_tied)
        generation = _generation_config_dict(model)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        del tensors
        _dump_json(quant_config, tmp / QUANTIZE_CONFIG_NAME)
        _dump_json(config, tmp / CONFIG_NAME)
        if generation is not None:
            _dump_json(generation, tmp / GENERATION_CONFIG_NAME)
        os.chmod(tmp, mode)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return {
        "format": "gptq",
        "checkpoint_format": fmt,
        "out_dir": str(out_dir),
        "files": files,
        "size_bytes": sum((out_dir / f).stat().st_size for f in files),
        "quantized_modules": len(result.weights),
        "bits": {name: qw.bits for name, qw in result.weights.items()},
        "group_size": {name: qw.group_size for name, qw in result.weights.items()},
        "quantize_config": quant_config,
    }


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def _weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names."""
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QuantmillError(f"unreadable {index}: {exc}") from exc
        shards = [path / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise QuantmillError(f"{index} names missing shards: {', '.join(missing)}")
        return shards
    raise QuantmillError(
        f"no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in GPTQ checkpoint directory {path}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QuantmillError(f"unreadable {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise QuantmillError(f"{path} does not hold a JSON object")
    return data


def _quantize_config(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    qfile = path / QUANTIZE_CONFIG_NAME
    if qfile.is_file():
        qcfg = _read_json(qfile)
    elif isinstance(config.get("quantization_config"), dict):
        qcfg = config["quantization_config"]
    else:
        raise QuantmillError(
            f"no {QUANTIZE_CONFIG_NAME} and no quantization_config in {path / CONFIG_NAME}: "
            f"{path} is not a GPTQ checkpoint"
        )
    method = qcfg.get("quant_method", "gptq")
    if method not in GPTQ_METHODS:
        raise QuantmillError(f"{path} holds a '{method}' checkpoint, not a GPTQ one")
    return qcfg


def module_spec(
    name: str, quant_config: dict[str, Any]
) -> tuple[int | None, int | None]:
    """(bits, group_size) of one module: the defaults, overridden by the first "dynamic" match.

    "-:" keys (modules left in float) never apply to a module that has a qweight.
    """
    bits = quant_config.get("bits")
    group_size = quant_config.get("group_size")
    for pattern, override in (quant_config.get("dynamic") or {}).items():
        if pattern.startswith("-:") or not isinstance(override, dict):
            continue
        regex = pattern[2:] if pattern.startswith("+:") else pattern
        if re.match(regex, name):
            bits = override.get("bits", bits)
            group_size = override.get("group_size", group_size)
            break
    return bits, group_size


def _read_tensors(files: list[Path], device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def _build_gptq_linear(
    name: str,
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    quant_config: dict[str, Any],
    zero_offset: int,
) -> GPTQLinear:
    """A meta-device GPTQLinear shaped for ``name``'s tensors, checked against the config."""
    shape = _linear_shape(module)
    if shape is None:
        raise QuantmillError(f"checkpoint quantizes '{name}', which is not a linear layer")
    out_features, in_features = shape
    qweight = tensors[f"{name}.qweight"]
    scales = tensors.get(f"{name}.scales")
    if scales is None or f"{name}.qzeros" not in tensors or f"{name}.g_idx" not in tensors:
        raise QuantmillError(f"checkpoint has {name}.qweight but not all of qzeros/scales/g_idx")
    inferred_bits, rest = divmod(qweight.shape[0] * 32, in_features)
    bits, group_size = module_spec(name, quant_config)
    bits = inferred_bits if bits is None else int(bits)
    if rest or bits != inferred_bits or qweight.shape[1] != out_features:
        raise QuantmillError(
            f"{name}.qweight has shape {tuple(qweight.shape)}, which does not fit a "
            f"{bits}-bit {out_features}x{in_features} linear layer"
        )
    rotated = f"{name}.{SIGNS_SUFFIX}" in tensors or f"{name}.{BLOCK_SUFFIX}" in tensors
    if rotated != (quant_config.get("quant_method") == ROTATED_GPTQ_METHOD):
        raise QuantmillError(
            f"checkpoint module '{name}' {'has' if rotated else 'lacks'} input rotation tensors "
            f"but quant_method is {quant_config.get('quant_method')!r}: a rotated linear needs "
            f"quant_method {ROTATED_GPTQ_METHOD!r} and its {SIGNS_SUFFIX}/{BLOCK_SUFFIX} tensors")
    if rotated:
        missing = [f"{name}.{s}" for s in (SIGNS_SUFFIX, BLOCK_SUFFIX) if f"{name}.{s}" not in
                   tensors]
        if missing:
            raise QuantmillError(f"checkpoint module '{name}' is rotated but lacks tensor "
                                 f"{', '.join(missing)}")
        signs = tensors[f"{name}.{SIGNS_SUFFIX}"]
        if signs.dim() != 1 or signs.numel() != in_features:
            raise QuantmillError(f"{name}.{SIGNS_SUFFIX} has shape {tuple(signs.shape)}; the "
                                 f"module has {in_features} inputs")
        try:
            InputRotation.from_tensors(signs, tensors[f"{name}.{BLOCK_SUFFIX}"])
        except ValueError as exc:
            raise QuantmillError(f"bad input rotation of checkpoint module '{name}': "
                                 f"{exc}") from exc
    groups = int(scales.shape[0])
    if group_size is None:
        group_size = -1 if groups == 1 else -(-in_features // groups)
    try:
        packed_length(out_features, bits)
        return GPTQLinear(
            in_features,
            out_features,
            bits,
            int(group_size),
            bias=f"{name}.bias" in tensors,
            zero_offset=zero_offset,
            num_groups=groups,
            rotated=rotated,
            device="meta",
        )
    except ValueError as exc:
        raise QuantmillError(f"cannot build GPTQ module '{name}': {exc}") from exc


def load_gptq_checkpoint(
    path: Path,
    device: torch.device | str = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a GPTQ checkpoint as a model whose quantized linears are ``GPTQLinear`` modules.

    The model skeleton is built on the meta device and the file's tensors are assigned into it,
    so memory stays close to the file size (float tensors are cast to ``dtype``; packed
    integers, scales and quantized-linear biases keep their checkpoint dtypes).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    device = torch.device(device)
    if not path.is_dir():
        raise QuantmillError(f"GPTQ checkpoint path is not a directory: {path}")
    files = _weight_files(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise QuantmillError(f"no {CONFIG_NAME} in GPTQ checkpoint directory {path}")
    config_dict = _read_json(config_file)
    quant_config = _quantize_config(path, config_dict)
    checkpoint_format = quant_config.get("checkpoint_format", "gptq")
    try:
        zero_offset = zero_offset_for(checkpoint_format)
    except ValueError as exc:
        raise QuantmillError(f"{path}: {exc}") from exc
    config_dict.pop("quantization_config", None)
    config = _config_from_dict(config_dict, path)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors(files, device)

    quantized = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    keep_dtype: set[str] = set()
    for name in quantized:
        swap_quantized_module(model, name, lambda module, name=name: _build_gptq_linear(
            name, module, tensors, quant_config, zero_offset))
        keep_dtype.update(f"{name}.{suffix}" for suffix in QUANTIZED_SUFFIXES)

    # Old AutoGPTQ files carry per-layer rotary tables that today's models recompute.
    expected = model.state_dict().keys()
    for key in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
        if key not in expected:
            del tensors[key]
    assign_checkpoint_tensors(model, tensors, keep_dtype, dtype, path, device)
    tokenizer = directory_tokenizer(path)
    defining = files + [config_file]
    if (path / WEIGHTS_INDEX_NAME).is_file() and not (path / WEIGHTS_NAME).is_file():
        defining.append(path / WEIGHTS_INDEX_NAME)
    if (path / QUANTIZE_CONFIG_NAME).is_file():
        defining.append(path / QUANTIZE_CONFIG_NAME)
    return LoadedModel(model, tokenizer, path, "gptq", defining)


def _config_from_dict(config_dict: dict[str, Any], path: Path) -> Any:
    from transformers import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise QuantmillError(f"{path / CONFIG_NAME} has unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(config_dict)


# --------------------------------------------------------------------------------------------
# Plugin
# --------------------------------------------------------------------------------------------


class GPTQExporter(Exporter):
    """Writes GPTQ checkpoints (GPTQModel / transformers / vLLM layout)."""

    name = "gptq"
    format_name = "gptq"
    accepts_float_overrides = True

    class Config(PluginConfig):
        #: "auto": v1 when every module is symmetric, else v2; "gptq_v2" forces v2.
        checkpoint_format: Literal["auto", "gptq", "gptq_v2"] = "auto"

    def export(
        self, loaded: LoadedModel, result: QuantizationResult, out_dir: Path
    ) -> dict[str, Any]:
        requested = getattr(self.config, "checkpoint_format", "auto")
        return write_gptq_checkpoint(
            loaded,
            result,
            out_dir,
            checkpoint_format=None if requested == "auto" else requested,
        )


@hookimpl
def register_exporters() -> list[type[Exporter]]:
    return [GPTQExporter]
