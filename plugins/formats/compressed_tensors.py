"""The compressed-tensors W8A8 int8 checkpoint: writer, reader, exporter and model source.

Why this layout: it is what llm-compressor writes for its ``W8A8`` int8 scheme and what vLLM
(``CompressedTensorsW8A8Int8``) and transformers' compressed-tensors integration load, so a
``dynamic_int8`` checkpoint runs there without conversion. A checkpoint directory holds

* ``model.safetensors``: per quantized linear ``<name>.weight`` (int8 [out, in]) and
  ``<name>.weight_scale`` (fp16 [out, 1]; no zero point, the scheme being symmetric) and
  ``<name>.bias`` (fp16) if any; every other tensor in fp16;
* ``config.json`` with ``quantization_config``::

      {"quant_method": "compressed-tensors", "format": "int-quantized",
       "quantization_status": "compressed", "version": ..., "sparsity_config": {},
       "transform_config": {}, "kv_cache_scheme": null, "global_compression_ratio": null,
       "ignore": ["lm_head", ...],            # linear layers left in float
       "config_groups": {"group_0": {"targets": ["Linear"], "output_activations": null,
           "weights": {"num_bits": 8, "type": "int", "symmetric": true, "group_size": null,
                       "strategy": "channel", "dynamic": false},
           "input_activations": {"num_bits": 8, "type": "int", "symmetric": true,
                                 "group_size": null, "strategy": "token", "dynamic": true}}}}

* ``generation_config.json`` and the tokenizer files when the model has them.

What it is based on (read in the sources, not copied): compressed-tensors
``quantization/quant_config.py`` (the ``QuantizationConfig`` fields), ``quant_scheme.py`` (the
``W8A8`` preset: int8 symmetric channel-wise static weights, int8 symmetric per-token dynamic
input activations), ``quant_args.py`` (argument names; unknown keys are rejected there, so only
fields every release knows are written), ``compressors/quantized_compressors/naive_quantized.py``
and ``base.py`` (``int-quantized`` stores ``weight`` in int8 beside ``weight_scale`` and drops
the zero point of symmetric schemes) and ``ModelCompressor.update_config`` (the ``version``,
``quant_method``, ``sparsity_config`` and ``transform_config`` keys); vLLM's
``compressed_tensors_w8a8_int8.py`` (int8 ``weight`` [out, in], channel ``weight_scale``
[out, 1], no ``input_scale`` for dynamic activations). Checked by loading a written checkpoint
with compressed-tensors 0.20.0 (``QuantizationConfig`` validation and its ``int-quantized``
decompressor); see ``bench/results/dynamic_int8.md``.

The reader builds ``Int8DynamicLinear`` modules (``plugins/models/int8_linear.py``), which
compute what vLLM's W8A8 kernel computes: per-token int8 activations times int8 weights.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from quantmill.plugins.base import (
    Exporter,
    LoadedModel,
    ModelSource,
    ModuleQuantSpec,
    QuantizationResult,
    weight_kind,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.formats.common import (
    assign_checkpoint_tensors,
    directory_tokenizer,
    swap_quantized_module,
)
from quantmill.plugins.formats.dequantized import check_module, module_bias, save_hf_layout
from quantmill.plugins.formats.gptq import (
    CONFIG_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    _config_dict,
    _config_from_dict,
    _read_json,
    _read_tensors,
    _weight_files,
    float_tensors,
)
from quantmill.plugins.hookspecs import hookimpl
from quantmill.plugins.models.int8_linear import Int8DynamicLinear, check_w8_per_channel
from quantmill.plugins.models.int8_siblings import fuse_siblings
from quantmill.plugins.models.sources import _has_quantization_config, check_weights_directory

FORMAT_NAME = "compressed-tensors"
QUANT_METHOD = "compressed-tensors"
#: the compressed-tensors layouts whose weights are plain int8 ``weight`` + ``weight_scale``
INT_FORMATS = ("int-quantized", "naive-quantized")
#: the compressed-tensors release whose layout was checked (written as ``version``)
COMPRESSED_TENSORS_VERSION = "0.20.0"
#: compressed-tensors' W8A8 preset, as its QuantizationArgs serialise it
WEIGHT_ARGS: dict[str, Any] = {"num_bits": 8, "type": "int", "symmetric": True,
                               "group_size": None, "strategy": "channel", "dynamic": False}
INPUT_ARGS: dict[str, Any] = {"num_bits": 8, "type": "int", "symmetric": True,
                              "group_size": None, "strategy": "token", "dynamic": True}
QUANTIZED_SUFFIXES = ("weight", "weight_scale", "bias")


# --------------------------------------------------------------------------------------------
# quantization_config
# --------------------------------------------------------------------------------------------


def build_quantization_config(ignore: list[str]) -> dict[str, Any]:
    """config.json's ``quantization_config`` for W8A8 int8 with the linears ``ignore`` in float."""
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": dict(WEIGHT_ARGS),
                "input_activations": dict(INPUT_ARGS),
                "output_activations": None,
            }
        },
        "format": "int-quantized",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def _args_problem(args: Any, expected: dict[str, Any], what: str) -> str | None:
    """Why quantization args ``args`` are not the W8A8 int8 ones, or None when they are."""
    if not isinstance(args, dict):
        return f"{what} are {args!r}, expected int8 {expected['strategy']}-wise quantization"
    strategy = args.get("strategy")
    if strategy is None and args.get("group_size") == -1:
        strategy = "channel"  # compressed-tensors infers channel from group_size -1
    found = {"num_bits": args.get("num_bits", 8), "type": str(args.get("type", "int")).lower(),
             "symmetric": args.get("symmetric", True), "strategy": strategy,
             "dynamic": args.get("dynamic", False)}
    wrong = [f"{key}={found[key]!r} (need {expected[key]!r})" for key in found
             if found[key] != expected[key]]
    return f"{what}: {', '.join(wrong)}" if wrong else None


