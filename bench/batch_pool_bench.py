"""A trade-off batch run serially in one process and on 2 workers (issue #16), side by side.

The batch is ``examples/batches/tradeoff-smollm2.yaml`` reduced to ``--points`` points (default:
RTN and GPTQ at 2, 3 and 4 bits), on the demo model. Each contender gets a fresh
``QUANTMILL_HOME`` (its own registry and storage, the demo model linked in), so neither reuses
the other's calibration set, base-model measurement or checkpoints:

- serial: ``quantmill tradeoff BATCH`` (every point a subflow in one process, Prefect's
  temporary server);
- pool: ``prefect server start`` plus two ``quantmill worker --pool bench --limit 1
  --heavy-slots 2`` (so both may compute at once) and ``quantmill tradeoff BATCH --pool bench``.

    .venv/bin/python bench/batch_pool_bench.py
    .venv/bin/python bench/batch_pool_bench.py --points rtn-w4 gptq-w4 --out /tmp/batch

Writes ``--out``.json and ``--out``.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BATCH = REPO / "examples" / "batches" / "tradeoff-smollm2.yaml"
DEMO_MODELS = Path(os.environ.get("QUANTMILL_HOME", Path.home() / ".quantmill")) / "models"
QM = str(Path(sys.executable).parent / "quantmill")
POOL = "bench"


def reduced_batch(points: list[str], out: Path) -> Path:
    """The example batch with the methods and bits of ``points`` (method-wBITS labels; every
    combination of them is a point), its relative paths made absolute."""
    data = yaml.safe_load(BATCH.read_text())
    data["name"] = "smollm2-tradeoff-reduced"
    data["matrix"]["methods"] = {k: v for k, v in data["matrix"]["methods"].items()
                                 if k in {p.split("-")[0] for p in points}}
    data["matrix"].pop("mixed_precision", None)
    data["matrix"]["bits"] = sorted({int(p.split("-w")[1]) for p in points if "-w" in p})
    data.pop("points", None)
    for section in ("calibration",):
        data["base"][section]["path"] = str((BATCH.parent / data["base"][section]["path"])
                                            .resolve())
    for evaluator in data["base"]["evaluation"]:
        if "dataset" in evaluator:
            evaluator["dataset"] = str((BATCH.parent / evaluator["dataset"]).resolve())
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def fresh_home(root: Path, name: str) -> Path:
    home = root / name
    home.mkdir(parents=True)
    (home / "models").symlink_to(DEMO_MODELS)
    return home


def run_tradeoff(batch: Path, home: Path, env: dict[str, str], extra: list[str]
                 ) -> dict[str, Any]:
    out = home / "report"
    args = [QM, "tradeoff", str(batch), "--out", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(args, env={**os.environ, "QUANTMILL_HOME": str(home), **env},
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr[-3000:]}")
    report = json.loads((out / "tradeoff.json").read_text())
    points = {p["label"]: {"status": p["status"], "perplexity": p["perplexity"],
                           "wall_s": p["wall_s"], "flow_s": p["flow_s"]}
              for p in report["points"]}
    return {"seconds": round(seconds, 1), "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+",
                        default=["rtn-w2", "rtn-w3", "rtn-w4", "gptq-w2", "gptq-w3", "gptq-w4"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "batch-pool")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    import importlib.util

    import torch
    from machine import cpu_facts, write_results

    spec = importlib.util.spec_from_file_location("prefect_service_support", REPO / "tests" /
                                                  "support" / "prefect_service.py")
    service = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(service)

    root = Path(tempfile.mkdtemp(prefix="quantmill-batch-bench-"))
    batch = reduced_batch(args.points, root / "batch.yaml")
    roots = f"{DEMO_MODELS},{(REPO / 'data').resolve()}"

    serial_home = fresh_home(root, "serial")
    serial = run_tradeoff(batch, serial_home, {"PREFECT_HOME": str(root / "prefect-serial")},
                          [])

    server = service.PrefectServer(root / "prefect-server")
    server.start()
    pool_home = fresh_home(root, "pool")
    env = {**server.env(), "QUANTMILL_HOME": str(pool_home), "QUANTMILL_INPUT_ROOTS": roots}
    workers = [service.Worker(root / f"worker-{i}.log", POOL, env,
                              ("--limit", "1", "--heavy-slots", "2", "--name",
                               f"bench-{i}")).start() for i in range(2)]
    try:
        for worker in workers:
            worker.wait_started()
        pooled = run_tradeoff(batch, pool_home, server.env(), ["--pool", POOL])
    finally:
        for worker in workers:
            worker.stop()
        server.stop()

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/batch_pool_bench.py " + " ".join(sys.argv[1:]),
        "machine": {**cpu_facts(), "torch": torch.__version__,
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch_threads": torch.get_num_threads()},
        "points": args.points, "serial": serial, "pool": pooled,
        "ratio_serial_over_pool": round(serial["seconds"] / pooled["seconds"], 3),
    }
    write_results(args.out, report, markdown(report))


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"# Trade-off batch: serial vs 2 workers ({r['date']})", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, ISA {', '.join(m['isa'])}; torch "
             f"{m['torch']} (CPU capability {m['torch_cpu_capability']}, {m['torch_threads']} "
             f"threads per process); Python {m['python']}.", "",
             f"{len(r['points'])} points of `examples/batches/tradeoff-smollm2.yaml`; one run of "
             "each contender, serial first, each with a fresh registry and storage.", "",
             "| contender | wall s |", "|---|---|",
             f"| serial, one process (`quantmill tradeoff`) | {r['serial']['seconds']} |",
             f"| 2 workers, limit 1 each (`quantmill tradeoff --pool`) | "
             f"{r['pool']['seconds']} |", "",
             f"Serial / pool: **{r['ratio_serial_over_pool']}x**.", "",
             "| point | serial run s | serial perplexity | pool run s | pool perplexity |",
             "|---|---|---|---|---|"]
    for label in r["points"]:
        s, p = r["serial"]["points"].get(label, {}), r["pool"]["points"].get(label, {})
        lines.append(f"| {label} | {s.get('wall_s')} | {s.get('perplexity')} | "
                     f"{p.get('wall_s')} | {p.get('perplexity')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
