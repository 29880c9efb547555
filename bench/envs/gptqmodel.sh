#!/usr/bin/env bash
# Build (idempotently) the external GPTQModel comparison venv, OUTSIDE the repo:
#   ~/.cache/quantmill-bench/gptqmodel-venv   (override: QUANTMILL_BENCH_CACHE=DIR)
#
# Usage: bash bench/envs/gptqmodel.sh        prints the venv's python path on the last line
#        FORCE=1 bash bench/envs/gptqmodel.sh rebuilds from scratch
#
# Recorded (2026-11-22, 2 busy cores, Python 3.11.7): see the RESULTS block below.
# RESULTS-BEGIN
#   (filled in after the first successful build)
# RESULTS-END
set -euo pipefail

CACHE="${QUANTMILL_BENCH_CACHE:-$HOME/.cache/quantmill-bench}"
VENV="$CACHE/gptqmodel-venv"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.quantmill-installed-v1"

# Nothing here may compile CUDA code: gptqmodel 7.6 builds no extension at install time (its
# setup.py is pure Python; kernels are JIT-built on first use, and the torch kernel needs none),
# but keep the classic switches off for any dependency that still reads them.
export BUILD_CUDA_EXT=0 CUDA_VISIBLE_DEVICES="" TORCH_CUDA_ARCH_LIST="" PIP_NO_INPUT=1

if [[ "${FORCE:-0}" == 1 ]]; then rm -rf "$VENV"; fi

if [[ ! -f "$STAMP" ]]; then
    start=$(date +%s)
    mkdir -p "$CACHE"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install -q)
    "${PIP[@]}" --upgrade "pip>=24"
    # torch first: the CPU wheel on local disk. Every later install must keep it (checked below).
    "${PIP[@]}" "torch==2.13.0"
    # gptqmodel 7.6.0 with its declared dependencies (torch>=2.8 is already satisfied) plus
    # optimum, which transformers 5's GPTQ quantizer needs to route a GPTQ checkpoint to
    # gptqmodel's kernels in from_pretrained.
    "${PIP[@]}" "torch==2.13.0" "gptqmodel==7.6.0" "optimum>=1.24"
    "$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
assert not torch.version.cuda, f"a CUDA torch build slipped in: {torch.version.cuda}"
PY
    touch "$STAMP"
    echo "gptqmodel venv built in $(( $(date +%s) - start )) s" >&2
fi

"$VENV/bin/python" - <<'PY' >&2
from importlib.metadata import version
for name in ("torch", "gptqmodel", "transformers", "optimum", "accelerate", "safetensors",
             "numpy", "torchao"):
    try:
        print(f"{name}=={version(name)}")
    except Exception as exc:  # a missing optional package is reported, not fatal
        print(f"{name}: not installed ({exc.__class__.__name__})")
PY
echo "$VENV/bin/python"
