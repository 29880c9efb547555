"""Build a plugin manager for one run: hookspecs, the built-ins, then third-party entry points.

A fresh manager per run (never a module global) keeps tests and concurrent jobs independent.
Environment switches, read when the manager is built:

* ``QUANTMILL_BLOCK_PLUGINS=a,b``: do not load the named plugins (built-in or third-party).
* ``QUANTMILL_DISABLE_ENTRYPOINTS=1``: load only the built-ins.
"""

from __future__ import annotations

import importlib
import os

import pluggy

from quantmill.plugins import hookspecs
from quantmill.plugins.errors import PluginError

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME

# Built-ins are ordinary plugin modules, registered under these names exactly as a third-party
# distribution's entry points would be.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "quantmill.plugins.core",
    "quantmill.plugins.models.sources",
    "quantmill.plugins.calibration.text",
    "quantmill.plugins.allocation.uniform",
    "quantmill.plugins.allocation.mixed_precision",
    "quantmill.plugins.quantizers.rtn.plugin",
    "quantmill.plugins.quantizers.gptq.plugin",
    "quantmill.plugins.evaluators.perplexity",
    "quantmill.plugins.evaluators.size",
    "quantmill.plugins.formats.gptq",
    "quantmill.plugins.quantizers.dynamic_int8.plugin",
    "quantmill.plugins.formats.compressed_tensors",
    "quantmill.plugins.quantizers.clustering.plugin",
    "quantmill.plugins.quantizers.trellis.plugin",
    "quantmill.plugins.formats.lut",
    "quantmill.plugins.formats.trellis",
    "quantmill.plugins.formats.dequantized",
    "quantmill.storage.local",
    "quantmill.storage.s3",
)


def _blocked() -> set[str]:
    raw = os.environ.get("QUANTMILL_BLOCK_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def get_plugin_manager(load_entrypoints: bool | None = None) -> pluggy.PluginManager:
    """A new manager with every hookspec, the built-ins and (unless disabled) entry points."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in _blocked():
        pm.set_blocked(name)
    for module_name in BUILTIN_PLUGINS:
        if pm.is_blocked(module_name):
            continue
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entrypoints is None:
        load_entrypoints = os.environ.get("QUANTMILL_DISABLE_ENTRYPOINTS", "") not in {"1", "true"}
    if load_entrypoints:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken third-party plugin must not look like our bug
            raise PluginError(f"could not load a plugin from entry-point group "
                              f"'{ENTRY_POINT_GROUP}': {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements an unknown hook: {exc}") from exc
    return pm


def plugin_distributions(pm: pluggy.PluginManager) -> dict[str, str]:
    """``plugin name -> 'distribution version'`` for every registered plugin (provenance)."""
    out: dict[str, str] = {}
    for plugin, dist in pm.list_plugin_distinfo():
        out[pm.get_name(plugin) or repr(plugin)] = f"{dist.project_name} {dist.version}"
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        if name and name not in out and name.startswith("quantmill."):
            from importlib.metadata import version

            out[name] = f"quantmill {version('quantmill')}"
    return out