def check_w8a8_config(qcfg: dict[str, Any], where: Path) -> list[dict[str, Any]]:
    """Raise QuantmillError naming the first thing quantmill cannot run; return the groups.

    quantmill reads the W8A8 int8 scheme only (int8 channel-wise weights, int8 per-token
    dynamic activations, compressed): other compressed-tensors schemes (fp8, packed int4,
    weight-only int8, static activation scales, quantized KV cache) are refused rather than run
    with the wrong arithmetic.
    """
    method = qcfg.get("quant_method")
    if method != QUANT_METHOD:
        raise QuantmillError(f"{where} holds a {method!r} checkpoint, not a compressed-tensors one")
    fmt = qcfg.get("format")
    if fmt not in INT_FORMATS:
        raise QuantmillError(f"{where}: compressed-tensors format {fmt!r} is not supported "
                             f"(quantmill reads {' and '.join(INT_FORMATS)} int8 checkpoints)")
    status = qcfg.get("quantization_status")
    if status != "compressed":
        raise QuantmillError(f"{where}: quantization_status is {status!r}; only 'compressed' "
                             "checkpoints store int8 weights")
    if qcfg.get("kv_cache_scheme") is not None:
        raise QuantmillError(f"{where}: a quantized KV cache (kv_cache_scheme) is not supported")
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantmillError(f"{where}: quantization_config has no config_groups")
    for group_name, group in groups.items():
        if not isinstance(group, dict):
            raise QuantmillError(f"{where}: config group {group_name!r} is a preset reference "
                                 "or malformed; quantmill needs explicit W8A8 int8 arguments")
        if group.get("format") not in (None, *INT_FORMATS):
            raise QuantmillError(f"{where}: config group {group_name!r} has format "
                                 f"{group.get('format')!r}")
        problem = (_args_problem(group.get("weights"), WEIGHT_ARGS, "weights")
                   or _args_problem(group.get("input_activations"), INPUT_ARGS,
                                    "input_activations"))
        if group.get("output_activations") is not None:
            problem = "output_activations are quantized"
        if problem:
            raise QuantmillError(f"{where}: config group {group_name!r} is not W8A8 int8 with "
                                 f"dynamic per-token activations ({problem})")
    return list(groups.values())


