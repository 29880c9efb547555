"""Batch files: many recipes over one model, written once (a trade-off study).

A batch has a ``base`` (every recipe section except ``quantization``) and its points: an explicit
``points`` list, a compact ``matrix`` (methods x bits, plus mixed-precision budgets), or both.
Each point becomes an ordinary recipe named ``<batch name>-<label>``, and the whole batch is
validated (every expanded recipe through ``flows.recipe``, plugins configured, paths checked)
before any work starts, so a typo in the last point cannot waste the hour spent on the first.

Example (``examples/batches/tradeoff-smollm2.yaml`` is the full one)::

    name: smollm2-tradeoff
    base:                        # as a recipe: model, calibration, evaluation, export, storage
      model: {path: $QUANTMILL_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf, source: gguf}
      calibration: {source: text, path: ../../data/wikitext-2/valid.txt, num_samples: 64}
      evaluation: [{evaluator: perplexity, dataset: ../../data/wikitext-2/test.txt},
                   {evaluator: size}]
      export: {format: gptq}
    matrix:
      bits: [2, 3, 4]
      methods:                   # label prefix -> settings; `method` defaults to the key
        rtn: {quantization: {group_size: 128}}
        clustering: {quantization: {}, export: {format: lut}}
      mixed_precision:           # one point per budget, executed by methods[method]
        method: rtn
        budgets: [3.0, 3.5]
        allocator_options: {weighting: fisher}
    points:                      # anything else, spelled out
      - label: gptq-w4-damp01
        quantization: {method: gptq, bits: 4, group_size: 128, damp_percent: 0.1}

Labels: ``<key>-w<bits>`` for the matrix (``rtn-w3``), ``<key>-mixed-<budget>`` for budgets
(``rtn-mixed-3.5``), as given for explicit points. Relative paths are relative to the batch file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError

from quantmill.flows.input_roots import InputRoots
from quantmill.flows.recipe import (
    CalibrationSection,
    EvaluationSection,
    ExportSection,
    ModelSection,
    QuantizationSection,
    StorageSection,
    _format_validation_error,
    expand_path,
    load_yaml_text,
    parse_recipe,
    resolve_job,
)
from quantmill.plugins.catalog import Catalog
from quantmill.plugins.errors import ConfigError, QuantmillError
from quantmill.registry.hashing import json_sha256

LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"
MIXED_ALLOCATOR = "mixed_precision"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseRecipe(_Strict):
    """What every point shares: a recipe without its name and quantization."""

    model: ModelSection
    calibration: CalibrationSection | None = None
    evaluation: list[EvaluationSection] = Field(default_factory=list)
    export: ExportSection = Field(default_factory=ExportSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PointSpec(_Strict):
    """One explicit point: its own quantization section (and export, e.g. ``lut`` codebooks)."""

    label: str = Field(min_length=1, max_length=80, pattern=LABEL_PATTERN)
    quantization: QuantizationSection
    export: ExportSection | None = None


class MethodTemplate(_Strict):
    """Settings of one matrix method for every bit width (``bits`` comes from the matrix)."""

    quantization: dict[str, Any] = Field(default_factory=dict)
    export: ExportSection | None = None


class MixedSpec(_Strict):
    """Mixed-precision points: one per budget (average bits per quantized weight)."""

    method: str = Field("gptq", description="the key in matrix.methods that executes the plan")
    bits: int = Field(4, description="the executing quantizer's default width")
    budgets: list[PositiveFloat] = Field(min_length=1)
    allocator_options: dict[str, Any] = Field(default_factory=dict)


class Matrix(_Strict):
    bits: list[int] = Field(default_factory=list)
    methods: dict[str, MethodTemplate] = Field(min_length=1)
    mixed_precision: MixedSpec | None = None


class Batch(_Strict):
    name: str = Field(min_length=1, max_length=100, pattern=LABEL_PATTERN)
    description: str = ""
    base: BaseRecipe
    matrix: Matrix | None = None
    points: list[PointSpec] = Field(default_factory=list)


@dataclass(frozen=True)
class PlannedPoint:
    """One validated point: the recipe the compress flow will run, and how to report it."""

    label: str
    method: str
    bits: int | None
    budget: float | None
    recipe_name: str
    recipe_text: str
    recipe_sha256: str  # as the registry hashes a run's recipe: the skip key of a rerun


@dataclass(frozen=True)
class BatchPlan:
    name: str
    description: str
    path: Path  # the batch file: relative paths in every point are anchored at its folder
    points: list[PlannedPoint]
    model_path: Path


# ---------------------------------------------------------------------------------------------
# Parsing and expansion
# ---------------------------------------------------------------------------------------------


def parse_batch(data: Any) -> Batch:
    if not isinstance(data, dict):
        raise ConfigError("a batch file must be a mapping (name, base, matrix and/or points)")
    try:
        return Batch.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"batch: {_format_validation_error('', exc)}") from None


def load_batch_text(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"batch file not found: {path}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"batch {path} is not a YAML text file (not UTF-8: byte "
                          f"{exc.start})") from None


def batch_from_text(text: str, path: Path) -> Batch:
    return parse_batch(load_yaml_text(text, f"batch {path}"))


def _uniform_points(matrix: Matrix) -> list[tuple[str, dict[str, Any], dict | None, dict]]:
    points = []
    for key, template in matrix.methods.items():
        options = dict(template.quantization)
        for forbidden in ("bits", "allocator", "allocator_options"):
            if forbidden in options:
                raise ConfigError(
                    f"batch: matrix.methods.{key}.quantization sets '{forbidden}'; bits come "
                    f"from matrix.bits and allocators from matrix.mixed_precision")
        options = {"method": options.pop("method", key), **options}
        export = template.export.model_dump(mode="json", exclude_unset=True) \
            if template.export else None
        for bits in matrix.bits:
            meta = {"method": options["method"], "bits": bits, "budget": None}
            points.append((f"{key}-w{bits}", {**options, "bits": bits}, export, meta))
    return points


def _mixed_points(matrix: Matrix) -> list[tuple[str, dict[str, Any], dict | None, dict]]:
    mixed = matrix.mixed_precision
    if mixed is None:
        return []
    if mixed.method not in matrix.methods:
        raise ConfigError(f"batch: matrix.mixed_precision.method '{mixed.method}' is not one of "
                          f"matrix.methods ({', '.join(matrix.methods)})")
    for budget_key in ("avg_bits", "max_bytes"):
        if budget_key in mixed.allocator_options:
            raise ConfigError(f"batch: matrix.mixed_precision.allocator_options sets "
                              f"'{budget_key}'; the budgets come from 'budgets'")
    template = matrix.methods[mixed.method]
    options = {"method": mixed.method, **template.quantization, "bits": mixed.bits}
    export = template.export.model_dump(mode="json", exclude_unset=True) \
        if template.export else None
    points = []
    for budget in mixed.budgets:
        quantization = {**options, "allocator": MIXED_ALLOCATOR,
                        "allocator_options": {**mixed.allocator_options, "avg_bits": budget}}
        meta = {"method": options["method"], "bits": None, "budget": budget}
        points.append((f"{mixed.method}-mixed-{budget:g}", quantization, export, meta))
    return points


def expand(batch: Batch) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(label, recipe dict, report metadata)`` per point: matrix first, then explicit points."""
    raw: list[tuple[str, dict[str, Any], dict | None, dict]] = []
    if batch.matrix is not None:
        raw += _uniform_points(batch.matrix) + _mixed_points(batch.matrix)
    for point in batch.points:
        q = point.quantization
        meta = {"method": q.method, "bits": q.options.get("bits"),
                "budget": q.allocator_options.get("avg_bits") if q.allocator != "uniform"
                else None}
        export = point.export.model_dump(mode="json", exclude_unset=True) \
            if point.export else None
        raw.append((point.label, q.model_dump(mode="json", exclude_unset=True), export, meta))
    if not raw:
        raise ConfigError("batch: it has no points; give a 'points' list or a 'matrix' with "
                          "methods and bits (or mixed_precision budgets)")
    seen: set[str] = set()
    for label, *_ in raw:
        if label in seen:
            raise ConfigError(f"batch: two points are labelled '{label}'")
        seen.add(label)
    base = batch.base.model_dump(mode="json", exclude_unset=True)
    expanded = []
    for label, quantization, export, meta in raw:
        recipe = {"name": f"{batch.name}-{label}",
                  "description": f"point '{label}' of the batch '{batch.name}'",
                  **base, "quantization": quantization}
        if export is not None:
            recipe["export"] = export
        expanded.append((label, recipe, meta))
    return expanded


