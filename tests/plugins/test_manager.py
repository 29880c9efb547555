"""Plugin manager and catalog: built-ins come through the same hooks as third parties, duplicate
names and bad registrations stop start-up, blocking works."""

from __future__ import annotations

import types

import pytest

from quantmill.plugins import Quantizer, hookimpl
from quantmill.plugins.catalog import Catalog
from quantmill.plugins.errors import PluginError
from quantmill.plugins.manager import BUILTIN_PLUGINS, get_plugin_manager
from quantmill.plugins.quantizers.rtn.plugin import RTNQuantizer


def test_builtins_are_registered_through_hooks() -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert set(BUILTIN_PLUGINS) <= names
    catalog = Catalog(pm)
    assert "rtn" in catalog.quantizers
    assert catalog.quantizers.providers["rtn"] == "quantmill.plugins.quantizers.rtn.plugin"
    assert {"hf", "gguf", "gptq"} <= set(catalog.model_sources.names())
    assert {"text", "jsonl"} <= set(catalog.calibration_sources.names())
    assert {"perplexity", "size"} <= set(catalog.evaluators.names())
    assert "gptq" in catalog.exporters and "local" in catalog.storage_backends
    assert "uniform" in catalog.bit_allocators


def _plugin_module(name: str, quantizer: type) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def register_quantizers():
        return [quantizer]

    module.register_quantizers = register_quantizers
    return module


def test_duplicate_name_fails_start_up() -> None:
    class Impostor(RTNQuantizer):
        name = "rtn"

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(_plugin_module("impostor", Impostor), name="impostor")
    with pytest.raises(PluginError, match="two plugins register the quantizer 'rtn'"):
        Catalog(pm)


def test_non_contract_class_is_refused() -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(_plugin_module("bad", dict), name="bad")
    with pytest.raises(PluginError, match="not a Quantizer subclass"):
        Catalog(pm)


def test_unknown_name_lists_available() -> None:
    catalog = Catalog(get_plugin_manager(load_entrypoints=False))
    with pytest.raises(PluginError, match=r"unknown quantizer 'nope' \(available: .*rtn"):
        catalog.quantizers.get("nope")


def test_misspelled_hook_is_caught() -> None:
    module = types.ModuleType("typo")

    @hookimpl
    def register_quantiser():  # British spelling: not a quantmill hook
        return []

    module.register_quantiser = register_quantiser
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(module, name="typo")
    import pluggy

    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


def test_blocking_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTMILL_BLOCK_PLUGINS", "quantmill.plugins.quantizers.rtn.plugin")
    catalog = Catalog(get_plugin_manager(load_entrypoints=False))
    assert "rtn" not in catalog.quantizers


def test_plugin_config_rejects_unknown_keys() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RTNQuantizer.from_options({"bits": 4, "bitz": 3})
    assert isinstance(RTNQuantizer.from_options({"bits": 3}), Quantizer)


def test_auto_source_selection_uses_decision_hook(tmp_path) -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    catalog = Catalog(pm)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF....")
    pick = pm.hook.select_model_source(path=str(gguf),
                                       candidates=catalog.model_sources.classes())
    assert pick == "gguf"

    class Always(types.SimpleNamespace):
        @hookimpl(tryfirst=True)
        def select_model_source(self, path):
            return "hf"

    pm.register(Always(), name="always-hf")
    assert pm.hook.select_model_source(path=str(gguf),
                                       candidates=catalog.model_sources.classes()) == "hf"
