"""Recipes: the YAML file that describes one compression job, validated before any work starts.

A recipe has fixed top-level sections (unknown keys are an error). Sections that choose a plugin
name it with one key (``source``, ``method``, ``evaluator``, ``format``, ``backend``); every other
key of the section belongs to that plugin and is checked by the plugin's own pydantic ``Config``.
Relative paths are relative to the recipe file; ``~`` and ``$VARS`` are expanded, and
``$QUANTMILL_HOME`` has its default even when unset.

Example (``examples/demo-smollm2-rtn-w4g128.yaml``)::

    name: smollm2-135m-rtn-w4g128
    model: {path: $QUANTMILL_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf}
    calibration: {source: text, path: ../data/wikitext-2/valid.txt, num_samples: 128}
    quantization: {method: rtn, bits: 4, group_size: 128}
    evaluation:
      - {evaluator: perplexity, dataset: ../data/wikitext-2/test.txt, max_windows: 40}
      - {evaluator: size}
    export: {format: gptq}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantmill.plugins import base
from quantmill.plugins.catalog import Catalog, Registry
from quantmill.plugins.errors import ConfigError, QuantmillError
from quantmill.plugins.home import quantmill_home
from quantmill.plugins.models.modules import quantizable_linears


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _PluginSection(BaseModel):
    """A section naming a plugin; its other keys are the plugin's options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelSection(_Strict):
    path: str
    source: str = "auto"


class CalibrationSection(_PluginSection):
    source: str = "text"


class QuantizationSection(_PluginSection):
    method: str
    allocator: str = "uniform"
    allocator_options: dict[str, Any] = Field(default_factory=dict)


class EvaluationSection(_PluginSection):
    evaluator: str


class ExportSection(_PluginSection):
    format: str = "gptq"


class StorageSection(_PluginSection):
    backend: str = "local"


