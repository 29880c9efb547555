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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantmill.flows.artifacts import Backends
from quantmill.flows.input_roots import InputRoots, check_readable_input
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
    #: also write the checkpoint as a plain Hugging Face directory here (s3:// or a path)
    publish: str | None = None


class StorageSection(_PluginSection):
    #: None: ``$QUANTMILL_STORAGE_URL`` (e.g. ``s3://bucket/prefix``) if set, else ``local``
    backend: str | None = None


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

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        """The name is how runs and checkpoints are found: blank or control characters are
        refused rather than registered."""
        if not value.strip():
            raise ValueError("the recipe's name is blank; name the job")
        if any(ord(char) < 32 or ord(char) == 127 for char in value):
            raise ValueError("the recipe's name contains a control character")
        return value


def _format_validation_error(where: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in (where, *first["loc"]) if part != "")
    if first["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if first["type"] == "missing":
        return f"missing key '{loc}'"
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid '{loc}': {message}"


#: Keys that hold secrets. A recipe is recorded in the registry and shown in the Prefect UI, so
#: it must never carry one: credentials come from boto3's standard chain.
_SECRET_KEY_RE = re.compile(
    r"secret|password|passwd|credential|session_token|access_key|api_key|(^|_)token$",
    re.IGNORECASE)
_SECRET_VALUE_RE = re.compile(r"://[^/\s:@]+:[^/\s@]+@|\b(AKIA|ASIA)[0-9A-Z]{16}\b|"
                              r"X-Amz-(Credential|Signature|Security-Token)", re.IGNORECASE)


def refuse_credentials(data: Any, where: str = "") -> None:
    """Refuse a recipe carrying credentials, naming the key but never repeating the value."""
    if isinstance(data, dict):
        for key, value in data.items():
            here = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and _SECRET_KEY_RE.search(key):
                raise ConfigError(
                    f"'{here}': credentials do not belong in a recipe (recipes are recorded in "
                    "the registry and shown in Prefect); use boto3's standard chain: "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role")
            refuse_credentials(value, here)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            refuse_credentials(value, f"{where}.{index}")
    elif isinstance(data, str) and _SECRET_VALUE_RE.search(data):
        raise ConfigError(f"'{where}' holds what looks like a credential (user:secret@ in a URL, "
                          "an AWS access key id or presigned-URL parameters); credentials do "
                          "not belong in a recipe: use boto3's standard chain")


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
    refuse_credentials(data)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error("", exc)) from None


def load_recipe_file(path: Path) -> tuple[Recipe, str]:
    """Parse and validate a recipe file; returns the recipe and the file's text."""
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {path} is not a YAML text file (not UTF-8: byte "
                          f"{exc.start})") from None
    return parse_recipe(load_yaml_text(text, f"recipe {path}"), path.parent), text


#: Deeper nesting than any recipe needs; deeper documents are refused before anything walks them.
MAX_DEPTH = 32


def load_yaml_text(text: str, what: str) -> Any:
    """``yaml.safe_load`` whose every failure is one ConfigError line naming ``what``: bad
    syntax, nesting too deep for the parser (or for ``MAX_DEPTH``)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {exc}".splitlines()[0]) from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    _check_depth(data, what)
    return data


def _check_depth(data: Any, what: str) -> None:
    """Refuse documents nested deeper than ``MAX_DEPTH`` (walked without recursion)."""
    pending = [(data, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)")
        children = node.values() if isinstance(node, dict) else node \
            if isinstance(node, list) else ()
        pending.extend((child, depth + 1) for child in children)


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
    #: inputs read from object storage: local (cached) path -> where it came from
    remote_inputs: dict[str, RemoteInput] = field(default_factory=dict)
    #: ``export.publish`` resolved: an s3:// URI or an absolute directory, or None
    publish_to: str | None = None

    def input_location(self, path: Path) -> tuple[str, dict[str, Any]]:
        """The URI to register for an input file and the details to read it there again."""
        remote = self.remote_inputs.get(str(path))
        if remote is not None:
            return remote.uri, dict(remote.details)
        return path.as_uri(), {"backend": "local"}

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


@dataclass(frozen=True)
class RemoteInput:
    """An input a recipe names by ``s3://`` URI, fetched into the local cache."""

    uri: str
    details: dict[str, Any]


class InputFetcher:
    """Replaces ``s3://`` values of the input sections by local cached copies (hash-checked by
    the backend), remembering where each came from so it is registered under its real URI."""

    def __init__(self, catalog: Catalog, storage: base.StorageBackend,
                 roots: InputRoots | None = None) -> None:
        self.catalog, self.storage, self.roots = catalog, storage, roots
        self.fetched: dict[str, RemoteInput] = {}

    def localize(self, value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {key: self.localize(item, f"{where}.{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [self.localize(item, f"{where}.{i}") for i, item in enumerate(value)]
        if not isinstance(value, str) or value[:5].lower() != "s3://":
            return value
        if self.roots is not None:
            self.roots.check_uri(value, where)  # before anything is fetched
        backend = Backends(self.catalog, like=self.storage).for_location(value)
        try:
            path = backend.fetch(value)
        except QuantmillError as exc:
            raise QuantmillError(f"'{where}': {exc}") from None
        self.fetched[str(path)] = RemoteInput(value, backend.location_details())
        return str(path)


def _storage_choice(section: StorageSection, catalog: Catalog) -> tuple[str, dict[str, Any]]:
    """The backend and options the recipe's storage section means (or the environment's
    ``QUANTMILL_STORAGE_URL`` when the recipe names no backend)."""
    if section.backend is not None:
        return section.backend, section.options
    if section.options:
        raise ConfigError("missing key 'storage.backend' (local or s3) beside "
                          f"'{next(iter(section.options))}'")
    url = os.environ.get("QUANTMILL_STORAGE_URL", "").strip()
    if not url:
        return "local", {}
    refuse_credentials(url, "QUANTMILL_STORAGE_URL")
    if "://" not in url:
        raise ConfigError(f"QUANTMILL_STORAGE_URL={url!r} is not a URL (use "
                          "s3://BUCKET/PREFIX or file:///DIR)")
    try:
        cls = Backends(catalog).class_for(url)
        return cls.name, cls.options_from_url(url)
    except (ValueError, QuantmillError) as exc:
        raise ConfigError(f"QUANTMILL_STORAGE_URL: {exc}") from None


def default_storage(catalog: Catalog) -> base.StorageBackend:
    """The storage a recipe without a ``storage`` section would use."""
    backend, options = _storage_choice(StorageSection(), catalog)
    storage = build_plugin(catalog.storage_backends, backend, options, "storage", Path.cwd())
    assert isinstance(storage, base.StorageBackend)
    return storage


def _publish_target(value: str | None, base_dir: Path) -> str | None:
    if value is None:
        return None
    if value[:5].lower() == "s3://":
        from quantmill.storage.s3_location import parse_s3_uri

        try:
            parse_s3_uri(value)
        except ConfigError as exc:
            raise ConfigError(f"invalid 'export.publish': {exc}") from None
        return value if value.endswith("/") else value + "/"
    if "://" in value:
        raise ConfigError(f"invalid 'export.publish': {value!r} is neither s3:// nor a path")
    return str(expand_path(value, base_dir))


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


def resolve_job(recipe: Recipe, recipe_text: str, recipe_path: Path, catalog: Catalog,
                roots: InputRoots | None = None) -> Job:
    """Configure every plugin the recipe names and run their cheap input checks.

    ``roots`` bounds what the job may read (``flows/input_roots.py``); without it the
    environment's ``QUANTMILL_INPUT_ROOTS`` does, when set.
    """
    roots = roots if roots is not None else InputRoots.from_environment()
    base_dir = recipe_path.parent.resolve()
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but torch sees no CUDA device here")
    backend, storage_options = _storage_choice(recipe.storage, catalog)
    storage = build_plugin(catalog.storage_backends, backend, storage_options, "storage",
                           base_dir)
    publish_to = _publish_target(recipe.export.publish, base_dir)
    storage.check()
    inputs = InputFetcher(catalog, storage, roots)

    def guard(path: Path, where: str) -> None:
        if str(path) in inputs.fetched:
            return  # an s3:// input: its URI was checked before it was fetched
        check_readable_input(path, where)
        if roots is not None:
            roots.check_path(path, where)

    model_path = expand_path(inputs.localize(recipe.model.path, "model.path"), base_dir)
    guard(model_path, "model.path")
    source = _select_source(catalog, recipe.model, model_path)
    source.check(model_path)

    calibration = None
    if recipe.calibration is not None:
        calibration = build_plugin(catalog.calibration_sources, recipe.calibration.source,
                                   inputs.localize(recipe.calibration.options, "calibration"),
                                   "calibration", base_dir)
        for path in calibration.data_files():
            guard(path, "calibration")
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
        evaluator = build_plugin(catalog.evaluators, section.evaluator,
                                 inputs.localize(section.options, f"evaluation.{index}"),
                                 f"evaluation.{index}", base_dir)
        for path in evaluator.data_files():
            guard(path, f"evaluation.{index}")
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
    plugins = [source, calibration, quantizer, allocator, *evaluators, exporter, storage]
    versions = {f"{type(p).__module__}:{p.name}": type(p).version() for p in plugins if p}
    return Job(recipe, recipe_text, recipe_path.resolve(), model_path, source, calibration,
               quantizer, allocator, evaluators, exporter, storage, versions,
               remote_inputs=inputs.fetched, publish_to=publish_to)


def load_job(recipe_path: Path, catalog: Catalog) -> Job:
    recipe, text = load_recipe_file(recipe_path)
    return resolve_job(recipe, text, recipe_path, catalog)
