"""Slow: quantmill's GPTQ checkpoints load in GPTQModel 7.6 and in transformers ``from_pretrained``
and give the logits quantmill's own reader gives.

GPTQModel lives in its own virtual environment (``bench/envs/gptqmodel.sh``, built on first use
under ``~/.cache/quantmill-bench``, ~1-2 min): it pins its own dependency set, so it must not share
quantmill's. Checkpoints are written here with quantmill's RTN and writer; a subprocess running
that venv's python (``gptqmodel_logits.py``, which imports no quantmill) loads each one with
``GPTQModel.load(..., backend=BACKEND.TORCH)`` and with ``AutoModelForCausalLM.from_pretrained``
and saves logits; this process compares them with ``load_gptq_checkpoint``'s.

Tolerance. GPTQModel runs the model in bfloat16 on CPU (its default; the ``gptqmodel`` loader)
and again in float16 (``gptqmodel_fp16``), transformers in the checkpoint's float16, quantmill's
reader in float32, all from the same integers. The measure is ``max|logits - reference| /
max|reference|`` against the float32 reader. How much rounding alone moves it depends on the
compute dtype and the depth, so the bound is measured, not guessed: the reader itself is run in
the runtime's dtype, and the runtime may deviate at most ``NOISE_FACTOR = 2`` times as much as
that (floor ``MIN_TOL``), and never more than ``MAX_TOL``. Measured on these cases (2026-11,
GPTQModel 7.6.0, transformers 5.23.0, optimum 2.3.0): the reader's own bf16 noise is 1.3e-2 to
2.3e-2 on the 2-layer model and 4.8e-2 on 30-layer SmolLM2, and GPTQModel in bf16 deviated 0.75
to 1.13 times that; in float16 both GPTQModel and transformers gave exactly the reader's float16
logits (deviation = noise, 1.5e-3 to 4.1e-3). A real format error is far larger: reading a
checkpoint with every zero point off by one (the v1/v2 confusion) gives ~1.2, which
``test_tolerance_catches_an_off_by_one_zero`` checks.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantmill.plugins.base import (
    LoadedModel,
    ModuleQuantSpec,
    QuantizationResult,
    QuantizedWeight,
    QuantPlan,
)
from quantmill.plugins.formats.gptq import load_gptq_checkpoint, write_gptq_checkpoint
from quantmill.plugins.models.sources import GGUFSource, HFDirectorySource
from quantmill.plugins.quantizers.rtn.algorithm import quantize_groups

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ENV_SCRIPT = REPO / "bench" / "envs" / "gptqmodel.sh"
HELPER = Path(__file__).with_name("gptqmodel_logits.py")
LOADERS = ("gptqmodel", "gptqmodel_fp16", "transformers")
NOISE_FACTOR = 2.0
MIN_TOL = 2e-3
MAX_TOL = 0.1
#: The off-by-one-zero control must exceed MAX_TOL at least this many times over.
CONTROL_MARGIN = 5.0


@dataclass
class Case:
    name: str
    path: Path
    ids: Path
    checkpoint_format: str
    quantized: int  # number of quantized linears


# -- building checkpoints with quantmill's own code -----------------------------------------------


def rtn_weight(w: torch.Tensor, bits: int, group_size: int, sym: bool,
               perm: torch.Tensor | None = None) -> QuantizedWeight:
    """quantmill's RTN; with ``perm``, act-order style: groups are consecutive in ``perm``'s
    column order, so ``g_idx`` is a shuffled group assignment of the original columns."""
    if perm is None:
        return quantize_groups(w, bits, group_size, sym)
    qw = quantize_groups(w[:, perm], bits, group_size, sym)
    inv = torch.argsort(perm)  # original column j sits at position inv[j] of the permuted order
    qw.intweight = qw.intweight[:, inv].contiguous()
    qw.g_idx = qw.g_idx[inv].contiguous()
    return qw


def quantize_linears(model: torch.nn.Module, bits: int, group_size: int, sym: bool,
                     act_order: bool = False) -> QuantizationResult:
    """Every linear of the decoder layers (lm_head stays float, as GPTQ does by default)."""
    weights: dict[str, QuantizedWeight] = {}
    specs: dict[str, ModuleQuantSpec] = {}
    gen = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name):
            continue
        perm = torch.randperm(module.in_features, generator=gen) if act_order else None
        weights[name] = rtn_weight(module.weight.detach(), bits, group_size, sym, perm)
        specs[name] = ModuleQuantSpec(bits, group_size, sym, "rtn")
    return QuantizationResult(weights, QuantPlan(specs), {"damp_percent": 0.01})


def quantize_mixed(model: torch.nn.Module) -> QuantizationResult:
    """Mixed precision as quantmill's allocators make it: 4-bit g32 sym by default, down_proj
    8-bit g32 sym, v_proj 3-bit g64 asym; the writer lists the exceptions in ``dynamic``."""
    result = quantize_linears(model, 4, 32, sym=True)
    overrides = {"mlp.down_proj": (8, 32, True), "self_attn.v_proj": (3, 64, False)}
    for name, module in model.named_modules():
        spec = next((v for k, v in overrides.items() if name.endswith(k)), None)
        if spec is not None and ".layers." in name:
            result.weights[name] = quantize_groups(module.weight.detach(), *spec)
            result.plan.modules[name] = ModuleQuantSpec(*spec, "rtn")
    return result


def make_tiny_model(model_dir: Path) -> LoadedModel:
    """The tiny random Llama, re-initialised so every quantized linear matters to the logits.

    At the default init (std 0.02) the layers barely move the residual stream and a wrongly read
    weight could hide in the tolerance; with std 1/sqrt(in) each layer's output is O(1).
    """
    loaded = HFDirectorySource().load(model_dir, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
            elif ".layers." in name and param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
    return loaded


def write_case(loaded: LoadedModel, result: QuantizationResult, out: Path, name: str,
               ids: Path) -> Case:
    summary = write_gptq_checkpoint(loaded, result, out)
    return Case(name, out, ids, summary["checkpoint_format"], len(result.weights))


def save_ids(ids: torch.Tensor, path: Path) -> Path:
    save_file({"input_ids": ids.to(torch.int64).contiguous()}, str(path))
    return path


def tiny_cases(model_dir: Path, root: Path) -> list[Case]:
    loaded = make_tiny_model(model_dir)
    vocab = loaded.model.config.vocab_size
    ids = save_ids(torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)),
                   root / "tiny-ids.safetensors")
    model = loaded.model
    cases = [
        write_case(loaded, quantize_linears(model, 4, 32, sym=True), root / "w4g32-sym",
                   "w4g32-sym", ids),
    ]
    # Asymmetric, with zero points at both ends of the range: an all-positive weight gets
    # zeros of 0 (which v1 cannot store), an all-negative one zeros of 2**bits - 1.
    result = quantize_linears(model, 4, 32, sym=False)
    layer = model.model.layers[0].self_attn
    for proj, sign in ((layer.q_proj, 1.0), (layer.k_proj, -1.0)):
        name = next(n for n, m in model.named_modules() if m is proj)
        result.weights[name] = quantize_groups(sign * proj.weight.detach().abs(), 4, 32, False)
    zeros = torch.cat([qw.zeros.flatten() for qw in result.weights.values()])
    assert int(zeros.min()) == 0 and int(zeros.max()) == 15
    cases.append(write_case(loaded, result, root / "w4g32-asym", "w4g32-asym", ids))
    cases.append(write_case(loaded, quantize_linears(model, 3, -1, sym=False),
                            root / "w3g-1-asym", "w3g-1-asym", ids))
    cases.append(write_case(loaded, quantize_linears(model, 4, 32, sym=False, act_order=True),
                            root / "w4g32-asym-actorder", "w4g32-asym-actorder", ids))
    cases.append(write_case(loaded, quantize_mixed(model), root / "mixed-bits", "mixed-bits", ids))
    return cases


def smollm2_case(gguf: Path, root: Path) -> Case:
    """SmolLM2-135M, RTN 4-bit g128 asym: 576-wide inputs, so every group list ends short."""
    loaded = GGUFSource().load(gguf, torch.device("cpu"))
    text = (REPO / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:20_000]
    stream = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = save_ids(torch.tensor(stream[:128]).reshape(2, 64), root / "smollm2-ids.safetensors")
    result = quantize_linears(loaded.model, 4, 128, sym=False)
    case = write_case(loaded, result, root / "smollm2-w4g128-asym", "smollm2-w4g128-asym", ids)
    del loaded, result
    return case


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptqmodel_python() -> str:
    """The GPTQModel venv's python (built by bench/envs/gptqmodel.sh unless given)."""
    given = os.environ.get("QUANTMILL_GPTQMODEL_PYTHON")
    if given:
        return given
    proc = subprocess.run(["bash", str(ENV_SCRIPT)], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"building the GPTQModel venv failed:\n{proc.stderr[-4000:]}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    from quantmill.plugins.models.demo import DEMO_FILENAME, fetch_demo_model

    cached = Path.home() / ".quantmill" / "models" / DEMO_FILENAME
    return cached if cached.is_file() else fetch_demo_model()


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, demo_gguf: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("gptq-compat")
    cases = tiny_cases(tiny_model_dir, root) + [smollm2_case(demo_gguf, root)]
    return {c.name: c for c in cases}


@pytest.fixture(scope="module")
def external(checkpoints: dict[str, Case], gptqmodel_python: str,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Runs every checkpoint through GPTQModel and transformers once, in the GPTQModel venv."""
    work = tmp_path_factory.mktemp("gptqmodel-run")
    out = work / "logits"
    spec = {
        "out": str(out),
        "loaders": list(LOADERS),
        "cases": [{"name": c.name, "path": str(c.path), "input_ids": str(c.ids)}
                  for c in checkpoints.values()],
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=2))
    (work / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TMPDIR=str(work / "tmp"),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([gptqmodel_python, str(HELPER), "--spec", str(work / "spec.json")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"GPTQModel helper failed:\n{proc.stderr[-6000:]}"
    return out, json.loads((out / "results.json").read_text())


# -- comparisons --------------------------------------------------------------------------------


@functools.cache
def reader_logits(path: Path, ids: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """quantmill's reader (GPTQLinear modules), computing in ``dtype``; float32 logits."""
    model = load_gptq_checkpoint(path, dtype=dtype).model
    with torch.inference_mode():
        return model(input_ids=load_file(str(ids))["input_ids"]).logits.float()


def rel_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).abs().max() / ref.abs().max())


