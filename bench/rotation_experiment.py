"""Experiment (not a product feature): how much would incoherence processing (random rotations of
each linear's input, as in QuIP#/QuaRot) help quantmill's quantizers on SmolLM2-135M?

Why it exists: issue #4 asks mixed precision at 3.5 average bits to reach uniform 4-bit GPTQ's
perplexity; no allocation over the scalar formats does (the low-bit formats are the limit). This
script measures what rotations, block tuning and both together buy, so the choice of the next
format rests on numbers.

What it does: loads the demo GGUF, and (``"rotate": true``, the default) rewrites every decoder
block exactly, in float:

* q/k/v and gate/up read ``norm(h) @ R`` (``R`` a seeded random orthogonal matrix per site) and
  their weights become ``W @ R``;
* v_proj's rows and o_proj's input columns turn by one per-head rotation (folded, no run-time
  cost);
* down_proj reads ``(act(gate) * up) @ R3`` with ``W_down @ R3``.

The rewritten model computes the same function (checked on every run, relative error ~1e-6),
but every quantized weight sees inputs whose outliers are spread over all channels. Then it plans
and quantizes with quantmill's own plugins (any quantizer, any allocator, through
``build_plugin``), puts the dequantized weights (and any tuned norms) into the rotated model and
measures perplexity with the GPTQ benchmark's protocol. No checkpoint is written: dense rotations
would cost more than the weights. The product feature that came out of it is the quantizers'
``rotation: hadamard`` option (randomized Hadamard transforms per input site, stored in the
checkpoint; ``plugins/hadamard.py``); this script keeps the per-head v/o rotation that the
product leaves out.

    python bench/rotation_experiment.py --device cuda --out results.json \\
        --config 'rm35={"quantizer": {"method": "gptq", ...}, "allocator": "mixed_precision",
                        "allocator_options": {"avg_bits": 3.5}}'

Results: bench/results/rotation-tuning-cuda-experiments.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gptq_bench import DATA, calibration_file, demo_gguf  # noqa: E402


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (n a power of two), scaled to be orthogonal."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def randomized_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """``diag(signs) @ kron(Q_m, H_{2^k})`` for ``n = m * 2^k`` (m odd): what a checkpoint could
    store in n bits plus m^2 floats and apply in O(n log n), instead of a dense n x n matrix."""
    power = n & -n  # the largest power of two dividing n
    odd = n // power
    signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    return signs[:, None] * torch.kron(random_orthogonal(odd, generator).contiguous(),
                                       sylvester_hadamard(power))


class RotatedNorm(torch.nn.Module):
    """``norm(h) @ R``: the rotated input of the linears that read this norm."""

    def __init__(self, norm: torch.nn.Module, rotation: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("rotation", rotation)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) @ self.rotation


class RotatedMLP(torch.nn.Module):
    """A Llama MLP whose down_proj reads a rotated input (module names unchanged)."""

    def __init__(self, mlp: torch.nn.Module, rotation: torch.Tensor):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.register_buffer("rotation", rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj((self.act_fn(self.gate_proj(x)) * self.up_proj(x)) @ self.rotation)


@torch.no_grad()
def rotate(model: torch.nn.Module, seed: int, kind: str = "dense") -> None:
    """Rewrite every decoder block of a Llama-style model as described above (in place);
    ``kind`` "dense" (Haar-random) or "hadamard" (``randomized_hadamard``)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    make = {"dense": random_orthogonal, "hadamard": randomized_hadamard}[kind]

    def rotation(n: int) -> torch.Tensor:
        return make(n, generator).to(device)

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        r1 = rotation(cfg.hidden_size)
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
            linear.weight.copy_(linear.weight @ r1)
        layer.input_layernorm = RotatedNorm(layer.input_layernorm, r1)
        r2 = rotation(cfg.hidden_size)
        for linear in (mlp.gate_proj, mlp.up_proj):
            linear.weight.copy_(linear.weight @ r2)
        layer.post_attention_layernorm = RotatedNorm(layer.post_attention_layernorm, r2)
        rh = rotation(head_dim)
        v = attn.v_proj.weight.view(-1, head_dim, attn.v_proj.in_features)
        attn.v_proj.weight.copy_(torch.einsum("dk,hdi->hki", rh, v).reshape_as(attn.v_proj.weight))
        heads = attn.o_proj.in_features // head_dim
        attn.o_proj.weight.copy_(attn.o_proj.weight @ torch.block_diag(*[rh] * heads))
        r3 = rotation(mlp.down_proj.in_features)
        mlp.down_proj.weight.copy_(mlp.down_proj.weight @ r3)
        layer.mlp = RotatedMLP(mlp, r3)


