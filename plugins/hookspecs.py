"""Every quantmill hook, in one place; the docstrings are the plugin author's documentation.

Three kinds of hook, as in pytest and datasette:

* Registration hooks (collect-all) return plugin *classes*; the catalog builds ``name -> class``
  maps from them and refuses two classes with one name.
* Decision hooks (``firstresult=True``) pick one answer; quantmill's default is a ``trylast``
  implementation in ``quantmill.plugins.core``, so a plugin can pre-empt it with ``tryfirst`` or
  wrap it with ``wrapper=True``.
* Notification hooks are all called, for side effects (audit logs, chat messages); they must not
  raise.

Call hooks with keyword arguments; implementations take only the arguments they use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from quantmill.plugins.base import (
        BitAllocator,
        CalibrationSource,
        Evaluator,
        Exporter,
        ModelSource,
        Quantizer,
        StorageBackend,
    )

PROJECT_NAME = "quantmill"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- registration hooks -------------------------------------------------------------------------


@hookspec
def register_quantizers() -> list[type[Quantizer]]:
    """Return quantizer classes (subclasses of ``quantmill.plugins.Quantizer``).

    A recipe picks one with ``quantization.method: <name>``.

    A layer-wise quantizer (one that works decoder block by decoder block from calibration
    Hessians) should not walk the blocks itself: subclass
    ``quantmill.plugins.blockwise.pipeline.BlockMethod`` (``quantize_stage`` gets each stage's
    linears and Hessian; optional hooks for whole-block work), call ``run_blockwise`` from
    ``quantize`` with the ``work_area`` it is given, and set ``resumable = True``. It then runs
    on every model family the pipeline knows, and an interrupted job resumes at its first
    unfinished block with a bit-identical result.
    """


@hookspec
def register_bit_allocators() -> list[type[BitAllocator]]:
    """Return bit-allocator classes; a recipe picks one with ``quantization.allocator``."""


@hookspec
def register_calibration_sources() -> list[type[CalibrationSource]]:
    """Return calibration-source classes; a recipe picks one with ``calibration.source``."""


@hookspec
def register_evaluators() -> list[type[Evaluator]]:
    """Return evaluator classes; each entry of a recipe's ``evaluation`` list names one."""


@hookspec
def register_exporters() -> list[type[Exporter]]:
    """Return exporter (checkpoint writer) classes; a recipe picks one with ``export.format``."""


@hookspec
def register_model_sources() -> list[type[ModelSource]]:
    """Return model-source classes; a recipe picks one with ``model.source`` (or ``auto``)."""


@hookspec
def register_storage_backends() -> list[type[StorageBackend]]:
    """Return storage-backend classes; a recipe picks one with ``storage.backend``."""


# -- decision hooks ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def select_model_source(path: str, candidates: list[type[ModelSource]]) -> str | None:
    """Name the model source that ``source: auto`` should use for ``path``, or None to pass.

    :param path: the model path from the recipe (already expanded).
    :param candidates: every registered model-source class, in registration order.
    """


# -- notification hooks --------------------------------------------------------------------------


@hookspec
def artifact_recorded(artifact: dict[str, Any], run_id: int | None) -> None:
    """Called after an artifact is committed to the registry (``artifact`` is its JSON form)."""


@hookspec
def stage_finished(stage: str, run_id: int | None, seconds: float, status: str) -> None:
    """Called after each stage of a job, in order: register-inputs, calibrate, evaluate-base,
    plan, quantize (quantize, export and store), evaluate (the stored checkpoint), publish,
    register. ``run_id`` is None before the quantization run is opened (the first three)."""
