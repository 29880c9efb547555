"""Contracts every quantmill plugin implements, and the plain data they exchange.

Why a contract per role: the flows only ever talk to these classes, so a third-party quantizer,
evaluator or storage backend is a drop-in for a built-in one. Each contract has exactly one
required method; everything else has a sensible default. Each plugin declares its settings as a
pydantic model (``Config``) that rejects unknown keys, so a typo in a recipe stops the job before
any work starts.

Nothing here imports prefect, the registry or storage: plugins are pure and testable on CPU.
"""

from __future__ import annotations

import abc
import functools
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from quantmill.plugins.hadamard import InputRotation

if TYPE_CHECKING:
    from quantmill.plugins.blockwise.resume import BlockStore


@functools.lru_cache(maxsize=8)
def _distributions(search_path: tuple[str, ...]) -> Mapping[str, list[str]]:
    """``packages_distributions()``, once per import path: it scans every installed
    distribution's metadata (0.4-1 s on a busy machine) and each job resolves its plugins'
    versions several times. Keyed by ``sys.path`` so a plugin installed later is still seen."""
    from importlib.metadata import packages_distributions

    return packages_distributions()


class PluginConfig(BaseModel):
    """Base of every plugin's settings: unknown keys are an error, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin(abc.ABC):
    """What every plugin class shares: a unique ``name`` and a ``Config`` model."""

    name: ClassVar[str]
    Config: ClassVar[type[PluginConfig]] = PluginConfig

    def __init__(self, config: PluginConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Plugin:
        """Build the plugin from a recipe section (raises pydantic.ValidationError)."""
        return cls(cls.Config.model_validate(dict(options)))

    @classmethod
    def version(cls) -> str:
        """The version of the distribution that ships this plugin (for provenance)."""
        from importlib.metadata import PackageNotFoundError, version

        top = cls.__module__.split(".")[0]
        for dist in _distributions(tuple(sys.path)).get(top, []):
            try:
                return version(dist)
            except PackageNotFoundError:  # pragma: no cover - broken metadata
                continue
        return "unknown"


# --------------------------------------------------------------------------------------------
# Data exchanged between plugins
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to run: the torch module, its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: Any
    source_path: Path
    source_format: str  # "hf-safetensors", "gguf", "gptq", ...
    files: list[Path] = field(default_factory=list)  # files whose bytes define the model


@dataclass(frozen=True)
class CalibrationSet:
    """Token ids for calibration: ``input_ids`` is int64 [num_samples, seq_len]."""

    input_ids: torch.Tensor
    description: dict[str, Any]

    @property
    def sha256(self) -> str:
        """Content hash of the token ids (shape, dtype and values), independent of the source."""
        import hashlib

        ids = self.input_ids.to(torch.int64).contiguous()
        digest = hashlib.sha256()
        digest.update(repr(tuple(ids.shape)).encode())
        digest.update(ids.numpy().tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class ModuleQuantSpec:
    """How one linear module is to be quantized: the unit of a per-module plan."""

    bits: int
    group_size: int  # -1: one group per output channel (all input columns)
    sym: bool
    method: str
    #: the seed of the quantizer's randomized Hadamard input rotations, None when it does not
    #: rotate (the allocator measures the rotated weights then)
    rotation_seed: int | None = None


@dataclass(frozen=True)
class QuantPlan:
    """An explicit per-module plan: module name -> spec. Modules absent stay in float.

    ``details`` is how the allocator arrived at the plan (for a mixed-precision plan: the budget,
    the candidate formats and the measured sensitivity table); it is stored in the registry with
    the run so an auditor can see why a module got its bits.
    """

    modules: dict[str, ModuleQuantSpec]
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        def spec(s: ModuleQuantSpec) -> dict[str, Any]:
            out = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "method": s.method}
            if s.rotation_seed is not None:
                out["rotation_seed"] = s.rotation_seed
            return out

        return {name: spec(s) for name, s in sorted(self.modules.items())}

    @classmethod
    def from_json(cls, modules: Mapping[str, Mapping[str, Any]],
                  details: Mapping[str, Any] | None = None) -> QuantPlan:
        """The plan ``to_json`` wrote (a step on another process rebuilds it from this)."""
        return cls({name: ModuleQuantSpec(**dict(spec)) for name, spec in modules.items()},
                   dict(details or {}))


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input features; -1 means one group, and a last group may be shorter."""
    return 1 if group_size == -1 else -(-in_features // group_size)


@dataclass
class QuantizedWeight:
    """One quantized linear weight in unpacked integer form.

    ``intweight`` is [out_features, in_features] with values in [0, 2**bits - 1]; the stored
    weight is ``(intweight - zeros[g_idx].T) * scales[g_idx].T``. ``scales`` are float32 values
    already rounded to fp16 (so a checkpoint reproduces them exactly) and ``zeros`` integers, both
    [num_groups, out_features]; ``g_idx`` [in_features] maps each input column to its group.

    With an ``input_rotation`` T (``plugins/hadamard.py``) the stored weight is ``W @ T``: the
    layer computes ``(x @ T) @ stored.T``, i.e. it stands for the weight ``stored @ T.T``, which
    is what ``dequantize`` returns (``dequantize_stored`` gives the rotated one).
    """

    intweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    bias: torch.Tensor | None = None
    input_rotation: InputRotation | None = None

    @property
    def out_features(self) -> int:
        return int(self.intweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.intweight.shape[1])

    def dequantize_stored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight as floats, [out_features, in_features] (rotated, if rotated)."""
        gi = self.g_idx.long()
        scales = self.scales.to(torch.float32)[gi].T  # [out, in]
        zeros = self.zeros.to(torch.float32)[gi].T  # [out, in]
        return ((self.intweight.to(torch.float32) - zeros) * scales).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, [out_features, in_features] (unrotated)."""
        stored = self.dequantize_stored()
        if self.input_rotation is not None:
            stored = self.input_rotation.apply_transpose(stored)
        return stored.to(dtype)


@dataclass
class ClusteredWeight:
    """One linear weight as a non-uniform codebook per output row (weight clustering).

    ``indices`` is uint8 [out_features, in_features] with values in [0, 2**bits - 1];
    ``codebook`` is float32 [out_features, 2**bits], values already rounded to fp16 (so a
    checkpoint reproduces them exactly). The weight it stands for is
    ``codebook.gather(1, indices)``: a look-up, not an affine map, so no scale or zero exists.
    """

    indices: torch.Tensor
    codebook: torch.Tensor
    bits: int
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return int(self.indices.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.indices.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as floats, [out_features, in_features]."""
        return self.codebook.to(torch.float32).gather(1, self.indices.long()).to(dtype)


#: Every kind of quantized weight a quantizer may produce; exporters declare which they write.
QuantizedTensor = QuantizedWeight | ClusteredWeight

WEIGHT_KINDS: dict[type, str] = {QuantizedWeight: "uniform", ClusteredWeight: "codebook"}


def weight_kind(weight: QuantizedTensor) -> str:
    """``"uniform"`` (integers with scales and zeros), ``"codebook"`` (look-up table), or what
    a weight class of a quantizer's own declares as ``WEIGHT_KIND`` (``"trellis"``)."""
    kind = WEIGHT_KINDS.get(type(weight)) or getattr(type(weight), "WEIGHT_KIND", None)
    if kind is None:
        raise TypeError(f"{type(weight).__name__} is not a quantized weight kind quantmill knows")
    return kind


@dataclass
class QuantizationResult:
    """What a quantizer hands to an exporter: the quantized weights and how they were made.

    ``float_overrides`` maps state-dict keys (``"model.norm.weight"``) to new float tensors for
    parameters that stay in float but that the quantizer changed (SmoothQuant folds its
    activation scales into the norms). Quantizers never modify the model they are given (the
    flow evaluates the base model from it afterwards), so this is the only way such a change
    reaches the checkpoint: an exporter must write these values in place of the model's, or
    refuse when ``accepts_float_overrides`` is False. Keys never name a quantized module's
    weight or bias (those live in ``weights``).
    """

    weights: dict[str, QuantizedTensor]
    plan: QuantPlan
    details: dict[str, Any] = field(default_factory=dict)
    float_overrides: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str = ""


@dataclass(frozen=True)
class EvaluationResult:
    """Metrics from one evaluator on one model, with the protocol that produced them."""

    evaluator: str
    metrics: list[Metric]
    protocol: dict[str, Any]
    dataset_path: Path | None = None

    def as_dict(self) -> dict[str, float]:
        return {m.name: m.value for m in self.metrics}


@dataclass(frozen=True)
class StoredObject:
    """Where a storage backend put a file or a directory tree, and its content hash."""

    uri: str
    sha256: str
    size_bytes: int


# --------------------------------------------------------------------------------------------
# Contracts
# --------------------------------------------------------------------------------------------


class ModelSource(Plugin):
    """Loads a model from a path. ``check`` runs before any job starts (cheap, no loading)."""

    def check(self, path: Path) -> None:
        """Raise ``QuantmillError`` naming the problem if ``path`` cannot be loaded."""

    def accepts(self, path: Path) -> bool:
        """Whether ``source: auto`` should pick this source for ``path``."""
        return False

    @abc.abstractmethod
    def load(self, path: Path, device: torch.device) -> LoadedModel: ...

    def load_deferred(self, path: Path, device: torch.device) -> LoadedModel:
        """Like ``load``, but a source may leave decoder-block linear weights on the meta device
        with a fetcher attached (``plugins.models.deferred``) for layer-by-layer consumers.
        The default loads everything."""
        return self.load(path, device)

    def load_tokenizer(self, path: Path) -> Any:
        """Only the tokenizer (calibration needs no weights); sources override this when they
        can read it without loading the model."""
        return self.load(path, torch.device("cpu")).tokenizer


class CalibrationSource(Plugin):
    """Produces calibration token ids with a model's tokenizer."""

    def check(self) -> None:
        """Raise ``QuantmillError`` naming the problem if the data cannot be read."""

    def data_files(self) -> list[Path]:
        """The files the calibration set is drawn from (registered as dataset artifacts)."""
        return []

    @abc.abstractmethod
    def build(self, tokenizer: Any) -> CalibrationSet: ...


class BitAllocator(Plugin):
    """Turns a model and the recipe's quantization settings into an explicit per-module plan."""

    #: True when ``plan`` measures the model on the calibration set (the recipe must have one)
    needs_calibration: ClassVar[bool] = False

    @abc.abstractmethod
    def plan(
        self,
        model: torch.nn.Module,
        quantizable: list[str],
        default: ModuleQuantSpec,
        calibration: CalibrationSet | None,
    ) -> QuantPlan:
        """Choose a spec for each of ``quantizable``; ``default`` is the quantizer's own."""

    def possible_specs(self, default: ModuleQuantSpec) -> list[ModuleQuantSpec]:
        """Every spec ``plan`` may choose, known before any work: the recipe is checked against
        the exporter with these (a plan the exporter cannot write is refused up front)."""
        return [default]


class Quantizer(Plugin):
    """Quantizes the linear modules a plan names; never mutates the model it is given."""

    needs_calibration: ClassVar[bool] = False
    #: True when ``quantize`` may return ``float_overrides`` (changed float tensors, e.g. norm
    #: weights that absorb a smoothing scale): a recipe pairing it with an exporter that cannot
    #: write them is refused before any work, not after quantizing. Refined per instance.
    changes_float_tensors: ClassVar[bool] = False
    #: the kind of weights ``quantize`` returns (see ``weight_kind``); the recipe is refused
    #: before any work starts when the chosen exporter cannot write that kind
    weight_kind: ClassVar[str] = "uniform"
    #: True when ``quantize`` fetches deferred decoder-block weights itself (layer by layer), so
    #: the job may load the model with ``ModelSource.load_deferred`` to save memory.
    accepts_deferred_weights: ClassVar[bool] = False

    def default_spec(self) -> ModuleQuantSpec | None:
        """The uniform spec from this quantizer's own settings (for the uniform allocator)."""
        return None

    def calibration_reason(self) -> str:
        """Why these settings need calibration data and how to do without, for the error a
        recipe without a calibration section gets ("" when there is nothing to add)."""
        return ""

    def skip_patterns(self) -> list[str]:
        """Module-name patterns (fnmatch) that must stay in float."""
        return []

    #: True when ``quantize`` accepts a ``work_area`` (``plugins.blockwise.resume.WorkArea``)
    #: and keeps each finished decoder block there, so a rerun of an interrupted job continues
    #: at the first unfinished block and returns the same result. A layer-wise quantizer gets
    #: this by running through ``plugins.blockwise.pipeline.run_blockwise`` with the area the
    #: flow passes in; the flow keys the area by the base model, the calibration set, the
    #: quantizer's resolved config, the plan and the quantmill version (``flows/work.py``).
    resumable: ClassVar[bool] = False

    @abc.abstractmethod
    def quantize(
        self,
        model: torch.nn.Module,
        plan: QuantPlan,
        calibration: CalibrationSet | None,
    ) -> QuantizationResult:
        """Quantize ``plan``'s modules. A ``resumable`` quantizer also takes
        ``work_area: WorkArea | None = None`` (passed only to such quantizers)."""


class Evaluator(Plugin):
    """Measures a model (perplexity, size, speed...)."""

    def check(self) -> None:
        """Raise ``QuantmillError`` naming the problem if the evaluator's inputs are missing."""

    def data_files(self) -> list[Path]:
        return []

    @abc.abstractmethod
    def evaluate(self, loaded: LoadedModel, checkpoint_dir: Path | None) -> EvaluationResult: ...


class Exporter(Plugin):
    """Writes a quantized model as a checkpoint directory other runtimes can load.

    ``format_name`` is recorded on the artifact and is also the name of the model source that
    reads the checkpoint back (quantized models are evaluated from the written files, so the
    numbers describe what users download, not an in-memory approximation).
    """

    format_name: ClassVar[str]
    #: the weight kinds (``weight_kind``) this exporter can write
    accepts_weight_kinds: ClassVar[frozenset[str]] = frozenset({"uniform"})
    #: True when ``export`` writes ``QuantizationResult.float_overrides`` in place of the
    #: model's tensors; the flow refuses to hand overrides to an exporter that does not
    accepts_float_overrides: ClassVar[bool] = False

    @abc.abstractmethod
    def export(
        self, loaded: LoadedModel, result: QuantizationResult, out_dir: Path
    ) -> dict[str, Any]: ...

    def refuse_spec(self, spec: ModuleQuantSpec) -> str | None:
        """Why this format cannot hold weights quantized as ``spec`` (None: it can). Checked
        when the recipe is validated, so a mismatch fails before any quantization."""
        return None


class StorageBackend(Plugin):
    """Content-addressed storage for files and directory trees.

    An artifact's sha256 is ``plugins.hashing``'s hash of its file or tree whichever backend
    holds it, so the registry, lineage and ``verify`` do not care where the bytes are. Four
    required methods: store, read back (hash-checked), re-hash at the source for an audit, and
    publish a plain copy for runtimes that know nothing of quantmill.
    """

    #: the URI scheme of the locations this backend writes and reads (``file``, ``s3``)
    scheme: ClassVar[str]

    @abc.abstractmethod
    def put_tree(self, path: Path, consume: bool = False) -> StoredObject:
        """Store a file or a directory tree; idempotent for identical content. Returns only
        once every byte is confirmed stored, so the result may be registered.

        ``consume``: the caller hands ``path`` over (a freshly exported checkpoint). It is gone
        afterwards, and the backend may move it into place, or into its local read cache,
        instead of copying it, so that reading it back on this machine costs no second copy.
        """

    @abc.abstractmethod
    def fetch(self, uri: str, verify: bool = True) -> Path:
        """A local path holding the object's content, hash-checked when ``verify``."""

    @abc.abstractmethod
    def rehash(self, uri: str) -> tuple[str, int]:
        """``(sha256, size)`` of the content stored at ``uri``, read from the store itself (not
        a cache); raises ``FileNotFoundError`` (or a subclass) when it is gone."""

    @abc.abstractmethod
    def publish(self, path: Path, destination: str) -> StoredObject:
        """Write ``path`` as plain files at ``destination`` (a readable place, not the
        content-addressed layout) and return where and what was written."""

    @abc.abstractmethod
    def work_area(self, key: str) -> BlockStore:
        """The scratch objects of one interrupted-and-resumable job (``plugins.blockwise``):
        finished decoder blocks kept under ``key`` beside the artifacts, so a rerun on this or
        another machine continues where the job stopped. Not content-addressed, never
        registered; removed once the job's run is registered."""

    @abc.abstractmethod
    def work_area_keys(self) -> list[str]:
        """The keys of every work area this backend holds (``quantmill work list``)."""

    def holds(self, uri: str) -> bool:
        """``uri`` names an object in this backend's own content-addressed layout (what a
        writer over the HTTP API may register). Backends that cannot tell hold nothing."""
        return False

    def check(self) -> None:
        """A cheap check that the store can be used (run when a recipe is validated, so an
        unknown bucket or an unreachable server fails before any work)."""

    def transfer_report(self) -> dict[str, Any]:
        """What the last store or read moved (bytes sent, objects skipped...), recorded with
        the run so a rerun's savings are visible; empty when the backend does not count."""
        return {}

    def location_details(self) -> dict[str, Any]:
        """Facts (never secrets) another machine needs to read this backend's URIs, recorded
        with every location (e.g. an S3 endpoint)."""
        return {"backend": self.name}

    @classmethod
    def options_from_url(cls, url: str) -> dict[str, Any]:
        """Recipe options equivalent to ``QUANTMILL_STORAGE_URL=url``."""
        raise ValueError(f"storage backend '{cls.name}' cannot be configured from a URL")

    @classmethod
    def for_location(cls, uri: str, details: dict[str, Any],
                     like: StorageBackend | None = None) -> StorageBackend:
        """A backend able to read ``uri``, from the ``details`` recorded with the location and
        the settings of ``like`` (the job's own backend) where they apply."""
        return like if isinstance(like, cls) else cls()
