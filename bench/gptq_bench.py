"""GPTQ benchmark: quantmill's RTN and GPTQ against GPTQModel 7.6.0, side by side in one run.

Protocol (issue #3): SmolLM2-135M-Instruct from the demo GGUF; calibration 64 samples x 512
tokens from the WikiText-2 valid split, seed 0 (quantmill's ``text`` calibration source; the same
token ids are fed to GPTQModel); perplexity over the first 40 non-overlapping 512-token windows
of the test split (quantmill's ``perplexity`` evaluator, run on every checkpoint as written, with
quantmill's reader, GPTQModel's checkpoints included). Asymmetric, desc_act off unless a row says
otherwise. Both tools compute in float32 (GPTQModel's own CPU default, bfloat16, has no hardware
support on AVX2-only CPUs such as this one: 1398 s instead of 345 s), after one untimed GPTQModel
warm-up run that builds its CPU packing extension.

Each quantization runs in its own subprocess so its wall time and peak RSS are its own:
``quantize_s`` is the time from just before quantization to just after the checkpoint is saved
(model loading excluded, for both tools), ``peak_rss_mb`` the subprocess's ru_maxrss (model load
included). Runs are sequential on the same machine; timings are single runs (n=1).

    .venv/bin/python bench/gptq_bench.py                 # everything, ~1 hour on 2 cores
    .venv/bin/python bench/gptq_bench.py --only gptq-w4g128-gptqmodel-settings --windows 10

Writes bench/results/gptq.json and bench/results/gptq.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QUANTMILL_BENCH_CACHE", Path.home() / ".cache" / "quantmill-bench"))
DATA = REPO / "data" / "wikitext-2"
RESULTS = REPO / "bench" / "results"

# name -> (tool, settings). "gptqmodel settings" = desc_act off, damp 0.01, asymmetric, with
# quantmill's defaults otherwise (its Hessian-weighted range search and scale refit: algorithm,
# not settings GPTQModel exposes under these names); "-plain" turns both off (the textbook
# algorithm GPTQModel runs); "best" adds act-order with static groups and damp 0.001.
BEST = {"desc_act": True, "static_groups": True, "mse_clip": True, "damp_percent": 0.001}
PLAIN = {"mse_clip": False, "refit_scales": False}
CONFIGS: dict[str, tuple[str, dict]] = {
    # each GPTQModel run sits next to quantmill's run of the same bits/group (fair timing)
    "rtn-w4g128": ("quantmill", {"method": "rtn", "bits": 4, "group_size": 128}),
    "rtn-w3g128": ("quantmill", {"method": "rtn", "bits": 3, "group_size": 128}),
    "rtn-w4g64": ("quantmill", {"method": "rtn", "bits": 4, "group_size": 64}),
    "gptqmodel-w4g128": ("gptqmodel", {"bits": 4, "group_size": 128}),
    "gptq-w4g128-gptqmodel-settings": ("quantmill", {"method": "gptq", "bits": 4,
                                                      "group_size": 128}),
    "gptq-w4g128-gptqmodel-settings-plain": ("quantmill", {"method": "gptq", "bits": 4,
                                                            "group_size": 128, **PLAIN}),
    "gptq-w4g128-best": ("quantmill", {"method": "gptq", "bits": 4, "group_size": 128, **BEST}),
    "gptqmodel-w3g128": ("gptqmodel", {"bits": 3, "group_size": 128}),
    "gptq-w3g128-gptqmodel-settings": ("quantmill", {"method": "gptq", "bits": 3,
                                                      "group_size": 128}),
    "gptq-w3g128-gptqmodel-settings-plain": ("quantmill", {"method": "gptq", "bits": 3,
                                                            "group_size": 128, **PLAIN}),
    "gptq-w3g128-best": ("quantmill", {"method": "gptq", "bits": 3, "group_size": 128, **BEST}),
    "gptqmodel-w4g64": ("gptqmodel", {"bits": 4, "group_size": 64}),
    "gptq-w4g64-gptqmodel-settings": ("quantmill", {"method": "gptq", "bits": 4,
                                                     "group_size": 64}),
    "gptq-w4g64-best": ("quantmill", {"method": "gptq", "bits": 4, "group_size": 64, **BEST}),
}


def demo_gguf() -> Path:
    from quantmill.plugins.models.demo import fetch_demo_model

    return fetch_demo_model()


def calibration_file() -> Path:
    """64 x 512 token ids from the valid split, seed 0, as a safetensors file (cached)."""
    from safetensors.torch import save_file

    from quantmill.plugins.calibration.text import TextCalibrationSource
    from quantmill.plugins.models.sources import GGUFSource

    path = CACHE / "calib-wikitext2-64x512-s0.safetensors"
    if not path.is_file():
        tokenizer = GGUFSource().load_tokenizer(demo_gguf())
        calib = TextCalibrationSource.from_options(
            {"path": DATA / "valid.txt", "num_samples": 64, "seq_len": 512, "seed": 0}
        ).build(tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": calib.input_ids.contiguous()}, str(path))
    return path


# -- subprocess workers ---------------------------------------------------------------------------


def quantize_worker(settings: dict, calib: Path, out: Path) -> dict:
    """Load the demo model, quantize with quantmill, write the checkpoint (in this process)."""
    import torch
    from safetensors.torch import load_file

    from quantmill.flows.recipe import build_plugin
    from quantmill.plugins.base import CalibrationSet
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.formats.gptq import write_gptq_checkpoint
    from quantmill.plugins.manager import get_plugin_manager
    from quantmill.plugins.models.modules import quantizable_linears
    from quantmill.plugins.models.sources import GGUFSource

    catalog = Catalog(get_plugin_manager(load_entrypoints=False))
    options = dict(settings)
    quantizer = build_plugin(catalog.quantizers, options.pop("method"), options, "bench", REPO)
    t0 = time.perf_counter()
    source = GGUFSource()  # as the flow does: deferred block weights for layer-by-layer methods
    load = source.load_deferred if quantizer.accepts_deferred_weights else source.load
    loaded = load(demo_gguf(), torch.device("cpu"))
    load_s = time.perf_counter() - t0
    allocator = catalog.bit_allocators.get("uniform")()
    calibration = CalibrationSet(load_file(str(calib))["input_ids"], {})
    t1 = time.perf_counter()
    names = quantizable_linears(loaded.model, quantizer.skip_patterns())
    plan = allocator.plan(loaded.model, names, quantizer.default_spec(), calibration)
    result = quantizer.quantize(loaded.model, plan, calibration)
    t2 = time.perf_counter()
    write_gptq_checkpoint(loaded, result, out)
    t3 = time.perf_counter()
    return {"load_s": load_s, "quantize_only_s": t2 - t1, "save_s": t3 - t2,
            "quantize_s": t3 - t1,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def perplexity_worker(checkpoint: Path, windows: int) -> dict:
    import torch

    from quantmill.plugins.evaluators.perplexity import PerplexityEvaluator
    from quantmill.plugins.models.sources import GGUFSource, GPTQCheckpointSource

    if checkpoint.suffix == ".gguf":
        loaded = GGUFSource().load(checkpoint, torch.device("cpu"))
    else:
        loaded = GPTQCheckpointSource().load(checkpoint, torch.device("cpu"))
        if loaded.tokenizer is None:
            loaded.tokenizer = GGUFSource().load_tokenizer(demo_gguf())
    t0 = time.perf_counter()
    result = PerplexityEvaluator.from_options(
        {"dataset": DATA / "test.txt", "seq_len": 512, "max_windows": windows, "batch_size": 4}
    ).evaluate(loaded, None)
    return {"perplexity": result.as_dict()["perplexity"], "eval_s": time.perf_counter() - t0,
            "scored_tokens": result.protocol["scored_tokens"]}


def _subprocess_json(args: list[str]) -> dict:
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args[:4])}... failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


# GPTQModel's "auto" dtype on CPU is bfloat16. This machine's CPU (AMD EPYC, AVX2) has no bf16
# instructions: a bf16 matmul runs at about 1 GFLOP/s against 164 in float32, so GPTQModel took
# 1398 s in bfloat16 here (bench/results/gptq-memory.md). Both tools run in float32.
GPTQMODEL_DTYPE = os.environ.get("GPTQMODEL_DTYPE", "float32")
_WARMED: list[bool] = []


def _warm_up_gptqmodel(command: list[str], out_root: Path) -> None:
    """One untimed 2-sample run before the first timed one: GPTQModel JIT-builds its CPU packing
    extension on its first quantization on a machine (~20 s, inside ``quantize()``), and the
    first import compiles its Python files."""
    if _WARMED:
        return
    import shutil

    scratch = out_root / "_gptqmodel-warmup"
    shutil.rmtree(scratch, ignore_errors=True)
    _subprocess_json([*command, "--limit-samples", "2", "--out", str(scratch)])
    shutil.rmtree(scratch, ignore_errors=True)
    _WARMED.append(True)


def run_config(name: str, tool: str, settings: dict, calib: Path, windows: int,
               out_root: Path) -> dict:
    out = out_root / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    if tool == "quantmill":
        stats = _subprocess_json([sys.executable, __file__, "--worker-quantize",
                                  json.dumps(settings), str(calib), str(out)])
    else:
        if not (CACHE / "smollm2-135m-hf" / "config.json").is_file():
            subprocess.run([sys.executable, str(REPO / "bench/prepare_models.py")], check=True)
        venv_python = subprocess.run(["bash", str(REPO / "bench/envs/gptqmodel.sh")],
                                     capture_output=True, text=True, check=True
                                     ).stdout.strip().splitlines()[-1]
        command = [
            venv_python, str(REPO / "bench/gptqmodel_runner.py"),
            "--model", str(CACHE / "smollm2-135m-hf"), "--calibration", str(calib),
            "--bits", str(settings["bits"]), "--group-size", str(settings["group_size"]),
            "--asym", "--no-desc-act", "--no-act-group-aware", "--damp", "0.01",
            "--dtype", GPTQMODEL_DTYPE]
        _warm_up_gptqmodel(command, out_root)
        raw = _subprocess_json([*command, "--out", str(out)])
        stats = {"load_s": raw.get("load_seconds"), "quantize_s": raw["quantize_seconds"],
                 "peak_rss_mb": raw["peak_rss_mb_self"], "raw": raw}
    ppl = _subprocess_json([sys.executable, __file__, "--worker-perplexity", str(out),
                            str(windows)])
    return {"name": name, "tool": tool, "settings": settings, **stats, **ppl,
            "checkpoint_mb": _dir_mb(out)}


def write_markdown(results: dict, path: Path) -> None:
    rows = ["| config | tool | perplexity | quantize s | peak RSS MB | checkpoint MB |",
            "|---|---|---|---|---|---|"]
    base = results.get("fp32_reference")
    if base:
        rows.append(f"| fp32 reference (GGUF dequantized) | - | {base['perplexity']:.2f} | | | |")
    for r in results["runs"]:
        rows.append(f"| {r['name']} | {r['tool']} | {r['perplexity']:.2f} | "
                    f"{r['quantize_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['checkpoint_mb']:.1f} |")
    ratios = results.get("ratios", {})
    lines = [f"# GPTQ benchmark ({results['date']})", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']}", "", __doc__.split("\n\n")[1], "", *rows, ""]
    if ratios:
        lines += ["Side-by-side ratios (same run):", ""]
        lines += [f"- {k}: {v:.2f}" for k, v in ratios.items()]
    path.write_text("\n".join(lines) + "\n")


def _machine() -> str:
    """CPU count, model and the vector extensions that decide float32/bfloat16 matmul speed."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    has = [f for f in wanted if f in flags]
    lacks = [f for f in wanted if f not in flags]
    return (f"{os.cpu_count()} CPUs ({model or 'unknown model'}; has {', '.join(has) or '-'}, "
            f"lacks {', '.join(lacks) or '-'}), torch threads default")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="config names (default: all)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--no-gptqmodel", action="store_true")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "gptq.json")
    parser.add_argument("--worker-quantize", nargs=3)
    parser.add_argument("--worker-perplexity", nargs=2)
    args = parser.parse_args()
    if args.worker_quantize:
        settings, calib, out = args.worker_quantize
        print(json.dumps(quantize_worker(json.loads(settings), Path(calib), Path(out))))
        return 0
    if args.worker_perplexity:
        print(json.dumps(perplexity_worker(Path(args.worker_perplexity[0]),
                                           int(args.worker_perplexity[1]))))
        return 0

    calib = calibration_file()
    out_root = CACHE / "checkpoints"
    names = args.only or [n for n, (tool, _) in CONFIGS.items()
                          if not (args.no_gptqmodel and tool == "gptqmodel")]
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                     "machine": _machine(), "runs": [],
                     "windows": args.windows}
    if not args.no_reference:
        results["fp32_reference"] = _subprocess_json(
            [sys.executable, __file__, "--worker-perplexity", str(demo_gguf()),
             str(args.windows)])
    for name in names:
        tool, settings = CONFIGS[name]
        print(f"== {name}", flush=True)
        run = run_config(name, tool, settings, calib, args.windows, out_root)
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    by_name = {r["name"]: r for r in results["runs"]}
    ratios = {}
    for bits_group in ("w4g128", "w3g128", "w4g64"):
        ours, theirs = by_name.get(f"gptq-{bits_group}-gptqmodel-settings"), by_name.get(
            f"gptqmodel-{bits_group}")
        if ours and theirs:
            ratios[f"quantize time quantmill/GPTQModel {bits_group}"] = (
                ours["quantize_s"] / theirs["quantize_s"])
    results["ratios"] = ratios
    results["median_quantize_s"] = {
        tool: statistics.median(r["quantize_s"] for r in results["runs"] if r["tool"] == tool)
        for tool in {r["tool"] for r in results["runs"]}}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
