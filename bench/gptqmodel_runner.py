"""Quantize a Hugging Face model directory with GPTQModel, for side-by-side benchmarks.

Runs INSIDE the GPTQModel venv (``bash bench/envs/gptqmodel.sh`` builds it and prints its
python); it imports no quantmill. It feeds GPTQModel exactly quantmill's calibration samples: a
safetensors file with one int64 ``input_ids`` tensor [N, L] (what quantmill's calibration step
stores; ``bench/prepare_models.py --calibration`` writes one), each row one example with an
attention mask of ones, in file order (no sorting, concatenation or length filtering).

Usage::

    PY=$(bash bench/envs/gptqmodel.sh | tail -1)
    nice -n 10 $PY bench/gptqmodel_runner.py --model ~/.cache/quantmill-bench/smollm2-135m-hf \\
        --calibration ~/.cache/quantmill-bench/calib-wikitext2-64x512-s0.safetensors \\
        --bits 4 --group-size 128 --asym --no-desc-act --damp 0.01 \\
        --out /tmp/smollm2-gptqmodel-w4g128 --json /tmp/smollm2-gptqmodel-w4g128.json

Prints one JSON object (last line of stdout; also written to ``--json``):

* ``quantize_seconds``: wall time from just before ``quantize()`` to just after ``save()``
  (``quantize_only_seconds`` and ``save_seconds`` split it; ``load_seconds`` is the model load
  before it, not included);
* ``peak_rss_mb_self`` / ``peak_rss_mb_children``: ``getrusage`` ``ru_maxrss`` of this process
  and of its waited-for children, in MiB (the process peak includes the model load);
* ``checkpoint_mb``: the size of every file in ``--out``, in MB (10**6 bytes);
* the resolved settings (GPTQModel fills in defaults: ``act_group_aware`` is on for GPTQ unless
  ``desc_act`` is) and the saved ``quantize_config.json``.

The first quantization on a machine JIT-builds GPTQModel's ``pack_block_cpu`` C++ extension (CPU
only, ~20 s here; cached in ``~/.cache/gptqmodel/torch_extensions``, or
``$GPTQMODEL_TORCH_EXTENSIONS_DIR``), inside the timed ``quantize()``: warm it with one small run
before timing; ``pack_ext_cached_before`` in the JSON says whether it was already built.

Everything runs on CPU, and the post-quantization kernel is GPTQModel's pure-torch one
(``BACKEND.TORCH``): the default CPU kernel of 7.6 (``TorchAtenLinear``) fails on 576-wide layers
(``_weight_int4pack_mm_cpu: expect K to be divisible by qGroupSize``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def pack_ext_cached() -> bool:
    """Whether GPTQModel's JIT-built pack_block_cpu extension is already in its cache."""
    root = os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache/gptqmodel/torch_extensions"
    return any((base / "pack_block_cpu").rglob("*.so"))


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="HF model directory")
    parser.add_argument("--calibration", type=Path, required=True,
                        help="safetensors file with an int64 input_ids tensor [N, L]")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False)
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    parser.add_argument("--damp", type=float, default=0.01, help="damp_percent (default 0.01)")
    parser.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=None,
                        help="GPTQModel's group-aware activation reordering (GAR); default: "
                             "GPTQModel's own (on for GPTQ when desc_act is off)")
    parser.add_argument("--dtype", default="auto",
                        help="model dtype while quantizing: auto (GPTQModel's choice), bfloat16, "
                             "float16 or float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--limit-samples", type=int, default=None,
                        help="use only the first N calibration rows (warm-up runs)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} exists and is not empty")
    started = time.perf_counter()
    ext_cached = pack_ext_cached()
    # GPTQModel 7.6 sizes its CPU worker pool as (cpu_count + 1) // 2, i.e. 1 on a 2-core machine,
    # then asks for a 2-worker "model_loader:cpu" sub-pool of it and raises
    # "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1".
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))

    import gptqmodel
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from safetensors.torch import load_file

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = load_file(str(args.calibration))["input_ids"]
    if ids.dtype != torch.int64 or ids.ndim != 2:
        raise SystemExit(f"{args.calibration}: input_ids must be int64 [N, L], "
                         f"got {ids.dtype} {tuple(ids.shape)}")
    if args.limit_samples is not None:
        ids = ids[: args.limit_samples]
    calibration = [{"input_ids": row.clone(), "attention_mask": torch.ones_like(row)}
                   for row in ids]

    qkwargs = dict(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act,
                   sym=args.sym, damp_percent=args.damp)
    if args.act_group_aware is not None:
        qkwargs["act_group_aware"] = args.act_group_aware
    qcfg = QuantizeConfig(**qkwargs)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)

    t_load = time.perf_counter()
    model = GPTQModel.load(str(args.model), quantize_config=qcfg, device="cpu", dtype=dtype)
    load_seconds = time.perf_counter() - t_load
    model_dtype = str(next(model.model.parameters()).dtype).removeprefix("torch.")

    t0 = time.perf_counter()
    model.quantize(calibration, batch_size=1, calibration_sort=None,
                   calibration_data_min_length=0, backend=BACKEND.TORCH)
    t1 = time.perf_counter()
    model.save(str(args.out))
    t2 = time.perf_counter()

    saved_qcfg_file = args.out / "quantize_config.json"
    saved_qcfg = json.loads(saved_qcfg_file.read_text()) if saved_qcfg_file.is_file() else None
    result = {
        "tool": "gptqmodel",
        "gptqmodel_version": gptqmodel.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": str(args.model),
        "calibration": str(args.calibration),
        "calibration_shape": list(ids.shape),
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": args.sym,
        "desc_act": qcfg.desc_act,
        "act_group_aware": getattr(qcfg, "act_group_aware", None),
        "damp_percent": qcfg.damp_percent,
        "model_dtype": model_dtype,
        "load_seconds": round(load_seconds, 2),
        "quantize_only_seconds": round(t1 - t0, 2),
        "save_seconds": round(t2 - t1, 2),
        "quantize_seconds": round(t2 - t0, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb_self": round(peak_rss_mb(resource.RUSAGE_SELF), 1),
        "peak_rss_mb_children": round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1),
        "checkpoint_mb": round(dir_mb(args.out), 2),
        "out": str(args.out),
        "saved_quantize_config": saved_qcfg,
        "gptqmodel_cpu_workers": os.environ["GPTQMODEL_CPU_WORKERS"],
        "pack_ext_cached_before": ext_cached,
        "nice": os.nice(0),
    }
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
