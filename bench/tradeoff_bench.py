"""Trade-off benchmark (issue #4, part 4): RTN, GPTQ and clustering at 2, 3 and 4 bits and mixed
precision at 2.5-4.5 average bits on SmolLM2-135M, perplexity against size.

It runs the batch ``examples/batches/tradeoff-smollm2.yaml`` through the same code as
``quantmill tradeoff`` (the ``tradeoff`` flow: every point an audited ``compress`` run in the
registry), with the protocol of the GPTQ benchmark (bench/results/gptq.md): calibration 64 x 512
tokens of the WikiText-2 valid split, seed 0; perplexity over the first 40 non-overlapping
512-token windows of the test split; the demo GGUF dequantized as the reference.

    .venv/bin/python bench/tradeoff_bench.py            # 14 points, over an hour on 2 cores
    .venv/bin/python bench/tradeoff_bench.py --only rtn-w4 rtn-w3 --windows 4 --out /tmp/t

Writes bench/results/tradeoff.json, .md and .png (or into ``--out``). Points already in the
registry with the same recipe are not run again (``--rerun`` forces them), so an interrupted
run resumes where it stopped. ``--windows`` and ``--calibration-samples`` change the recipes
(for quick checks only: the results are then not comparable with the GPTQ benchmark's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BATCH = REPO / "examples" / "batches" / "tradeoff-smollm2.yaml"
RESULTS = REPO / "bench" / "results"


def _say(line: str) -> None:
    # not print(): inside a flow with log_prints, Prefect turns print() into log records
    sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
    sys.stdout.flush()


class PrintSink:
    """Progress as log lines (a benchmark's output goes to files and terminals alike)."""

    def __init__(self) -> None:
        self.started: dict[int, tuple[str, float]] = {}

    def start(self, description: str, total: int | None) -> object:
        handle = len(self.started)
        self.started[handle] = (description, time.perf_counter())
        _say(f"{description} ...")
        return handle

    def advance(self, handle: object, amount: float) -> None:
        pass

    def finish(self, handle: object) -> None:
        description, started = self.started[handle]  # type: ignore[index]
        _say(f"{description}: done in {time.perf_counter() - started:.1f} s")


def batch_text(path: Path, windows: int | None, samples: int | None) -> str:
    """The batch file's text, with the quick-check overrides applied (if any)."""
    text = path.read_text()
    if windows is None and samples is None:
        return text
    data = yaml.safe_load(text)
    if windows is not None:
        for section in data["base"].get("evaluation", []):
            if section.get("evaluator") == "perplexity":
                section["max_windows"] = windows
    if samples is not None:
        data["base"]["calibration"]["num_samples"] = samples
    return yaml.safe_dump(data, sort_keys=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=Path, default=BATCH)
    parser.add_argument("--only", nargs="*", help="point labels (default: every point)")
    parser.add_argument("--windows", type=int, help="perplexity windows (default: the batch's)")
    parser.add_argument("--calibration-samples", type=int, help="(default: the batch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rerun", action="store_true", help="run registered points again")
    parser.add_argument("--database-url", default=os.environ.get("QUANTMILL_DATABASE_URL"))
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the report's context (e.g. how its runs were made)")
    args = parser.parse_args()

    import torch

    from quantmill.flows.tradeoff import run_batch
    from quantmill.plugins.progress import use_sink

    text = batch_text(args.batch, args.windows, args.calibration_samples)
    shown = [a for i, a in enumerate(sys.argv[1:])  # notes go in the context, not here
             if a != "--note" and not a.startswith("--note=") and sys.argv[i] != "--note"]
    command = " ".join(["bench/tradeoff_bench.py", *shown])
    machine = (f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__} with "
               f"{torch.get_num_threads()} threads, one point at a time.")
    context = [machine]
    if args.windows is not None or args.calibration_samples is not None:
        context.append(f"Quick check, NOT the protocol above: perplexity windows "
                       f"{args.windows or 'as in the batch'}, calibration samples "
                       f"{args.calibration_samples or 'as in the batch'}.")
    context += args.note
    with use_sink(PrintSink()):
        report, paths = run_batch(text, args.batch, args.out, args.database_url,
                                  only=args.only or None, rerun=args.rerun, command=command,
                                  context=context)
    print((args.out / "tradeoff.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
