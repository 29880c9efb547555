"""Randomized Hadamard input rotations: the transform itself, and what RTN, GPTQ, block tuning
and the mixed-precision allocator do with it (tiny CPU tensors)."""

from __future__ import annotations

import pytest
import torch

from quantmill.plugins.allocation.cost import Candidate, rotation_bits, weight_bits
from quantmill.plugins.allocation.sensitivity import SensitivityOptions, measure_sensitivity
from quantmill.plugins.base import CalibrationSet, ModuleQuantSpec, QuantPlan
from quantmill.plugins.hadamard import (
    MAX_FACTOR,
    InputRotation,
    hadamard_factors,
    rotation_site,
    split_dimension,
)
from quantmill.plugins.quantizers.gptq.algorithm import (
    GPTQSettings,
    gptq_quantize,
    hessian_error,
)
from quantmill.plugins.quantizers.gptq.block_tuning import (
    TunableWeight,
    TuningSettings,
    tune_block,
)
from quantmill.plugins.quantizers.gptq.plugin import GPTQQuantizer
from quantmill.plugins.quantizers.hessian import HessianAccumulator
from quantmill.plugins.quantizers.rtn.algorithm import quantize_groups
from quantmill.plugins.quantizers.rtn.plugin import RTNQuantizer

DIMENSIONS = (1, 9, 64, 96, 576, 1536, 8192)


# -- the transform --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("n", DIMENSIONS)
def test_rotation_is_orthogonal_and_fast_paths_agree_with_the_dense_matrix(n: int) -> None:
    rotation = InputRotation.for_site(n, seed=3, site="model.layers.0.self_attn.q_proj")
    t = rotation.matrix().double()
    assert torch.allclose(t @ t.T, torch.eye(n, dtype=torch.float64), atol=1e-5)
    x = torch.randn(5, n)
    assert torch.allclose(rotation.apply(x).double(), x.double() @ t, atol=1e-4)
    assert torch.allclose(rotation.apply_transpose(x).double(), x.double() @ t.T, atol=1e-4)
    assert torch.allclose(rotation.apply_transpose(rotation.apply(x)), x, atol=1e-4)
    if n <= 1536:
        h = torch.randn(n, 2 * n) / n
        h = h @ h.T
        assert torch.allclose(rotation.rotate_hessian(h).double(), t.T @ h.double() @ t,
                              atol=1e-4)
    m, p = split_dimension(n)
    assert m % 2 == 1 and m * p == n
    assert all(f <= MAX_FACTOR for f in hadamard_factors(p))


def test_rotation_is_deterministic_per_seed_and_site() -> None:
    a = InputRotation.for_site(576, 0, "m.q_proj")
    b = InputRotation.for_site(576, 0, "m.q_proj")
    assert torch.equal(a.signs, b.signs) and torch.equal(a.block, b.block)
    other_site = InputRotation.for_site(576, 0, "m.o_proj")
    other_seed = InputRotation.for_site(576, 1, "m.q_proj")
    assert not torch.equal(a.matrix(), other_site.matrix())
    assert not torch.equal(a.matrix(), other_seed.matrix())


def test_modules_reading_one_tensor_share_a_site() -> None:
    assert rotation_site("model.layers.3.self_attn.k_proj") == "model.layers.3.self_attn.q_proj"
    assert rotation_site("model.layers.3.self_attn.v_proj") == "model.layers.3.self_attn.q_proj"
    assert rotation_site("model.layers.3.mlp.up_proj") == "model.layers.3.mlp.gate_proj"
    assert rotation_site("model.layers.3.mlp.down_proj") == "model.layers.3.mlp.down_proj"
    assert rotation_site("model.layers.3.self_attn.o_proj") == "model.layers.3.self_attn.o_proj"
    assert rotation_site("x.notmlp.up_proj") == "x.notmlp.up_proj"


def test_rotation_spreads_an_outlier_channel() -> None:
    x = torch.zeros(1, 576)
    x[0, 7] = 100.0
    rotated = InputRotation.for_site(576, 0, "s").apply(x)
    # every channel gets a share; none more than the 64-point Hadamard factor leaves (1/8)
    assert bool((rotated.abs() > 0).all())
    assert float(rotated.abs().max()) <= 100.0 / 8 + 1e-4
    assert torch.allclose(rotated.norm(), x.norm())


def test_checkpoint_tensors_round_trip_and_bad_ones_are_refused() -> None:
    rotation = InputRotation.for_site(96, 0, "s")
    stored = rotation.to_checkpoint()
    assert stored["input_rotation_signs"].dtype == torch.int8
    back = InputRotation.from_tensors(stored["input_rotation_signs"],
                                      stored["input_rotation_block"])
    assert torch.equal(back.matrix(), rotation.matrix())
    assert rotation.stored_bits() == rotation_bits(96) == 8 * 96 + 32 * 9
    with pytest.raises(ValueError, match="3 x 3 block"):
        InputRotation.from_tensors(stored["input_rotation_signs"], torch.eye(2))
    with pytest.raises(ValueError, match="not orthogonal"):
        InputRotation.from_tensors(stored["input_rotation_signs"], 2 * torch.eye(3))
    bad_signs = stored["input_rotation_signs"].clone()
    bad_signs[0] = 0
    with pytest.raises(ValueError, match="must all be"):
        InputRotation.from_tensors(bad_signs, stored["input_rotation_block"])


