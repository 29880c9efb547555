"""The mixed_precision allocator on a tiny random Llama: cost model, budgets, ties, the
sensitivity measurements (checked against direct computation), deferred weights, and a mixed-bit
GPTQ checkpoint that round-trips exactly."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from quantmill.plugins.allocation import mixed_precision, sensitivity_cache
from quantmill.plugins.allocation.cost import Candidate, bits_per_weight, weight_bits
from quantmill.plugins.allocation.mixed_precision import MixedPrecisionAllocator
from quantmill.plugins.allocation.sensitivity import (
    SensitivityOptions,
    candidate_damages,
    measure_sensitivity,
    output_gradient_power,
)
from quantmill.plugins.base import (
    CalibrationSet,
    LoadedModel,
    ModuleQuantSpec,
    QuantPlan,
)
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.evaluators.size import packed_stats
from quantmill.plugins.formats.gptq import load_gptq_checkpoint, write_gptq_checkpoint
from quantmill.plugins.models.modules import quantizable_linears
from quantmill.plugins.models.quant_linear import GPTQLinear
from quantmill.plugins.models.sources import HFDirectorySource
from quantmill.plugins.quantizers.rtn.algorithm import quantize_groups
from quantmill.plugins.quantizers.rtn.plugin import RTNQuantizer

G32 = [{"bits": b, "group_size": 32} for b in (2, 3, 4, 8)]
RTN_SPEC = ModuleQuantSpec(bits=4, group_size=32, sym=False, method="rtn")
TIES = ["self_attn.q_proj|self_attn.k_proj|self_attn.v_proj", "mlp.gate_proj|mlp.up_proj"]


@pytest.fixture(scope="module")
def calibration() -> CalibrationSet:
    generator = torch.Generator().manual_seed(0)
    return CalibrationSet(torch.randint(0, 256, (4, 32), generator=generator), {"test": True})


#: options every ``_allocator`` gets unless a test says otherwise; measurements are not reused
#: across plans (each test checks a fresh one) except under ``measured_once``
DEFAULT_OPTIONS = {"candidates": G32, "weighting": "none",  # fast; fisher has its own tests
                   "num_samples": 4, "fisher_samples": 2, "reuse_sensitivity": False}


@pytest.fixture(autouse=True)
def no_stored_tables() -> None:
    """Each test starts with no stored sensitivity tables (identical tiny models would hit)."""
    sensitivity_cache.clear()


@pytest.fixture()
def measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Budget and tie tests plan many times with the same measurements: measure once, through
    the allocator's own table reuse (tested below; the budget does not change the table)."""
    monkeypatch.setitem(DEFAULT_OPTIONS, "reuse_sensitivity", True)


def _allocator(**options) -> MixedPrecisionAllocator:
    return MixedPrecisionAllocator.from_options({**DEFAULT_OPTIONS, **options})


def _plan_bits(model: torch.nn.Module, plan: QuantPlan) -> int:
    """The plan's cost recomputed here from the cost model, independently of the allocator."""
    total = 0
    for name, spec in plan.modules.items():
        module = model.get_submodule(name)
        total += weight_bits(Candidate(spec.bits, spec.group_size), module.out_features,
                             module.in_features)
    return total


def _cheapest_upgrade(model: torch.nn.Module, plan: QuantPlan) -> float:
    """The least extra cost of moving any one module to a costlier candidate of ``G32``."""
    best = math.inf
    for name, spec in plan.modules.items():
        shape = model.get_submodule(name).weight.shape
        now = weight_bits(Candidate(spec.bits, spec.group_size), *shape)
        for c in G32:
            extra = weight_bits(Candidate(c["bits"], c["group_size"]), *shape) - now
            if extra > 0:
                best = min(best, extra)
    return best


def _numel(model: torch.nn.Module, names: list[str]) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in names)


# -- cost model --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (32, 64), (128, 64), (64, 128), (96, 160)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 48, 128, -1])
def test_cost_model_counts_what_the_size_evaluator_measures(shape, bits, group_size) -> None:
    out_features, in_features = shape
    qw = quantize_groups(torch.randn(shape), bits, group_size, sym=False)
    module = torch.nn.Sequential(GPTQLinear.from_quantized(qw, "gptq_v2"))
    quantized, measured_bits, _ = packed_stats(module)
    assert quantized == out_features * in_features
    assert weight_bits(Candidate(bits, group_size), out_features, in_features) == measured_bits


