"""Run GPTQ checkpoints in GPTQModel and in transformers; save their logits.

Runs INSIDE the GPTQModel venv (``bench/envs/gptqmodel.sh``), never in quantmill's: it imports
neither quantmill nor pytest, only gptqmodel, transformers, torch and safetensors. The test
``test_gptqmodel_compat.py`` writes a spec, runs this with that venv's python and compares the
logits with quantmill's reader.

Spec (JSON)::

    {"input_ids": "ids.safetensors",          # one int64 tensor "input_ids" [batch, seq]
     "out": "DIR",                             # logits and results.json go here
     "loaders": ["gptqmodel", "gptqmodel_fp16", "transformers"],
     "cases": [{"name": "w4g32-sym", "path": "CHECKPOINT_DIR"},
               {"name": "big", "path": "DIR2", "input_ids": "other.safetensors"}, ...]}

For each case and loader it writes ``DIR/<name>.<loader>.safetensors`` (``logits``, float32)
and records in ``DIR/results.json`` either ``{"ok": true, "dtype", "kernels", "seconds"}`` or
``{"ok": false, "error"}``: one failing load does not stop the others.

GPTQModel runs at its CPU default dtype (bfloat16) and again in float16; transformers in the
checkpoint's float16. All are forced onto GPTQModel's pure-torch GPTQ kernel (``BACKEND.TORCH``
/ ``backend="torch"``): the default CPU choice in 7.6 (``TorchAtenLinear``) fails on 576-wide
layers such as SmolLM2's (``_weight_int4pack_mm_cpu: expect K to be divisible by qGroupSize``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def kernel_counts(model: torch.nn.Module) -> dict[str, int]:
    """How many modules of each GPTQModel quantized-linear class the model holds."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    counts = Counter(type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear))
    return dict(sorted(counts.items()))


def load_gptqmodel(path: str, dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=dtype).model


def load_transformers(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPTQConfig

    qcfg = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    # Only the loading attributes (backend, max_input_length) of this config are used; the rest
    # comes from the checkpoint's config.json. Without it transformers picks TorchAtenLinear.
    override = GPTQConfig(bits=qcfg["bits"], backend="torch")
    return AutoModelForCausalLM.from_pretrained(
        path, device_map="cpu", quantization_config=override
    )


LOADERS = {
    "gptqmodel": load_gptqmodel,  # its CPU default dtype: bfloat16
    "gptqmodel_fp16": lambda path: load_gptqmodel(path, torch.float16),
    "transformers": load_transformers,  # the checkpoint's dtype: float16
}


def run(spec: dict) -> dict:
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict]] = {}
    for case in spec["cases"]:
        ids = load_file(case.get("input_ids", spec.get("input_ids")))["input_ids"].to(torch.int64)
        for loader in spec.get("loaders", list(LOADERS)):
            start = time.perf_counter()
            try:
                model = LOADERS[loader](case["path"]).eval()
                loaded_s = time.perf_counter() - start
                with torch.inference_mode():
                    logits = model(input_ids=ids).logits
                save_file({"logits": logits.float().contiguous()},
                          str(out / f"{case['name']}.{loader}.safetensors"))
                record = {
                    "ok": True,
                    "dtype": str(logits.dtype).removeprefix("torch."),
                    "kernels": kernel_counts(model),
                    "load_seconds": round(loaded_s, 2),
                    "seconds": round(time.perf_counter() - start, 2),
                }
                del model, logits
            except Exception:  # reported per case; the test decides what a failure means
                record = {"ok": False, "error": traceback.format_exc(limit=20)}
            gc.collect()
            results.setdefault(case["name"], {})[loader] = record
            print(f"[gptqmodel_logits] {case['name']} / {loader}: "
                  f"{'ok' if record['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args(argv)
    run(json.loads(args.spec.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