def perplexity(loaded: Any, windows: int) -> float:
    from quantmill.plugins.evaluators.perplexity import PerplexityEvaluator

    return PerplexityEvaluator.from_options(
        {"dataset": DATA / "test.txt", "seq_len": 512, "max_windows": windows, "batch_size": 8}
    ).evaluate(loaded, None).as_dict()["perplexity"]


def run(name: str, config: dict, gguf: Path, calib: Path, device: torch.device,
        windows: int) -> dict:
    from safetensors.torch import load_file

    from quantmill.flows.recipe import build_plugin
    from quantmill.plugins.base import CalibrationSet
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager
    from quantmill.plugins.models.modules import quantizable_linears
    from quantmill.plugins.models.sources import GGUFSource

    catalog = Catalog(get_plugin_manager(load_entrypoints=False))
    loaded = GGUFSource().load(gguf, device)
    model = loaded.model.float().eval()
    rotated = config.get("rotate", True)
    exactness = None
    if rotated:
        probe = load_file(str(calib))["input_ids"][:1, :64].to(device)
        with torch.no_grad():
            before = model(input_ids=probe).logits
            rotate(model, config.get("seed", 0), config.get("rotation", "dense"))
            after = model(input_ids=probe).logits
        exactness = float((after - before).abs().max() / before.abs().max())
    options = dict(config["quantizer"])
    quantizer = build_plugin(catalog.quantizers, options.pop("method"), options, name, REPO)
    allocator = build_plugin(catalog.bit_allocators, config.get("allocator", "uniform"),
                             config.get("allocator_options", {}), name, REPO)
    calibration = CalibrationSet(load_file(str(calib))["input_ids"], {})
    t0 = time.perf_counter()
    names = quantizable_linears(model, quantizer.skip_patterns())
    plan = allocator.plan(model, names, quantizer.default_spec(), calibration)
    result = quantizer.quantize(model, plan, calibration)
    quantize_s = time.perf_counter() - t0
    modules = dict(model.named_modules())
    state = model.state_dict()
    with torch.no_grad():
        for module_name, weight in result.weights.items():
            target = modules[module_name].weight
            target.copy_(weight.dequantize().to(target.device))
        for key, value in result.float_overrides.items():  # block tuning's norms (unrotated)
            state[key].copy_(value)
    return {"name": name, "config": config, "rotation_relative_error": exactness,
            "quantize_s": quantize_s, "perplexity": perplexity(loaded, windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help="default: the demo GGUF")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="default: the GPTQ benchmark's calibration file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--config", action="append", required=True, metavar="NAME=JSON",
                        help="'quantizer' (options with 'method'), optional 'allocator', "
                        "'allocator_options', 'rotate' (default true), 'rotation' ('dense' or "
                        "'hadamard'), 'seed'")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    gguf = args.gguf or demo_gguf()
    calib = args.calibration or calibration_file()
    results = {"device": args.device, "torch": torch.__version__, "runs": []}
    for item in args.config:
        name, _, text = item.partition("=")
        results["runs"].append(run(name, json.loads(text), gguf, calib,
                                   torch.device(args.device), args.windows))
        print(json.dumps(results["runs"][-1]), flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # kept if cut short


if __name__ == "__main__":
    main()