# -- quantizers -----------------------------------------------------------------------------


def _outlier_layer(seed: int, out: int = 48, width: int = 96, samples: int = 1024):
    """A layer whose weights have a few large columns and whose inputs have a few large,
    correlated channels: what LLM linears look like, and what rotations are for."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, width, generator=g) * 0.02
    w[:, :3] *= 20.0
    x = torch.randn(samples, width, generator=g)
    x[:, 5:8] *= 15.0
    x = x + 0.3 * torch.randn(samples, 1, generator=g)
    return w, x.T @ x / samples


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotated_gptq_beats_unrotated_gptq_on_outlier_layers(seed: int) -> None:
    w, h = _outlier_layer(seed)
    settings = GPTQSettings(bits=3, group_size=32, sym=False)
    plain, _ = gptq_quantize(w, h, settings, measure_error=False)
    rotation = InputRotation.for_site(w.shape[1], seed, "layer")
    rotated, _ = gptq_quantize(rotation.apply(w), rotation.rotate_hessian(h), settings,
                               measure_error=False)
    rotated.input_rotation = rotation
    # the same quantity measured in the original basis (dequantize undoes the rotation)
    assert hessian_error(w, rotated, h) < 0.7 * hessian_error(w, plain, h)
    in_rotated_basis = hessian_error(rotation.apply(w), rotated, rotation.rotate_hessian(h),
                                     dequantized=rotated.dequantize_stored())
    assert in_rotated_basis == pytest.approx(hessian_error(w, rotated, h), rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_rotated_rtn_beats_plain_rtn_on_outlier_weights(seed: int) -> None:
    w, h = _outlier_layer(seed)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(96, 48, bias=False))
    model.proj.weight.data = w.clone()
    spec = ModuleQuantSpec(3, 32, False, "rtn")
    plan = QuantPlan({"proj": spec})
    plain = RTNQuantizer.from_options({"bits": 3, "group_size": 32}).quantize(model, plan, None)
    quantizer = RTNQuantizer.from_options({"bits": 3, "group_size": 32, "rotation": "hadamard",
                                           "rotation_seed": seed})
    assert quantizer.default_spec().rotation_seed == seed
    rotated = quantizer.quantize(model, plan, None)
    qw = rotated.weights["proj"]
    assert qw.input_rotation is not None
    assert rotated.details["rotation"] == "hadamard"
    # what is stored is RTN of W @ T, exactly
    expected = quantize_groups(qw.input_rotation.apply(w), 3, 32, False)
    assert torch.equal(qw.intweight, expected.intweight)
    assert hessian_error(w, qw, h) < hessian_error(w, plain.weights["proj"], h)


def test_rotation_options_are_checked() -> None:
    with pytest.raises(Exception, match="rotation"):
        GPTQQuantizer.from_options({"rotation": "quarot"})
    with pytest.raises(Exception, match="rotation_seed"):
        GPTQQuantizer.from_options({"rotation": "hadamard", "rotation_seed": -1})
    assert GPTQQuantizer.from_options({}).default_spec().rotation_seed is None


def _tiny_llama(hidden: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        max_position_embeddings=64, tie_word_embeddings=True)).eval()


def _calibration(samples: int = 8, seq: int = 32) -> CalibrationSet:
    return CalibrationSet(torch.randint(0, 128, (samples, seq),
                                        generator=torch.Generator().manual_seed(1)), {})


def test_gptq_rotated_shares_one_rotation_per_input_and_runs_what_it_stores() -> None:
    model = _tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and n.startswith("model.layers")]
    quantizer = GPTQQuantizer.from_options({"bits": 4, "group_size": 32, "rotation": "hadamard",
                                            "rotation_seed": 5})
    spec = quantizer.default_spec()
    result = quantizer.quantize(model, QuantPlan(dict.fromkeys(names, spec)), _calibration())
    assert result.details["rotation"] == "hadamard"
    for name, qw in result.weights.items():
        expected = InputRotation.for_site(qw.in_features, 5, rotation_site(name))
        assert qw.input_rotation is not None
        assert torch.equal(qw.input_rotation.matrix(), expected.matrix())
    q = result.weights["model.layers.0.self_attn.q_proj"].input_rotation
    v = result.weights["model.layers.0.self_attn.v_proj"].input_rotation
    o = result.weights["model.layers.0.self_attn.o_proj"].input_rotation
    assert torch.equal(q.matrix(), v.matrix()) and not torch.equal(q.matrix(), o.matrix())
    # quantized in the rotated basis: close to the float weights once rotated back
    for name, qw in result.weights.items():
        w = model.get_submodule(name).weight.detach()
        assert float((qw.dequantize() - w).norm() / w.norm()) < 0.2
    # GPTQ worked with the rotated Hessian: the error it records (rotated basis) is the layer's
    # true output error, measured in the original basis on q_proj's own (float) inputs
    name = "model.layers.0.self_attn.q_proj"
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=_calibration().input_ids)
    handle.remove()
    acc = HessianAccumulator(96)
    acc.add(torch.cat(captured))
    true_error = hessian_error(model.get_submodule(name).weight.detach(),
                               result.weights[name], acc.hessian())
    assert result.details["layers"][name]["hessian_error"] == pytest.approx(true_error,
                                                                             rel=1e-3)


def test_block_tuning_of_rotated_weights_keeps_the_rotation() -> None:
    torch.manual_seed(0)
    block = _tiny_llama().model.layers[0]
    rotation = InputRotation.for_site(96, 0, "q")
    weights = {}
    with torch.inference_mode():  # as GPTQ makes them: rotations are inference tensors then
        for local in ("self_attn.q_proj", "mlp.down_proj"):
            linear = block.get_submodule(local)
            rot = InputRotation.for_site(linear.in_features, 0, local)
            qw = quantize_groups(rot.apply(linear.weight.detach()), 3, 32, False)
            qw.input_rotation = rot
            weights[local] = qw
            linear.weight.data = qw.dequantize()
    assert weights["mlp.down_proj"].input_rotation.signs.is_inference()
    del rotation
    x = torch.randn(4, 16, 96)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(_tiny_llama().config)
    position = torch.arange(16)[None].expand(4, -1)
    kw = {"position_embeddings": rope(x, position), "attention_mask": None}
    float_block = _tiny_llama().model.layers[0]
    with torch.no_grad():
        target = float_block(x, **kw)
        target = target[0] if isinstance(target, tuple) else target
    # the differentiable weight block tuning starts from is the weight the block runs
    for qw in weights.values():
        assert torch.allclose(TunableWeight(qw, torch.device("cpu"), codes=False).weight(),
                              qw.dequantize(), atol=1e-6)
    tuned = tune_block(block, weights, [x], [target], [kw],
                       TuningSettings(epochs=20, lr=0.01, batch_size=4))
    with torch.no_grad():
        start = block(x, **kw)
        start = start[0] if isinstance(start, tuple) else start
    assert tuned.stats.loss_before == pytest.approx(float((start - target).pow(2).mean()),
                                                    rel=1e-4)
    assert tuned.stats.kept and tuned.stats.loss_after < tuned.stats.loss_before
    for local, qw in tuned.weights.items():
        assert qw.input_rotation is weights[local].input_rotation
        assert torch.allclose(tuned.dense[local], qw.dequantize(), atol=1e-6)


# -- the allocator --------------------------------------------------------------------------


def test_allocator_measures_what_the_rotating_quantizer_will_quantize() -> None:
    model = _tiny_llama()
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"]
    candidates = [Candidate(2, 32), Candidate(4, 32)]
    ids = _calibration().input_ids
    plain = measure_sensitivity(model, names, candidates, False, "uniform", ids,
                                SensitivityOptions(num_samples=8, weighting="none"))
    rotated = measure_sensitivity(model, names, candidates, False, "uniform", ids,
                                  SensitivityOptions(num_samples=8, weighting="none",
                                                     rotation_seed=0))
    for name in names:
        assert rotated.damages[name] != plain.damages[name]
        assert rotated.damages[name][1] < rotated.damages[name][0]  # 4 bits beat 2
    # the rotated damage is RTN's error on W @ T with the Hessian of x @ T: check one directly
    name = "model.layers.0.mlp.down_proj"
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = torch.cat(captured)
    h = x.T @ x / x.shape[0]
    w = model.get_submodule(name).weight.detach()
    rotation = InputRotation.for_site(w.shape[1], 0, rotation_site(name))
    wr = rotation.apply(w)
    dw = wr - quantize_groups(wr, 2, 32, False).dequantize()
    expected = float(((dw @ rotation.rotate_hessian(h)) * dw).sum())
    assert rotated.damages[name][0] == pytest.approx(expected, rel=1e-3)


def test_rotated_and_unrotated_measurements_are_cached_apart() -> None:
    from quantmill.plugins.allocation.sensitivity_cache import measurement_key

    model = _tiny_llama()
    names = ["model.layers.0.mlp.down_proj"]
    ids = _calibration().input_ids
    keys = {measurement_key(model, names, [Candidate(4, 32)], False, "uniform", ids,
                            SensitivityOptions(rotation_seed=seed)) for seed in (None, 0, 1)}
    assert len(keys) == 3 and None not in keys


def test_rotation_cost_is_counted_in_the_budget() -> None:
    k = Candidate(4, 128)
    assert weight_bits(k, 576, 576, rotated=True) == weight_bits(k, 576, 576) + 8 * 576 + 32 * 81
    assert weight_bits(k, 576, 1536, rotated=True) == (weight_bits(k, 576, 1536)
                                                      + 8 * 1536 + 32 * 9)
