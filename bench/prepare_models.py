"""Prepare the inputs that external comparison runs (GPTQModel, ...) need, outside the repo.

* The demo GGUF (``$QUANTMILL_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf``; ``quantmill models
  fetch-demo`` downloads it) becomes a plain Hugging Face directory (fp32 safetensors, config,
  generation config, tokenizer) at ``~/.cache/quantmill-bench/smollm2-135m-hf``: other tools
  cannot read GGUF, and this way every tool starts from exactly the weights quantmill
  quantizes (quantmill's own ``GGUFSource`` does the dequantization).
* With ``--calibration FILE``, a calibration set in quantmill's format (a safetensors file with
  one int64 ``input_ids`` tensor [N, L]) built by quantmill's ``TextCalibrationSource``, so an
  external tool can be fed exactly the token windows quantmill calibrates on.

Both steps are idempotent: a complete output is left as it is (``--force`` rebuilds).

Usage (project venv)::

    .venv/bin/python bench/prepare_models.py                      # the HF directory only
    .venv/bin/python bench/prepare_models.py \\
        --calibration ~/.cache/quantmill-bench/calib-wikitext2-64x512-s0.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QUANTMILL_BENCH_CACHE", Path.home() / ".cache" / "quantmill-bench"))
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = CACHE / "smollm2-135m-hf"
DEFAULT_TEXT = REPO / "data" / "wikitext-2" / "valid.txt"
#: Written last: its presence means the directory is complete.
DONE_MARKER = ".quantmill-prepared.json"


def quantmill_home() -> Path:
    return Path(os.environ.get("QUANTMILL_HOME", Path.home() / ".quantmill")).expanduser()


def default_gguf() -> Path:
    return quantmill_home() / "models" / DEMO_GGUF


def is_complete(out: Path) -> bool:
    return (out / DONE_MARKER).is_file() and (out / "config.json").is_file() and any(
        out.glob("*.safetensors")
    ) and (out / "tokenizer.json").is_file()


def convert_gguf(gguf: Path, out: Path, force: bool = False) -> Path:
    """Write ``gguf`` as an fp32 Hugging Face directory at ``out`` (atomic, idempotent)."""
    import torch

    from quantmill.plugins.models.sources import GGUFSource

    if is_complete(out) and not force:
        print(f"{out}: already prepared", file=sys.stderr)
        return out
    if not gguf.is_file():
        raise SystemExit(f"{gguf} not found: run `quantmill models fetch-demo` first")
    start = time.perf_counter()
    loaded = GGUFSource().load(gguf, torch.device("cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        info = {
            "source": str(gguf),
            "source_bytes": gguf.stat().st_size,
            "dtype": str(next(model.parameters()).dtype),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / DONE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{out}: written from {gguf.name} in {info['seconds']} s", file=sys.stderr)
    return out


def build_calibration(
    model_dir: Path, text: Path, out: Path, num_samples: int, seq_len: int, seed: int,
    force: bool = False,
) -> Path:
    """quantmill's calibration set (TextCalibrationSource) as a safetensors ``input_ids`` file."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from quantmill.plugins.calibration.text import TextCalibrationSource

    if out.is_file() and not force:
        print(f"{out}: already built", file=sys.stderr)
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    source = TextCalibrationSource.from_options(
        {"path": str(text), "num_samples": num_samples, "seq_len": seq_len, "seed": seed}
    )
    calib = source.build(tokenizer)
    header = {"description": calib.description, "token_ids_sha256": calib.sha256}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    save_file({"input_ids": calib.input_ids.contiguous()}, str(tmp),
              metadata={"quantmill": json.dumps(header, sort_keys=True)})
    os.replace(tmp, out)
    print(f"{out}: {tuple(calib.input_ids.shape)} token ids, sha256 {calib.sha256[:12]}",
          file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None,
                        help=f"GGUF file (default $QUANTMILL_HOME/models/{DEMO_GGUF})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="HF directory to write")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="also write a calibration set (safetensors input_ids) here")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="calibration text")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)

    out = convert_gguf((args.gguf or default_gguf()).expanduser(), args.out.expanduser(),
                       args.force)
    if args.calibration is not None:
        build_calibration(out, args.text, args.calibration.expanduser(), args.num_samples,
                          args.seq_len, args.seed, args.force)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