# ---------------------------------------------------------------------------------------------
# Validation: every point resolved as the compress flow will resolve it
# ---------------------------------------------------------------------------------------------


def plan_batch(text: str, path: Path, catalog: Catalog, only: list[str] | None = None,
               resolve: bool = True, roots: InputRoots | None = None) -> BatchPlan:
    """Parse, expand and validate the batch; raises ``ConfigError`` naming the first bad point.

    ``only`` keeps the named points (in batch order); an unknown name is an error. With
    ``resolve`` off, the points' plugins are not configured (their recipes are still parsed):
    for a caller that has just validated the same text, as resolving every point costs seconds.
    """
    path = path.resolve()
    batch = batch_from_text(text, path)
    expanded = expand(batch)
    if only:
        labels = [label for label, *_ in expanded]
        unknown = [name for name in only if name not in labels]
        if unknown:
            raise ConfigError(f"batch: no point labelled {', '.join(map(repr, unknown))} "
                              f"(points: {', '.join(labels)})")
        expanded = [item for item in expanded if item[0] in only]
    points: list[PlannedPoint] = []
    model_path: Path | None = None
    for label, data, meta in expanded:
        recipe_text = (f"# point '{label}' of the batch '{batch.name}' ({path.name})\n"
                       + yaml.safe_dump(data, sort_keys=False))
        try:
            recipe = parse_recipe(data, path.parent)
            if resolve:
                model_path = resolve_job(recipe, recipe_text, path, catalog, roots).model_path
            else:
                model_path = expand_path(recipe.model.path, path.parent)
        except QuantmillError as exc:
            raise ConfigError(f"batch point '{label}': {exc}") from None
        points.append(PlannedPoint(
            label=label, method=meta["method"], bits=meta["bits"], budget=meta["budget"],
            recipe_name=recipe.name, recipe_text=recipe_text,
            recipe_sha256=json_sha256(json.loads(recipe.model_dump_json())),
        ))
    assert model_path is not None  # expand() refuses an empty batch
    return BatchPlan(batch.name, batch.description, path, points, model_path)


def load_batch_file(path: Path, catalog: Catalog, only: list[str] | None = None) -> BatchPlan:
    return plan_batch(load_batch_text(path), path, catalog, only)
