"""Typed ``name -> class`` maps built from the registration hooks.

Two plugins registering one name is a start-up error: silently picking one would make a recipe
mean different things on different machines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import pluggy

from quantmill.plugins import base
from quantmill.plugins.errors import PluginError

P = TypeVar("P", bound=base.Plugin)


@dataclass(frozen=True)
class Kind(Generic[P]):
    """One role of plugin: its hook, its contract and how recipes refer to it."""

    label: str
    hook_name: str
    contract: type[P]


KINDS: tuple[Kind, ...] = (
    Kind("quantizer", "register_quantizers", base.Quantizer),
    Kind("bit allocator", "register_bit_allocators", base.BitAllocator),
    Kind("calibration source", "register_calibration_sources", base.CalibrationSource),
    Kind("evaluator", "register_evaluators", base.Evaluator),
    Kind("exporter", "register_exporters", base.Exporter),
    Kind("model source", "register_model_sources", base.ModelSource),
    Kind("storage backend", "register_storage_backends", base.StorageBackend),
)


class Registry(Generic[P]):
    """The plugins of one kind, by name, with the plugin module that provided each."""

    def __init__(self, kind: Kind[P], classes: dict[str, type[P]], providers: dict[str, str]):
        self.kind = kind
        self._classes = classes
        self.providers = providers

    def names(self) -> list[str]:
        return sorted(self._classes)

    def classes(self) -> list[type[P]]:
        return list(self._classes.values())

    def get(self, name: str) -> type[P]:
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise PluginError(
                f"unknown {self.kind.label} '{name}' (available: {known})"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._classes


class Catalog:
    """Every registered plugin class, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._registries: dict[str, Registry] = {}
        for kind in KINDS:
            self._registries[kind.hook_name] = self._collect(kind)

    def _collect(self, kind: Kind[P]) -> Registry[P]:
        hook: Callable = getattr(self.pm.hook, kind.hook_name)
        classes: dict[str, type[P]] = {}
        providers: dict[str, str] = {}
        for impl in reversed(hook.get_hookimpls()):  # registration order
            provider = impl.plugin_name
            for cls in impl.function() or []:
                if not (isinstance(cls, type) and issubclass(cls, kind.contract)):
                    raise PluginError(
                        f"plugin '{provider}' returned {cls!r} from {kind.hook_name}, "
                        f"which is not a {kind.contract.__name__} subclass"
                    )
                name = getattr(cls, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"{kind.label} {cls.__qualname__} from '{provider}' "
                                      f"has no 'name'")
                if name in classes and classes[name] is not cls:
                    raise PluginError(
                        f"two plugins register the {kind.label} '{name}': "
                        f"'{providers[name]}' and '{provider}'"
                    )
                classes[name] = cls
                providers[name] = provider
        return Registry(kind, classes, providers)

    @property
    def quantizers(self) -> Registry[base.Quantizer]:
        return self._registries["register_quantizers"]

    @property
    def bit_allocators(self) -> Registry[base.BitAllocator]:
        return self._registries["register_bit_allocators"]

    @property
    def calibration_sources(self) -> Registry[base.CalibrationSource]:
        return self._registries["register_calibration_sources"]

    @property
    def evaluators(self) -> Registry[base.Evaluator]:
        return self._registries["register_evaluators"]

    @property
    def exporters(self) -> Registry[base.Exporter]:
        return self._registries["register_exporters"]

    @property
    def model_sources(self) -> Registry[base.ModelSource]:
        return self._registries["register_model_sources"]

    @property
    def storage_backends(self) -> Registry[base.StorageBackend]:
        return self._registries["register_storage_backends"]

    def all(self) -> list[Registry]:
        return list(self._registries.values())