def test_codebook_cost_is_index_bits_plus_a_fp16_table_per_row() -> None:
    for bits in (2, 3, 4, 8):
        assert bits_per_weight(Candidate(bits, 128), 576, 576, "codebook") == pytest.approx(
            bits + 16 * 2**bits / 576)


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"avg_bits": -1.0}, "greater than 0"),
    ({"avg_bits": 0}, "greater than 0"),
    ({"max_bytes": 0}, "greater than 0"),
    ({"max_bytes": -5}, "greater than 0"),
    ({}, "exactly one budget"),
    ({"avg_bits": 3.5, "max_bytes": 1000}, "exactly one budget"),
    ({"avg_bits": 3.5, "candidates": [{"bits": 4}, {"bits": 4}]}, "distinct"),
    ({"avg_bits": 3.5, "candidates": [{"bits": 9}]}, "less than or equal to 8"),
    ({"avg_bits": 3.5, "candidates": [{"bits": 4, "group_size": 0}]}, "group_size"),
    ({"avg_bits": 3.5, "candidates": []}, "at least 1"),
    ({"avg_bits": 3.5, "tie": ["q_proj"]}, "two or more"),
    ({"avg_bits": 3.5, "tie": ["q_proj|"]}, "two or more"),
    ({"avg_bits": 3.5, "weighting": "hessian"}, "fisher"),
    ({"avg_bits": 3.5, "budget": 3}, "Extra inputs"),
])
def test_bad_settings_are_refused(options, message) -> None:
    with pytest.raises(ValidationError, match=message):
        MixedPrecisionAllocator.from_options(options)


# -- budgets -----------------------------------------------------------------------------------


