"""One run context per flow run and process: the job, its plugins, the registry handle and the
model cache, built once and handed to every step.

A step receives a ``RunContext``; what travels between processes is only its ``JobRef`` (the
recipe's text, where its relative paths are anchored, the job id and the registry URL). Pickling
a context (Prefect's Dask task runner does, to send a task to another worker) sends the ref,
and unpickling it on the worker finds or builds that worker's own context for the job, so each
process resolves the recipe and checks the registry schema once per job, not once per task.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from quantmill.flows.recipe import Job, load_yaml_text, parse_recipe, resolve_job
from quantmill.plugins.base import LoadedModel, ModelSource
from quantmill.plugins.catalog import Catalog
from quantmill.plugins.home import quantmill_home
from quantmill.plugins.manager import get_plugin_manager
from quantmill.registry import Registry


@dataclass(frozen=True)
class JobRef:
    """Everything a process needs to rebuild the job: the recipe text and where the recipe's
    relative paths are anchored, plus the job's id and registry URL."""

    recipe_text: str
    recipe_path: str
    job_id: str
    database_url: str | None = None


@dataclass
class ModelCache:
    """The last loaded model, so consecutive steps on one model load it once.

    One entry only: a job touches the base model, then the quantized one, never back.
    """

    key: tuple[str, str, bool] | None = None
    loaded: LoadedModel | None = None

    def get(self, source: ModelSource, path: Path, device: torch.device,
            deferred: bool = False) -> LoadedModel:
        """``source.load(path)`` (or ``load_deferred``), reusing the model already held."""
        key = (str(path), source.name, deferred)
        if self.key != key:
            self.clear()  # free the old model before loading the next
            self.loaded = (source.load_deferred if deferred else source.load)(path, device)
            self.key = key
        assert self.loaded is not None
        return self.loaded

    def clear(self) -> None:
        self.key, self.loaded = None, None


class RunContext:
    """The job of one flow run as this process sees it (see the module docstring).

    A plain class, not a dataclass: Prefect walks dataclass parameters of tasks looking for
    futures, and would walk into the cached model."""

    def __init__(self, ref: JobRef) -> None:
        self.ref = ref
        self.models = ModelCache()
        self._fetched: dict[str, Path] = {}

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog(get_plugin_manager())

    @cached_property
    def job(self) -> Job:
        recipe = parse_recipe(load_yaml_text(self.ref.recipe_text, "recipe"),
                              Path(self.ref.recipe_path).parent)
        return resolve_job(recipe, self.ref.recipe_text, Path(self.ref.recipe_path),
                           self.catalog)

    @cached_property
    def registry(self) -> Registry:
        """The registry, opened (and its schema checked) once for the context's life."""
        return Registry.open(self.ref.database_url)

    def fetch(self, uri: str) -> Path:
        """The job's stored object at ``uri`` on this machine, fetched and hash-checked by the
        job's storage once per context (the checkpoint is read by every evaluator and by
        publishing: one check, not one per reader)."""
        if uri not in self._fetched:
            self._fetched[uri] = self.job.storage.fetch(uri)
        return self._fetched[uri]

    @property
    def job_id(self) -> str:
        return self.ref.job_id

    @property
    def work_dir(self) -> Path:
        """This process's scratch space for the job (exports before they are stored)."""
        return quantmill_home() / "work" / self.ref.job_id

    def close(self) -> None:
        """Free the model and the registry's connections; forget the context."""
        self.models.clear()
        self._fetched.clear()
        if "registry" in self.__dict__:
            self.__dict__.pop("registry").close()
        with _LOCK:
            if _OPEN.get(self.ref) is self:
                del _OPEN[self.ref]

    def __reduce__(self) -> tuple[Any, ...]:
        return (RunContext.of, (self.ref,))

    @classmethod
    def of(cls, ref: JobRef, job: Job | None = None) -> RunContext:
        """This process's context for ``ref``, built on first use (``job``: an already
        resolved job, e.g. the one the CLI validated, to skip resolving it again)."""
        with _LOCK:
            context = _OPEN.get(ref)
            if context is None:
                context = _OPEN[ref] = cls(ref)
                if job is not None:
                    context.__dict__["job"] = job
            return context


_OPEN: dict[JobRef, RunContext] = {}
_LOCK = threading.Lock()