def test_checkpoint_formats(checkpoints: dict[str, Case]) -> None:
    formats = {name: c.checkpoint_format for name, c in checkpoints.items()}
    assert formats == {"w4g32-sym": "gptq", "w4g32-asym": "gptq_v2", "w3g-1-asym": "gptq_v2",
                       "w4g32-asym-actorder": "gptq_v2", "mixed-bits": "gptq_v2",
                       "smollm2-w4g128-asym": "gptq_v2"}
    qcfg = json.loads((checkpoints["w4g32-asym-actorder"].path / "quantize_config.json")
                      .read_text())
    assert qcfg["desc_act"] is True
    qcfg = json.loads((checkpoints["mixed-bits"].path / "quantize_config.json").read_text())
    assert len(qcfg["dynamic"]) == 4  # down_proj and v_proj of both layers


CASES = ["w4g32-sym", "w4g32-asym", "w3g-1-asym", "w4g32-asym-actorder", "mixed-bits",
         "smollm2-w4g128-asym"]
#: transformers 5.23 + optimum 2.3 ignore GPTQModel's per-module "dynamic" overrides: optimum
#: builds every layer at the default bits/group_size, so the 8-bit and 3-bit layers fail the
#: shape check ("You set `ignore_mismatched_sizes` to `False`..."). strict: tells us when fixed.
XFAIL = {
    ("mixed-bits", "transformers"): "transformers/optimum do not apply GPTQ `dynamic` overrides",
}
PARAMS = [
    pytest.param(name, loader, marks=pytest.mark.xfail(strict=True, reason=XFAIL[name, loader]))
    if (name, loader) in XFAIL else (name, loader)
    for name in CASES for loader in LOADERS
]