def _matches(name: str, module: torch.nn.Module, patterns: list[str]) -> bool:
    """compressed-tensors' target/ignore matching: ``re:<regex>``, a module name, or a class."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == name or pattern == type(module).__name__:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def write_compressed_tensors_checkpoint(
    loaded: LoadedModel, result: QuantizationResult, out_dir: Path
) -> dict[str, Any]:
    """Write ``loaded.model`` with ``result``'s int8 weights as a compressed-tensors checkpoint.

    Refuses (before writing anything) weights that are not 8-bit symmetric per-channel: the
    format has no other int8 layout, and writing them differently would change the model.
    """
    if not result.weights:
        raise QuantmillError("nothing to export: the quantization result holds no weights")
    for name, qw in sorted(result.weights.items()):
        kind = weight_kind(qw)
        if kind != "uniform":
            raise QuantmillError(f"export format 'compressed-tensors' cannot write the {kind} "
                                 f"weights of module '{name}'")
        if qw.input_rotation is not None:
            raise QuantmillError(f"export format 'compressed-tensors' cannot write module "
                                 f"'{name}': its weight has an input rotation")
        try:
            check_w8_per_channel(qw)
        except ValueError as exc:
            raise QuantmillError(
                f"export format 'compressed-tensors' writes W8A8 int8 only; module '{name}': "
                f"{exc} (use method 'dynamic_int8', or export format 'gptq' for these weights)"
            ) from None
    model = loaded.model
    tensors, untie = float_tensors(model, set(result.weights), result.float_overrides)
    for name, qw in result.weights.items():
        module = check_module(model, name, qw)
        packed = Int8DynamicLinear.from_quantized(replace(qw, bias=module_bias(module, qw)))
        for suffix, buf in packed.state_dict().items():
            tensors[f"{name}.{suffix}"] = buf.detach().to("cpu").contiguous()
    ignore = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name not in result.weights]
    quant_config = build_quantization_config(ignore)
    config = _config_dict(model, quant_config, untie=untie)
    summary = save_hf_layout(loaded, tensors, config, out_dir)
    return {
        "format": FORMAT_NAME,
        "compressed_tensors_format": "int-quantized",
        "scheme": "W8A8 int8: weights per output channel, activations per token at run time",
        "quantized_modules": len(result.weights),
        "bits": {name: qw.bits for name, qw in result.weights.items()},
        "ignore": ignore,
        "quantization_config": quant_config,
        **summary,
    }


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def read_quantization_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json as a dict, its checked W8A8 ``quantization_config``)."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise QuantmillError(f"no {CONFIG_NAME} in compressed-tensors checkpoint directory {path}")
    config = _read_json(config_file)
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise QuantmillError(f"{config_file} has no quantization_config: {path} is not a "
                             "compressed-tensors checkpoint")
    check_w8a8_config(qcfg, path)
    return config, qcfg


def _int8_module(name: str, module: torch.nn.Module,
                 tensors: dict[str, torch.Tensor]) -> Int8DynamicLinear:
    """A meta-device Int8DynamicLinear shaped like ``name``'s tensors, checked against the model."""
    if not isinstance(module, torch.nn.Linear):
        raise QuantmillError(f"checkpoint quantizes '{name}', which is not a linear layer")
    weight, scale = tensors.get(f"{name}.weight"), tensors[f"{name}.weight_scale"]
    shape = (module.out_features, module.in_features)
    if weight is None or weight.dtype != torch.int8 or tuple(weight.shape) != shape:
        found = "nothing" if weight is None else f"{weight.dtype} {tuple(weight.shape)}"
        raise QuantmillError(f"{name}.weight must be int8 {shape} for a W8A8 checkpoint; "
                             f"found {found}")
    if not scale.is_floating_point() or scale.numel() != module.out_features:
        raise QuantmillError(f"{name}.weight_scale must hold one float per output channel "
                             f"({module.out_features}); found {scale.dtype} {tuple(scale.shape)}")
    tensors[f"{name}.weight_scale"] = scale.reshape(module.out_features, 1)
    zero_point = tensors.pop(f"{name}.weight_zero_point", None)  # older writers kept zeros
    if zero_point is not None and bool(zero_point.ne(0).any()):
        raise QuantmillError(f"{name}.weight_zero_point is not zero: the weights are not "
                             "symmetric, which W8A8 int8 requires")
    bias = tensors.get(f"{name}.bias")
    return Int8DynamicLinear(
        module.in_features, module.out_features, bias=bias is not None,
        scale_dtype=scale.dtype, bias_dtype=bias.dtype if bias is not None else torch.float16,
        device="meta",
    )