class Recipe(_Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    model: ModelSection
    calibration: CalibrationSection | None = None
    quantization: QuantizationSection
    evaluation: list[EvaluationSection] = Field(default_factory=list)
    export: ExportSection = Field(default_factory=ExportSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    device: Literal["auto", "cpu", "cuda"] = "auto"


def _format_validation_error(where: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in (where, *first["loc"]) if part != "")
    if first["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if first["type"] == "missing":
        return f"missing key '{loc}'"
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid '{loc}': {message}"


def expand_path(value: str, base_dir: Path) -> Path:
    """Expand ``$QUANTMILL_HOME`` (with its default), other ``$VARS`` and ``~``; anchor relative
    paths at ``base_dir``."""
    home = str(quantmill_home())
    value = re.sub(r"\$\{QUANTMILL_HOME\}|\$QUANTMILL_HOME\b", lambda _: home, value)
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    return path if path.is_absolute() else (base_dir / path).resolve()


def parse_recipe(data: Any, base_dir: Path) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError("a recipe must be a mapping of sections (name, model, quantization...)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error("", exc)) from None


def load_recipe_file(path: Path) -> tuple[Recipe, str]:
    """Parse and validate a recipe file; returns the recipe and the file's text."""
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}".splitlines()[0]) from None
    return parse_recipe(data, path.parent), text


# ---------------------------------------------------------------------------------------------
# Resolution: a recipe plus the plugin catalog -> configured plugin instances
# ---------------------------------------------------------------------------------------------


def _anchor_paths(config: base.PluginConfig, base_dir: Path) -> base.PluginConfig:
    """Resolve every Path-valued setting relative to the recipe's directory."""
    updates = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, Path):
            updates[name] = expand_path(str(value), base_dir)
    return config.model_copy(update=updates) if updates else config


def build_plugin(
    registry: Registry, name: str, options: dict[str, Any], where: str, base_dir: Path
) -> base.Plugin:
    cls = registry.get(name)
    try:
        config = cls.Config.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(where, exc)) from None
    return cls(_anchor_paths(config, base_dir))


@dataclass
class Job:
    """A validated recipe with its plugins configured: everything a flow needs to run."""

    recipe: Recipe
    recipe_text: str
    recipe_path: Path
    model_path: Path
    model_source: base.ModelSource
    calibration: base.CalibrationSource | None
    quantizer: base.Quantizer
    allocator: base.BitAllocator
    evaluators: list[base.Evaluator]
    exporter: base.Exporter
    storage: base.StorageBackend
    plugin_versions: dict[str, str]

    @property
    def recipe_sha256(self) -> str:
        return hashlib.sha256(self.recipe_text.encode()).hexdigest()

    def recipe_json(self) -> dict[str, Any]:
        return json.loads(self.recipe.model_dump_json())

    def device(self) -> torch.device:
        if self.recipe.device == "cuda" or (
            self.recipe.device == "auto" and torch.cuda.is_available()
        ):
            return torch.device("cuda")
        return torch.device("cpu")

    def quantizable(self, model: torch.nn.Module) -> list[str]:
        return quantizable_linears(model, self.quantizer.skip_patterns())


def _select_source(catalog: Catalog, section: ModelSection, path: Path) -> base.ModelSource:
    if section.source != "auto":
        return catalog.model_sources.get(section.source)()
    name = catalog.pm.hook.select_model_source(
        path=str(path), candidates=catalog.model_sources.classes()
    )
    if name is None:
        if not path.exists():
            raise QuantmillError(f"model path does not exist: {path}")
        raise QuantmillError(f"no model source accepts {path} (set model.source explicitly)")
    return catalog.model_sources.get(name)()


def resolve_job(recipe: Recipe, recipe_text: str, recipe_path: Path, catalog: Catalog) -> Job:
    """Configure every plugin the recipe names and run their cheap input checks."""
    base_dir = recipe_path.parent.resolve()
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but torch sees no CUDA device here")
    model_path = expand_path(recipe.model.path, base_dir)
    source = _select_source(catalog, recipe.model, model_path)
    source.check(model_path)

    calibration = None
    if recipe.calibration is not None:
        calibration = build_plugin(catalog.calibration_sources, recipe.calibration.source,
                                   recipe.calibration.options, "calibration", base_dir)
        calibration.check()
    q = recipe.quantization
    quantizer = build_plugin(catalog.quantizers, q.method, q.options, "quantization", base_dir)
    if quantizer.needs_calibration and calibration is None:
        reason = quantizer.calibration_reason()
        raise ConfigError(f"quantization method '{q.method}' needs a 'calibration' section"
                          + (f": {reason}" if reason else ""))
    allocator = build_plugin(catalog.bit_allocators, q.allocator, q.allocator_options,
                             "quantization.allocator_options", base_dir)
    if allocator.needs_calibration and calibration is None:
        raise ConfigError(f"allocator '{q.allocator}' needs a 'calibration' section")
    evaluators = []
    for index, section in enumerate(recipe.evaluation):
        evaluator = build_plugin(catalog.evaluators, section.evaluator, section.options,
                                 f"evaluation.{index}", base_dir)
        evaluator.check()
        evaluators.append(evaluator)
    exporter = build_plugin(catalog.exporters, recipe.export.format, recipe.export.options,
                            "export", base_dir)
    if quantizer.weight_kind not in exporter.accepts_weight_kinds:
        raise ConfigError(
            f"export format '{recipe.export.format}' cannot write the {quantizer.weight_kind} "
            f"weights that method '{q.method}' produces (it writes: "
            f"{', '.join(sorted(exporter.accepts_weight_kinds))})")
    if quantizer.changes_float_tensors and not exporter.accepts_float_overrides:
        raise ConfigError(
            f"method '{q.method}' with these settings changes float tensors (e.g. norm "
            f"weights) that export format '{recipe.export.format}' cannot write; use a "
            "built-in format, or turn off the setting that changes them")
    default = quantizer.default_spec()
    for spec in allocator.possible_specs(default) if default is not None else []:
        reason = exporter.refuse_spec(spec)
        if reason is not None:
            raise ConfigError(f"export format '{recipe.export.format}' cannot write what method "
                              f"'{q.method}' produces: {reason}")
    storage = build_plugin(catalog.storage_backends, recipe.storage.backend,
                           recipe.storage.options, "storage", base_dir)
    plugins = [source, calibration, quantizer, allocator, *evaluators, exporter, storage]
    versions = {f"{type(p).__module__}:{p.name}": type(p).version() for p in plugins if p}
    return Job(recipe, recipe_text, recipe_path.resolve(), model_path, source, calibration,
               quantizer, allocator, evaluators, exporter, storage, versions)


def load_job(recipe_path: Path, catalog: Catalog) -> Job:
    recipe, text = load_recipe_file(recipe_path)
    return resolve_job(recipe, text, recipe_path, catalog)