@pytest.mark.parametrize(("name", "loader"), PARAMS)
def test_logits_match_quantmill_reader(name: str, loader: str, checkpoints: dict[str, Case],
                                       external: tuple[Path, dict]) -> None:
    out, results = external
    record = results[name][loader]
    assert record["ok"], f"{loader} could not run {name}:\n{record.get('error')}"
    case = checkpoints[name]
    # every quantized linear ran on GPTQModel's pure-torch kernel, none stayed float
    assert record["kernels"] == {"TorchLinear": case.quantized}, record["kernels"]
    got = load_file(str(out / f"{name}.{loader}.safetensors"))["logits"]
    ref = reader_logits(case.path, case.ids)
    assert got.shape == ref.shape
    noise = rel_diff(reader_logits(case.path, case.ids, getattr(torch, record["dtype"])), ref)
    tol = min(max(NOISE_FACTOR * noise, MIN_TOL), MAX_TOL)
    diff = rel_diff(got, ref)
    print(f"{name} / {loader} ({record['dtype']}): max|diff|/max|ref| = {diff:.2e}, "
          f"reader's own {record['dtype']} noise {noise:.2e}, bound {tol:.2e}")
    assert diff < tol, f"{name} / {loader}: relative logit difference {diff:.3e} >= {tol:.3e}"
    if name.startswith("smollm2"):  # a trained model: the predicted tokens agree too
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        assert agree >= 0.9, f"top-1 agreement {agree:.2f}"


def test_tolerance_catches_an_off_by_one_zero(checkpoints: dict[str, Case],
                                              tmp_path: Path) -> None:
    """Reading the v2 checkpoint as v1 (every zero point one higher, every weight one step off)
    must exceed the tolerance by far: the bound above does detect a zero-convention error."""
    case = checkpoints["w4g32-asym"]
    wrong = tmp_path / "as-v1"
    shutil.copytree(case.path, wrong)
    for file in ("config.json", "quantize_config.json"):
        data = json.loads((wrong / file).read_text())
        section = data["quantization_config"] if file == "config.json" else data
        assert section["checkpoint_format"] == "gptq_v2"
        section["checkpoint_format"] = "gptq"
        (wrong / file).write_text(json.dumps(data))
    diff = rel_diff(reader_logits(wrong, case.ids), reader_logits(case.path, case.ids))
    print(f"off-by-one zero points: max|diff|/max|ref| = {diff:.2e}")
    assert diff > CONTROL_MARGIN * MAX_TOL