def test_budget_below_the_cheapest_plan_is_refused_with_the_minimum(tiny_llama) -> None:
    names = quantizable_linears(tiny_llama)
    cheapest = sum(weight_bits(Candidate(2, 32), *tiny_llama.get_submodule(n).weight.shape)
                   for n in names)
    minimum = cheapest / _numel(tiny_llama, names)
    # refused before anything is measured: no calibration is needed to learn that
    with pytest.raises(QuantmillError, match="below the minimum achievable") as info:
        _allocator(avg_bits=minimum - 0.01).plan(tiny_llama, names, RTN_SPEC, None)
    assert f"{minimum:.4f} average bits" in str(info.value)
    assert f"({-(-cheapest // 8)} bytes)" in str(info.value)
    with pytest.raises(QuantmillError, match="below the minimum achievable"):
        _allocator(max_bytes=cheapest // 8 - 1).plan(tiny_llama, names, RTN_SPEC, None)


def test_a_feasible_budget_without_calibration_is_refused(tiny_llama) -> None:
    names = quantizable_linears(tiny_llama)
    with pytest.raises(QuantmillError, match="needs a calibration"):
        _allocator(avg_bits=5.0).plan(tiny_llama, names, RTN_SPEC, None)


def test_budget_that_fits_the_top_format_everywhere_chooses_it(tiny_llama, calibration,
                                                               measured_once) -> None:
    names = quantizable_linears(tiny_llama)
    top = _plan_bits(tiny_llama, QuantPlan({n: ModuleQuantSpec(8, 32, False, "rtn")
                                            for n in names}))
    plan = _allocator(max_bytes=-(-top // 8)).plan(tiny_llama, names, RTN_SPEC, calibration)
    assert {(s.bits, s.group_size) for s in plan.modules.values()} == {(8, 32)}
    plan = _allocator(avg_bits=16.0).plan(tiny_llama, names, RTN_SPEC, calibration)
    assert {s.bits for s in plan.modules.values()} == {8}


def test_plans_never_exceed_the_budget_and_spend_it(tiny_llama, calibration,
                                                    measured_once) -> None:
    names = quantizable_linears(tiny_llama)
    numel = _numel(tiny_llama, names)
    formats = set()
    for avg_bits in (3.1, 3.6, 4.3, 5.0, 6.2, 8.0, 9.1):
        plan = _allocator(avg_bits=avg_bits).plan(tiny_llama, names, RTN_SPEC, calibration)
        spent = _plan_bits(tiny_llama, plan)
        assert spent <= avg_bits * numel
        assert plan.details["achieved_avg_bits"] == pytest.approx(spent / numel)
        # optimal: more bits always lower the damage, so no upgrade may still fit
        assert _cheapest_upgrade(tiny_llama, plan) > int(avg_bits * numel) - spent
        assert all(s.method == "rtn" and s.sym is False for s in plan.modules.values())
        formats |= {s.bits for s in plan.modules.values()}
    assert formats == {2, 3, 4, 8}
    for max_bytes in (28_000, 34_000, 47_000):
        plan = _allocator(max_bytes=max_bytes).plan(tiny_llama, names, RTN_SPEC, calibration)
        assert _plan_bits(tiny_llama, plan) <= 8 * max_bytes
        assert plan.details["achieved_bytes"] <= max_bytes


def test_ties_give_one_format_per_group(tiny_llama, calibration, measured_once) -> None:
    names = quantizable_linears(tiny_llama)
    groups = [[f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in (0, 1)]
    groups += [[f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")] for i in (0, 1)]

    def split(plan: QuantPlan) -> bool:
        return any(len({plan.modules[n] for n in g}) > 1 for g in groups)

    split_budgets = []
    for avg_bits in (3.3, 3.8, 4.4, 5.1, 5.9, 6.6, 7.4):
        if split(_allocator(avg_bits=avg_bits).plan(tiny_llama, names, RTN_SPEC, calibration)):
            split_budgets.append(avg_bits)
        tied = _allocator(avg_bits=avg_bits, tie=TIES).plan(tiny_llama, names, RTN_SPEC,
                                                             calibration)
        assert not split(tied)
        assert _plan_bits(tiny_llama, tied) <= avg_bits * _numel(tiny_llama, names)
        assert sorted(map(sorted, tied.details["ties"])) == sorted(map(sorted, groups))
    assert split_budgets  # without ties some of these budgets do split a group


def test_details_hold_the_sensitivity_table(tiny_llama, calibration) -> None:
    names = quantizable_linears(tiny_llama)
    plan = _allocator(avg_bits=4.5).plan(tiny_llama, names, RTN_SPEC, calibration)
    d = plan.details
    labels = ["w2g32", "w3g32", "w4g32", "w8g32"]
    assert [c["label"] for c in d["candidates"]] == labels
    assert set(d["sensitivity"]) == set(names)
    for name, row in d["sensitivity"].items():
        assert list(row["damage"]) == labels
        spec = plan.modules[name]
        assert row["chosen"] == f"w{spec.bits}g{spec.group_size}"
    chosen = sum(d["sensitivity"][n]["damage"][d["sensitivity"][n]["chosen"]] for n in names)
    assert d["predicted_damage"] == pytest.approx(chosen)
    assert d["budget"] == {"avg_bits": 4.5} and d["solver"]["exact"] is True
    assert d["hessian_tokens"] == 4 * 32 and "output error" in d["measure"]


def test_modules_outside_decoder_blocks_are_refused(tiny_llama, calibration) -> None:
    names = quantizable_linears(tiny_llama, skip=["*embed*"])
    assert "lm_head" in names
    with pytest.raises(QuantmillError, match="'lm_head' is not one"):
        _allocator(avg_bits=30.0).plan(tiny_llama, names, RTN_SPEC, calibration)


def test_codebook_methods_are_costed_as_codebooks(tiny_llama, calibration) -> None:
    names = quantizable_linears(tiny_llama)
    spec = ModuleQuantSpec(bits=3, group_size=128, sym=False, method="clustering")
    with pytest.raises(QuantmillError, match="codebook method 'clustering'"):
        _allocator(avg_bits=4.0, candidates=[{"bits": 5}]).plan(tiny_llama, names, spec,
                                                                calibration)
    plan = _allocator(avg_bits=5.0, candidates=[{"bits": 2}, {"bits": 4}]).plan(
        tiny_llama, names, spec, calibration)
    row = plan.details["sensitivity"]["model.layers.0.mlp.down_proj"]  # 64 x 128
    assert row["bits_per_weight"]["w2g128"] == pytest.approx(2 + 16 * 4 / 128)
    assert all(s.method == "clustering" for s in plan.modules.values())
    assert plan.details["weight_kind"] == "codebook"


# -- sensitivity -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_damage_decreases_with_more_bits_on_random_layers(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 96, generator=generator)
    x = torch.randn(400, 96, generator=generator) * torch.rand(96, generator=generator) * 3
    hessian = x.T @ x / x.shape[0]
    channels = torch.rand(48, generator=generator)
    for sym in (False, True):
        for weights in (None, channels):
            damages = candidate_damages(w, hessian, [Candidate(b, 32) for b in range(2, 9)],
                                        sym, channel_weights=weights)
            assert all(a > b > 0 for a, b in zip(damages, damages[1:], strict=False))


def _direct_damages(model, names, ids, candidates):
    """Each module's H from plain forward hooks over the whole model, then the damages."""
    sums, counts = {}, {}

    def hook(name):
        def pre(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {n: candidate_damages(model.get_submodule(n).weight, (sums[n] / counts[n]).float(),
                                 candidates, False) for n in names}


def test_block_by_block_measurement_equals_direct_computation(tiny_llama, calibration) -> None:
    names = quantizable_linears(tiny_llama)
    candidates = [Candidate(b, 32) for b in (2, 4, 8)]
    options = SensitivityOptions(num_samples=4, batch_size=3, weighting="none")
    measured = measure_sensitivity(tiny_llama, names, candidates, False, "uniform",
                                   calibration.input_ids, options)
    direct = _direct_damages(tiny_llama, names, calibration.input_ids, candidates)
    for name in names:
        assert measured.damages[name] == pytest.approx(direct[name], rel=1e-4)
    assert measured.hessian_tokens == 4 * 32 and measured.fisher_tokens == 0


def test_output_gradient_power_matches_autograd(tiny_llama, calibration) -> None:
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    ids = calibration.input_ids[:2]
    power, tokens = output_gradient_power(tiny_llama, names, ids, torch.device("cpu"))
    assert tokens == ids.numel()
    expected = {n: torch.zeros(tiny_llama.get_submodule(n).out_features, dtype=torch.float64)
                for n in names}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _args, output):
            output.retain_grad()
            outputs[name] = output
        return hook

    for row in range(ids.shape[0]):
        handles = [tiny_llama.get_submodule(n).register_forward_hook(keep(n)) for n in names]
        logits = tiny_llama(input_ids=ids[row : row + 1]).logits
        F.cross_entropy(logits[0, :-1], ids[row, 1:], reduction="sum").backward()
        for h in handles:
            h.remove()
        for n in names:
            expected[n] += outputs[n].grad.double().pow(2).reshape(-1, expected[n].numel()).sum(0)
    tiny_llama.zero_grad(set_to_none=True)
    for n in names:
        torch.testing.assert_close(power[n], expected[n] / ids.numel(), rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_fisher_weighting_predicts_the_loss_increase_in_nats(tiny_llama, calibration) -> None:
    """For small perturbations the fisher damage is of the size of the measured loss change
    (second-order Taylor term): compare summed damages with the real increase at 8 bits."""
    names = quantizable_linears(tiny_llama)
    ids = calibration.input_ids
    options = SensitivityOptions(num_samples=4, batch_size=4, weighting="fisher",
                                 fisher_samples=4)
    sens = measure_sensitivity(tiny_llama, names, [Candidate(4, 32)], False, "uniform", ids,
                               options)
    predicted = sum(d[0] for d in sens.damages.values())

    def mean_nll(model) -> float:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                     ids[:, 1:].reshape(-1)))

    before = mean_nll(tiny_llama)
    saved = {n: tiny_llama.get_submodule(n).weight.data.clone() for n in names}
    try:
        for n in names:
            module = tiny_llama.get_submodule(n)
            module.weight.data = quantize_groups(module.weight, 4, 32, False).dequantize()
        increase = mean_nll(tiny_llama) - before
    finally:
        for n in names:
            tiny_llama.get_submodule(n).weight.data = saved[n]
    assert predicted > 0
    # a random model's loss is flat: the quadratic estimate must be within an order of magnitude
    assert abs(math.log10(predicted / max(abs(increase), 1e-12))) < 1.0 or abs(increase) < 1e-4


def test_deferred_weights_give_the_same_plan_and_stay_deferred(tiny_model_dir: Path) -> None:
    source = HFDirectorySource()
    full = source.load(tiny_model_dir, torch.device("cpu")).model
    lazy = source.load_deferred(tiny_model_dir, torch.device("cpu")).model
    names = quantizable_linears(full)
    assert all(lazy.get_submodule(n).weight.is_meta for n in names)
    params_before = dict(lazy.named_parameters(remove_duplicate=False))
    vocab = full.config.vocab_size
    calib = CalibrationSet(torch.randint(0, vocab, (3, 24),
                                         generator=torch.Generator().manual_seed(1)), {})
    allocator = _allocator(avg_bits=4.2, weighting="fisher", num_samples=3, fisher_samples=2)
    plan_full = allocator.plan(full, names, RTN_SPEC, calib)
    plan_lazy = allocator.plan(lazy, names, RTN_SPEC, calib)
    assert plan_lazy.modules == plan_full.modules
    for n in names:
        assert plan_lazy.details["sensitivity"][n]["damage"] == pytest.approx(
            plan_full.details["sensitivity"][n]["damage"], rel=1e-5)
    # the very same (meta) parameters are back, ties included (lm_head is the embedding)
    after = dict(lazy.named_parameters(remove_duplicate=False))
    assert after.keys() == params_before.keys()
    assert all(after[k] is params_before[k] for k in after)
    assert all(lazy.get_submodule(n).weight.is_meta for n in names)


# -- mixed-bit checkpoints ---------------------------------------------------------------------


def test_mixed_bit_checkpoint_round_trips_exactly(tiny_llama, tmp_path: Path) -> None:
    """Per-module bits AND group sizes survive the writer and the reader bit for bit."""
    names = quantizable_linears(tiny_llama)
    formats = [(2, 32), (3, 64), (4, -1), (8, 32), (4, 32), (3, 16), (2, -1)]
    plan = QuantPlan({n: ModuleQuantSpec(*formats[i % len(formats)], sym=False, method="rtn")
                      for i, n in enumerate(names)})
    result = RTNQuantizer().quantize(tiny_llama, plan, None)
    loaded = LoadedModel(tiny_llama, None, tmp_path, "test")
    summary = write_gptq_checkpoint(loaded, result, tmp_path / "ckpt")
    assert summary["bits"] == {n: s.bits for n, s in plan.modules.items()}
    assert summary["group_size"] == {n: s.group_size for n, s in plan.modules.items()}
    assert "dynamic" in summary["quantize_config"]
    back = load_gptq_checkpoint(tmp_path / "ckpt").model
    for name, spec in plan.modules.items():
        module = back.get_submodule(name)
        assert isinstance(module, GPTQLinear)
        assert (module.bits, module.group_size) == (spec.bits, spec.group_size)
        assert torch.equal(module.dequantize_weight(), result.weights[name].dequantize())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.isfinite(back(input_ids=ids).logits).all()


# -- sensitivity tables reused across budgets --------------------------------------------------


@pytest.fixture()
def counted_measurements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of real measurements, in a list the test reads."""
    calls: list[int] = []
    real = mixed_precision.measure_sensitivity

    def measure(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mixed_precision, "measure_sensitivity", measure)
    return calls


def test_budgets_on_one_model_share_one_measurement(tiny_llama, calibration,
                                                    counted_measurements) -> None:
    names = quantizable_linears(tiny_llama)
    first = _allocator(avg_bits=3.6, reuse_sensitivity=True).plan(
        tiny_llama, names, RTN_SPEC, calibration)
    second = _allocator(avg_bits=5.0, reuse_sensitivity=True).plan(
        tiny_llama, names, RTN_SPEC, calibration)
    assert len(counted_measurements) == 1
    assert (first.details["sensitivity_reused"], second.details["sensitivity_reused"]) == (
        False, True)
    assert first.details["sensitivity_key"] == second.details["sensitivity_key"]
    assert {n: r["damage"] for n, r in first.details["sensitivity"].items()} == {
        n: r["damage"] for n, r in second.details["sensitivity"].items()}
    assert _plan_bits(tiny_llama, second) > _plan_bits(tiny_llama, first)  # a real re-plan

    # switched off: measured again
    third = _allocator(avg_bits=5.0).plan(tiny_llama, names, RTN_SPEC, calibration)
    assert len(counted_measurements) == 2 and third.details["sensitivity_reused"] is False


def test_a_changed_model_or_calibration_is_measured_again(tiny_llama, calibration,
                                                          counted_measurements) -> None:
    names = quantizable_linears(tiny_llama)
    allocator = _allocator(avg_bits=4.5, reuse_sensitivity=True)
    before = allocator.plan(tiny_llama, names, RTN_SPEC, calibration)
    weight = tiny_llama.get_submodule(names[3]).weight
    with torch.no_grad():
        weight[0, 0] += 0.5  # one weight of one module, in place
    changed = allocator.plan(tiny_llama, names, RTN_SPEC, calibration)
    assert len(counted_measurements) == 2 and changed.details["sensitivity_reused"] is False
    assert changed.details["sensitivity_key"] != before.details["sensitivity_key"]
    assert changed.details["sensitivity"][names[3]]["damage"] != before.details[
        "sensitivity"][names[3]]["damage"]

    other_ids = CalibrationSet(calibration.input_ids.flip(0), {"test": True})
    allocator.plan(tiny_llama, names, RTN_SPEC, other_ids)
    assert len(counted_measurements) == 3


@pytest.mark.parametrize("change", [
    {"weighting": "fisher"},
    {"num_samples": 3},
    {"batch_size": 1},
    {"candidates": [{"bits": 3, "group_size": 32}, {"bits": 8, "group_size": 32}]},
    {"candidates": [{"bits": b, "group_size": 16} for b in (2, 3, 4, 8)]},
    {"spec": ModuleQuantSpec(bits=4, group_size=32, sym=True, method="rtn")},
    {"names": "without lm_head side"},
])
def test_every_setting_of_the_measurement_is_in_the_key(tiny_llama, calibration,
                                                        counted_measurements, change) -> None:
    names = quantizable_linears(tiny_llama)
    _allocator(avg_bits=8.0, reuse_sensitivity=True).plan(tiny_llama, names, RTN_SPEC,
                                                          calibration)
    options = {k: v for k, v in change.items() if k not in ("spec", "names")}
    spec = change.get("spec", RTN_SPEC)
    subset = names[:-2] if "names" in change else names
    plan = _allocator(avg_bits=8.0, reuse_sensitivity=True, **options).plan(
        tiny_llama, subset, spec, calibration)
    assert len(counted_measurements) == 2 and plan.details["sensitivity_reused"] is False


def test_a_reused_table_is_a_copy_and_costs_this_plan_nothing(tiny_llama, calibration) -> None:
    names = quantizable_linears(tiny_llama)
    first = _allocator(avg_bits=4.5, reuse_sensitivity=True).plan(
        tiny_llama, names, RTN_SPEC, calibration)
    stored = next(iter(sensitivity_cache._tables.values()))
    stored_before = copy.deepcopy(stored.damages)
    first.details["sensitivity"][names[0]]["damage"]["w2g32"] = -1.0  # a caller edits its plan
    second = _allocator(avg_bits=4.5, reuse_sensitivity=True).plan(
        tiny_llama, names, RTN_SPEC, calibration)
    second.details["sensitivity"][names[1]]["damage"]["w2g32"] = -1.0
    assert stored.damages == stored_before
    assert second.details["sensitivity"][names[0]]["damage"]["w2g32"] > 0
    assert second.details["sensitivity_seconds"] == 0.0
    assert second.details["sensitivity_measured_seconds"] == first.details[
        "sensitivity_seconds"] > 0


def test_deferred_weights_are_fingerprinted_by_content_and_stay_deferred(
        tiny_model_dir: Path) -> None:
    """A deferred model's key equals the loaded model's (its weights are fetched for the
    digest), so the trade-off flow's layer-by-layer loads share tables; and the model is left
    as it was."""
    source = HFDirectorySource()
    full = source.load(tiny_model_dir, torch.device("cpu")).model
    lazy = source.load_deferred(tiny_model_dir, torch.device("cpu")).model
    names = quantizable_linears(full)
    ids = torch.randint(0, full.config.vocab_size, (3, 24),
                        generator=torch.Generator().manual_seed(1))
    options = SensitivityOptions(num_samples=3)
    candidates = [Candidate(4, 32), Candidate(8, 32)]
    key_full = sensitivity_cache.measurement_key(full, names, candidates, False, "uniform",
                                                 ids, options)
    key_lazy = sensitivity_cache.measurement_key(lazy, names, candidates, False, "uniform",
                                                 ids, options)
    assert key_full is not None and key_full == key_lazy
    assert all(lazy.get_submodule(n).weight.is_meta for n in names)
    with torch.no_grad():
        full.get_submodule(names[0]).weight.mul_(1.001)
    assert sensitivity_cache.measurement_key(full, names, candidates, False, "uniform", ids,
                                             options) != key_lazy
