"""Quantizers that read weights directly refuse a plan naming a non-linear or a deferred
(meta) weight, by name and before any work (one shared check)."""

from __future__ import annotations

import copy

import pytest
import torch

from quantmill.plugins.base import CalibrationSet, QuantPlan
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models.modules import loaded_linears
from quantmill.plugins.quantizers.clustering.plugin import ClusteringQuantizer
from quantmill.plugins.quantizers.dynamic_int8.plugin import DynamicInt8Quantizer


def test_loaded_linears_returns_the_named_linears(tiny_llama) -> None:
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    found = loaded_linears(tiny_llama, names, "m")
    assert list(found) == names and all(found[n] is tiny_llama.get_submodule(n) for n in names)


@pytest.mark.parametrize("quantizer", [
    DynamicInt8Quantizer.from_options({"smooth": False}),
    ClusteringQuantizer.from_options({"compensate": False, "weighting": "uniform"}),
])
def test_quantizers_refuse_non_linears_and_deferred_weights(tiny_llama, quantizer) -> None:
    spec = quantizer.default_spec()
    calibration = CalibrationSet(torch.zeros(1, 4, dtype=torch.long), {})
    with pytest.raises(QuantmillError,
                       match=rf"^{quantizer.name}: 'model.norm' is not a linear layer"):
        quantizer.quantize(tiny_llama, QuantPlan({"model.norm": spec}), calibration)
    name = "model.layers.0.self_attn.q_proj"
    model = copy.deepcopy(tiny_llama)  # the fixture is shared by the module's tests
    module = model.get_submodule(name)
    module.weight = torch.nn.Parameter(torch.empty_like(module.weight, device="meta"))
    with pytest.raises(QuantmillError, match=rf"^{quantizer.name}: the weight of '{name}' is "
                                             "not loaded"):
        quantizer.quantize(model, QuantPlan({name: spec}), calibration)
