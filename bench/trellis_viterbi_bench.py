"""Trellis Viterbi on the CPU: the compiled kernel (``viterbi_cpu.py``, numba) against the eager
torch path, side by side in one process.

Workload: the tail-biting encodes the trellis quantizer runs for one column block of SmolLM2-135M
layers (``tile_width`` 8, T = 64: one sequence per 8 rows), on Gaussian targets, for the state
widths the product uses (L = 10, 12, 14) and k = 2, 3, 4. Each (shape, L, k) runs both backends
in turn, ``--reps`` times (the order alternating), after one untimed warm-up each (the kernel's
compilation is cached on disk). Reported: the median seconds per encode, ns per state update
(two Viterbi passes of T * 2^L updates per sequence) and the median of the per-repetition
torch/kernel ratios; also whether both found equally good paths.

    .venv/bin/python bench/trellis_viterbi_bench.py          # ~2 minutes on 2 cores

Writes bench/results/trellis-viterbi-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from quantmill.plugins.quantizers.trellis.code import encode, make_trellis, reconstruct

REPO = Path(__file__).resolve().parents[1]

#: (name, stacked rows of one stage) on SmolLM2-135M; a column block has rows / 8 sequences
SHAPES = [("q/k/v (960 rows)", 960), ("gate/up (3072 rows)", 3072)]
STATES = [(10, 2), (10, 3), (10, 4), (12, 2), (12, 3), (12, 4), (14, 3)]
T = 64


def timed_encode(tr, x: torch.Tensor, backend: str) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = encode(tr, x, backend=backend)
    return time.perf_counter() - t0, out


def run(reps: int) -> list[dict]:
    rows = []
    for shape, stacked in SHAPES:
        seqs = stacked // 8
        for L, k in STATES:
            tr = make_trellis(L, k, seed=0)
            x = torch.randn(seqs, T, generator=torch.Generator().manual_seed(L * 16 + k))
            encode(tr, x, backend="cpu")  # warm-up (compilation cached on disk after the first)
            encode(tr, x[:8], backend="torch")
            times: dict[str, list[float]] = {"cpu": [], "torch": []}
            ratios = []
            paths = {}
            for rep in range(reps):
                order = ["cpu", "torch"] if rep % 2 == 0 else ["torch", "cpu"]
                got = {}
                for backend in order:
                    seconds, paths[backend] = timed_encode(tr, x, backend)
                    times[backend].append(seconds)
                    got[backend] = seconds
                ratios.append(got["torch"] / got["cpu"])
            updates = 2 * seqs * T * (1 << L)
            err = {b: float(((x - reconstruct(tr, p)) ** 2).mean()) for b, p in paths.items()}
            row = {
                "shape": shape, "sequences": seqs, "L": L, "k": k, "state_updates": updates,
                "kernel_s": statistics.median(times["cpu"]),
                "torch_s": statistics.median(times["torch"]),
                "speedup_median_of_ratios": statistics.median(ratios),
                "kernel_mse": err["cpu"], "torch_mse": err["torch"],
                "identical_paths": float((paths["cpu"] == paths["torch"]).all(1).float().mean()),
            }
            row["kernel_ns_per_update"] = 1e9 * row["kernel_s"] / updates
            row["torch_ns_per_update"] = 1e9 * row["torch_s"] / updates
            print(f"{shape:22s} L={L:2d} k={k}: kernel {row['kernel_s']:.3f} s "
                  f"({row['kernel_ns_per_update']:.2f} ns), torch {row['torch_s']:.3f} s "
                  f"({row['torch_ns_per_update']:.2f} ns), x{row['speedup_median_of_ratios']:.1f}",
                  flush=True)
            rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Trellis Viterbi on the CPU: compiled kernel vs eager torch",
        "",
        f"Command: `{result['command']}` ({result['started']})",
        "",
        f"Machine: {result['machine']}; torch {result['torch']}, numba {result['numba']}, "
        f"{result['threads']} threads; median of {result['reps']} repetitions, backends "
        "alternating.",
        "",
        "One tail-biting encode (two Viterbi passes) of a SmolLM2-135M column block: "
        "rows / 8 sequences of 64 Gaussian targets.",
        "",
        "| stage | seqs | L | k | kernel s | ns/update | torch s | ns/update | speedup "
        "| MSE kernel / torch | identical paths |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['sequences']} | {r['L']} | {r['k']} | {r['kernel_s']:.4f} "
            f"| {r['kernel_ns_per_update']:.2f} | {r['torch_s']:.4f} "
            f"| {r['torch_ns_per_update']:.2f} | {r['speedup_median_of_ratios']:.1f}x "
            f"| {r['kernel_mse']:.5f} / {r['torch_mse']:.5f} | {r['identical_paths']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/trellis-viterbi-cpu")
    args = parser.parse_args()
    import numba

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = {"command": "bench/trellis_viterbi_bench.py" + (
                  f" --reps {args.reps}" if args.reps != 5 else ""),
              "started": started, "machine": f"{platform.machine()}, "
              f"{torch.get_num_threads()} CPU threads", "torch": torch.__version__,
              "numba": numba.__version__, "threads": torch.get_num_threads(),
              "reps": args.reps, "rows": run(args.reps)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
