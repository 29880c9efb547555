"""GPTQ on a CUDA device: the same code path as on CPU, the same checkpoint, comparable quality.

(Any quantizer runs through ``--config``: clustering results are written and read back in the
look-up-table layout instead of GPTQ's.)

Runs quantmill's GPTQ on SmolLM2-135M (the demo GGUF) with the weights loaded on the GPU, writes
the GPTQ checkpoint, reads it back with quantmill's reader and measures perplexity with the GPTQ
benchmark's protocol (calibration file from ``bench/gptq_bench.py``, first N 512-token windows of
the WikiText-2 test split). Meant for a lent GPU machine; it refuses to run without CUDA.

    python bench/gptq_cuda_check.py --gguf PATH --calibration PATH --out results.json

Writes a JSON file with, per configuration: quantize seconds (load excluded), CUDA peak memory,
perplexity and checkpoint size, next to the machine's description.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gptq_bench import BEST  # noqa: E402  (the same "best" settings as the CPU benchmark)

CONFIGS = {
    "gptq-w4g128-gptqmodel-settings": {"method": "gptq", "bits": 4, "group_size": 128},
    "gptq-w4g128-best": {"method": "gptq", "bits": 4, "group_size": 128, **BEST},
    "gptq-w3g128-best": {"method": "gptq", "bits": 3, "group_size": 128, **BEST},
}


def run_one(settings: dict, gguf: Path, calib: Path, windows: int, workdir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from quantmill.flows.recipe import build_plugin
    from quantmill.plugins.base import CalibrationSet
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.evaluators.perplexity import PerplexityEvaluator
    from quantmill.plugins.formats.gptq import write_gptq_checkpoint
    from quantmill.plugins.formats.lut import LUTCheckpointSource, write_lut_checkpoint
    from quantmill.plugins.formats.trellis import TrellisCheckpointSource, write_trellis_checkpoint
    from quantmill.plugins.manager import get_plugin_manager
    from quantmill.plugins.models.modules import quantizable_linears
    from quantmill.plugins.models.sources import GGUFSource, GPTQCheckpointSource

    cuda = torch.device("cuda")
    catalog = Catalog(get_plugin_manager(load_entrypoints=False))
    options = dict(settings)
    allocator_name = options.pop("allocator", "uniform")
    allocator_options = options.pop("allocator_options", {})
    quantizer = build_plugin(catalog.quantizers, options.pop("method"), options, "check", REPO)
    source = GGUFSource()
    loaded = (source.load_deferred(gguf, cuda) if quantizer.accepts_deferred_weights
              else source.load(gguf, cuda))
    calibration = CalibrationSet(load_file(str(calib))["input_ids"], {})
    allocator = build_plugin(catalog.bit_allocators, allocator_name, allocator_options, "check",
                             REPO)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    names = quantizable_linears(loaded.model, quantizer.skip_patterns())
    plan = allocator.plan(loaded.model, names, quantizer.default_spec(), calibration)
    result = quantizer.quantize(loaded.model, plan, calibration)
    torch.cuda.synchronize()
    quantize_s = time.perf_counter() - t0
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    devices = {w.intweight.device.type for w in result.weights.values()
               if hasattr(w, "intweight")}
    out = workdir / "checkpoint"
    # codebook weights (clustering) go to the look-up-table layout, trellis paths to the
    # trellis layout, uniform ones to GPTQ's
    writer, reader = {"codebook": (write_lut_checkpoint, LUTCheckpointSource),
                      "trellis": (write_trellis_checkpoint, TrellisCheckpointSource),
                      }.get(quantizer.weight_kind, (write_gptq_checkpoint, GPTQCheckpointSource))
    writer(loaded, result, out)
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    del loaded, result
    torch.cuda.empty_cache()
    reread = reader().load(out, cuda)
    if reread.tokenizer is None:
        reread.tokenizer = source.load_tokenizer(gguf)
    ppl = PerplexityEvaluator.from_options(
        {"dataset": REPO / "data/wikitext-2/test.txt", "seq_len": 512, "max_windows": windows,
         "batch_size": 8}).evaluate(reread, None)
    return {"settings": settings, "quantize_s": quantize_s, "cuda_peak_gb": peak_gb,
            "result_devices": sorted(devices), "checkpoint_mb": size_mb,
            "perplexity": ppl.as_dict()["perplexity"],
            "model_device": str(next(reread.model.parameters()).device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--only", nargs="*", help="configurations to run (default: every "
                        "built-in one, or only the --config ones when there are any)")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                        help="an extra configuration: quantizer options with 'method', and "
                        "optionally 'allocator' and 'allocator_options' (experiments)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    extra = [item.partition("=") for item in args.config]
    CONFIGS.update({name: json.loads(text) for name, _, text in extra})
    if args.only is None:
        args.only = [name for name, _, _ in extra] or list(CONFIGS)

    import torch

    if not torch.cuda.is_available():
        sys.exit("gptq_cuda_check: torch sees no CUDA device here")
    unknown = sorted(set(args.only) - set(CONFIGS))
    if unknown:
        sys.exit(f"gptq_cuda_check: unknown configurations {unknown}; known: {sorted(CONFIGS)}")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "python": platform.python_version(), "windows": args.windows, "runs": {}}
    for name in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            results["runs"][name] = run_one(CONFIGS[name], args.gguf, args.calibration,
                                            args.windows, Path(tmp))
        print(name, json.dumps(results["runs"][name]), flush=True)
        # written after every configuration: a run cut short keeps what it finished
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
