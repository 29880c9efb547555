"""GPTQ gives the same integers on every device torch sees here (CPU always, CUDA when present):
the code path that runs on a GPU machine is the one tested on CPU, not a second one.

On a machine without CUDA only the CPU cases run (they check determinism); on one with CUDA the
same tests compare the GPU's results with the CPU's. Results always come back in host memory
(the GPU holds one block's work at a time), so "ran on the device" is checked through the
device's own memory statistics.
"""

from __future__ import annotations

import copy

import pytest
import torch

from quantmill.plugins.base import CalibrationSet, QuantPlan
from quantmill.plugins.models.modules import quantizable_linears
from quantmill.plugins.quantizers.gptq.algorithm import (
    GPTQSettings,
    gptq_quantize,
)
from quantmill.plugins.quantizers.gptq.plugin import GPTQQuantizer
from quantmill.plugins.quantizers.hessian import HessianAccumulator

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _device_used(device: str) -> bool:
    """True when the device did the work: CUDA allocated memory for it (CPU: trivially)."""
    return device == "cpu" or torch.cuda.max_memory_allocated() > 0


def _layer(seed: int = 0, out: int = 96, inp: int = 256, n: int = 1024):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5
    x = torch.randn(n, inp, generator=g) @ mix + 0.3 * torch.randn(n, inp, generator=g)
    return torch.randn(out, inp, generator=g) * 0.05, x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("desc_act", [False, True])
def test_layer_gptq_same_on_device(device: str, desc_act: bool) -> None:
    w, x = _layer()
    settings = GPTQSettings(bits=4, group_size=64, desc_act=desc_act, static_groups=desc_act)

    def run(dev: str):
        acc = HessianAccumulator(x.shape[1], torch.device(dev))
        for chunk in x.to(dev).split(256):
            acc.add(chunk)
        qw, _ = gptq_quantize(w.to(dev), acc.hessian(), settings)
        return qw

    cpu = run("cpu")
    _reset_peak(device)
    other = run(device)
    assert _device_used(device)
    assert other.intweight.device.type == "cpu"  # results are handed back in host memory
    same = (cpu.intweight == other.intweight.cpu()).float().mean()
    assert same > 0.99  # float summation order may differ between devices
    assert torch.equal(cpu.g_idx, other.g_idx.cpu())
    assert torch.allclose(cpu.scales, other.scales.cpu(), rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_layerwise_gptq_on_device(tiny_llama, device: str) -> None:
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    q = GPTQQuantizer.from_options({"bits": 4, "group_size": 32, "batch_size": 4})
    plan = QuantPlan({n: q.default_spec()
                      for n in quantizable_linears(tiny_llama, q.skip_patterns())})
    cpu = q.quantize(tiny_llama, plan, CalibrationSet(ids, {}))
    model = copy.deepcopy(tiny_llama).to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _reset_peak(device)
    other = q.quantize(model, plan, CalibrationSet(ids, {}))
    assert _device_used(device)
    assert set(other.weights) == set(cpu.weights)
    for name, qw in other.weights.items():
        assert qw.intweight.device.type == "cpu"
        same = (qw.intweight.cpu() == cpu.weights[name].intweight).float().mean()
        assert same > 0.98, (name, float(same))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
