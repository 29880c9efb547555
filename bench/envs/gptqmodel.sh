#!/usr/bin/env bash
# Build (idempotently) the external GPTQModel comparison venv, OUTSIDE the repo:
#   ~/.cache/quantmill-bench/gptqmodel-venv      (QUANTMILL_BENCH_CACHE=DIR moves it)
#
#   bash bench/envs/gptqmodel.sh          versions on stderr, the venv's python on the last line
#   FORCE=1 bash bench/envs/gptqmodel.sh  rebuild from scratch
#
# What worked (2026-11-22, Python 3.11.7, 2 busy cores; built in 68 s, 1.6 GB on disk):
#   torch==2.13.0+cpu (the CPU wheel on local disk, installed first and asserted unchanged after),
#   GPTQModel==7.6.0 (sdist; its setup.py is pure Python and compiles nothing at install time),
#   transformers==5.23.0, optimum==2.3.0, accelerate==1.15.0, safetensors==0.8.0, numpy==2.2.6,
#   torchao==0.18.0 (its CUDA .so files fail to load on import: harmless warnings on CPU),
#   PyPcre 0.6.4, Device-SMI 0.5.7, TokeNicer 0.0.14, LogBar 0.4.15, Defuser 0.0.28 (all wheels).
# GPTQModel's declared requirement is torch>=2.8, so its dependencies do not pull another torch;
# no --no-deps install was needed. optimum is not a GPTQModel requirement but transformers 5's
# GPTQ quantizer refuses to load a GPTQ checkpoint without it ("Loading a GPTQ quantized model
# requires optimum"); with it, from_pretrained routes GPTQ layers to GPTQModel's kernels.
# Kernels on CPU: pass backend=BACKEND.TORCH (GPTQModel.load) or
# quantization_config=GPTQConfig(bits=..., backend="torch") (from_pretrained). The default CPU
# kernel, TorchAtenLinear, fails on SmolLM2's 576-wide layers with g128:
#   RuntimeError: _weight_int4pack_mm_cpu: expect K to be divisible by qGroupSize, got K:576, ...
# Quantizing on a 2-core machine also needs GPTQMODEL_CPU_WORKERS=2 (bench/gptqmodel_runner.py
# sets it): 7.6 otherwise makes a 1-worker CPU pool and fails asking it for a 2-worker sub-pool.
set -euo pipefail

CACHE="${QUANTMILL_BENCH_CACHE:-$HOME/.cache/quantmill-bench}"
VENV="$CACHE/gptqmodel-venv"
PYTHON="${PYTHON:-python3}"
# Bump when the package list below changes: an older venv is then rebuilt.
STAMP="$VENV/.quantmill-installed-v2"

# Nothing here may compile CUDA code. GPTQModel 7.6 builds no extension at install time (kernels
# are JIT-built on first use, and the torch kernel needs none); keep the classic switches off for
# any dependency that still reads them.
export BUILD_CUDA_EXT=0 CUDA_VISIBLE_DEVICES="" TORCH_CUDA_ARCH_LIST="" PIP_NO_INPUT=1

pip_install() {
    # pip.conf names local index folders that lack most packages: drop that noise, keep errors.
    "$VENV/bin/python" -m pip install -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
}

if [[ "${FORCE:-0}" == 1 ]]; then rm -rf "$VENV"; fi

if [[ ! -f "$STAMP" ]]; then
    start=$(date +%s)
    mkdir -p "$CACHE"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    pip_install --upgrade "pip>=24"
    # torch first: the CPU wheel on local disk. Any other spec may pull a multi-GB CUDA build.
    pip_install "torch==2.13.0"
    # Repeating the torch pin keeps the resolver from ever replacing it.
    pip_install "torch==2.13.0" "gptqmodel==7.6.0" "transformers==5.23.0" "optimum==2.3.0"
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
    except Exception as exc:  # reported, not fatal
        print(f"{name}: not installed ({exc.__class__.__name__})")
PY
echo "$VENV/bin/python"