def load_compressed_tensors_checkpoint(
    path: Path,
    device: torch.device | str = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a W8A8 int8 compressed-tensors checkpoint; its quantized linears become
    ``Int8DynamicLinear`` modules holding the file's int8 weights and scales as they are.

    The skeleton is built on the meta device and the file's tensors are assigned into it (memory
    close to the file size); other float tensors are cast to ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    device = torch.device(device)
    if not path.is_dir():
        raise QuantmillError(f"compressed-tensors checkpoint path is not a directory: {path}")
    config_dict, qcfg = read_quantization_config(path)
    if not ((path / WEIGHTS_NAME).is_file() or (path / WEIGHTS_INDEX_NAME).is_file()):
        raise QuantmillError(f"no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in compressed-tensors "
                             f"checkpoint directory {path}")
    files = _weight_files(path)
    config_dict.pop("quantization_config", None)
    config = _config_from_dict(config_dict, path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors(files, device)

    targets = sorted({t for g in qcfg["config_groups"].values() for t in g.get("targets", [])})
    ignore = list(qcfg.get("ignore") or [])
    quantized = sorted(k.removesuffix(".weight_scale") for k in tensors
                       if k.endswith(".weight_scale"))
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Linear) and name not in quantized
                and _matches(name, module, targets) and not _matches(name, module, ignore)):
            raise QuantmillError(f"{path}: quantization_config targets '{name}' but the "
                                 "checkpoint has no int8 weight_scale for it")
    keep_dtype: set[str] = set()
    for name in quantized:
        swap_quantized_module(
            model, name, lambda module, name=name: _int8_module(name, module, tensors))
        keep_dtype.update(f"{name}.{suffix}" for suffix in QUANTIZED_SUFFIXES)

    assign_checkpoint_tensors(model, tensors, keep_dtype, dtype, path, device)
    fuse_siblings(model)  # q/k/v and gate/up share one int8 GEMM (same results, faster)
    tokenizer = directory_tokenizer(path)
    defining = files + [path / CONFIG_NAME]
    if (path / WEIGHTS_INDEX_NAME).is_file() and not (path / WEIGHTS_NAME).is_file():
        defining.append(path / WEIGHTS_INDEX_NAME)
    return LoadedModel(model, tokenizer, path, FORMAT_NAME, defining)


# --------------------------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------------------------


class CompressedTensorsExporter(Exporter):
    """Writes W8A8 int8 compressed-tensors checkpoints (vLLM / transformers layout).

    Sample recipe section::

        export: {format: compressed-tensors}
    """

    name = FORMAT_NAME
    format_name = FORMAT_NAME
    accepts_weight_kinds = frozenset({"uniform"})
    accepts_float_overrides = True

    def refuse_spec(self, spec: ModuleQuantSpec) -> str | None:
        if spec.rotation_seed is not None:
            return ("it has no input rotations (the quantizer's rotation: hadamard); use "
                    "export format 'gptq' (quant_method quantmill_rotated_gptq) or 'dequantized'")
        if spec.bits == 8 and spec.sym and spec.group_size == -1:
            return None
        return (f"it writes W8A8 int8 only (8-bit symmetric per-channel weights), not "
                f"{spec.bits}-bit {'symmetric' if spec.sym else 'asymmetric'} weights with "
                f"group size {spec.group_size}; use method 'dynamic_int8', or export format "
                f"'gptq' for these weights")

    def export(
        self, loaded: LoadedModel, result: QuantizationResult, out_dir: Path
    ) -> dict[str, Any]:
        return write_compressed_tensors_checkpoint(loaded, result, out_dir)


class CompressedTensorsSource(ModelSource):
    """A W8A8 int8 compressed-tensors checkpoint directory (quantmill's or llm-compressor's)."""

    name = FORMAT_NAME

    def check(self, path: Path) -> None:
        check_weights_directory(path)
        read_quantization_config(path)

    def accepts(self, path: Path) -> bool:
        return path.is_dir() and _has_quantization_config(path, QUANT_METHOD)

    def load(self, path: Path, device: torch.device) -> LoadedModel:
        self.check(path)
        return load_compressed_tensors_checkpoint(path, device=device)

    def load_tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)


@hookimpl
def register_exporters() -> list[type[Exporter]]:
    return [CompressedTensorsExporter]


@hookimpl
def register_model_sources() -> list[type[ModelSource]]:
    return [CompressedTensorsSource]
