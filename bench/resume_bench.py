"""Block-level resume and the flow's overhead on the demo model, side by side in one run.

Four commands, each a subprocess with a fresh ``QUANTMILL_HOME`` (the demo model linked in;
the flow runs share one Prefect home, whose database is migrated once before the clocks start,
as on a machine that runs jobs):

1. ``bare``: the same recipe's plan + quantize + export + evaluate (base and quantized) in one
   process through the plugins alone: no Prefect, no registry, no storage;
2. ``uninterrupted``: ``quantmill run RECIPE``;
3. ``killed``: the same with ``QUANTMILL_FAILPOINT=kill-after-block:N`` (SIGKILL after block N,
   default half the blocks);
4. ``rerun``: ``quantmill run RECIPE`` again in the killed run's home.

Targets (issue 15): rerun at most 0.55x the uninterrupted job's wall time with the same
checkpoint sha256; the flow at most 10 % more wall time than ``bare``.

    .venv/bin/python bench/resume_bench.py                     # demo GPTQ recipe, ~10 minutes
    .venv/bin/python bench/resume_bench.py --recipe examples/X.yaml --kill-after 9

Writes bench/results/resume.json and bench/results/resume.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEMO_MODELS = Path(os.environ.get("QUANTMILL_HOME", Path.home() / ".quantmill")) / "models"


def machine() -> dict[str, Any]:
    import torch
    from machine import cpu_facts  # bench/machine.py, beside this script

    return {**cpu_facts(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads()}


def fresh_home(root: Path, name: str) -> Path:
    home = root / name
    home.mkdir(parents=True)
    (home / "models").symlink_to(DEMO_MODELS)
    return home


def timed(args: list[str], home: Path, failpoint: str | None = None,
          prefect_home: Path | None = None) -> dict[str, Any]:
    """Run ``args`` in its own process group with ``home``; wall seconds and exit status."""
    env = {**os.environ, "QUANTMILL_HOME": str(home)}
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    env.pop("QUANTMILL_DATABASE_URL", None)
    env.pop("QUANTMILL_FAILPOINT", None)
    if failpoint:
        env["QUANTMILL_FAILPOINT"] = failpoint
    with (home / "stdout.txt").open("w") as out, (home / "stderr.txt").open("w") as err:
        started = time.perf_counter()
        child = subprocess.Popen(args, env=env, stdout=out, stderr=err, start_new_session=True)
        code = child.wait()
        seconds = time.perf_counter() - started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # a killed run's Prefect server
    return {"seconds": round(seconds, 2), "exit": code}


def checkpoint(home: Path) -> dict[str, Any]:
    os.environ["QUANTMILL_HOME"] = str(home)
    from quantmill.registry import Registry

    with Registry.open() as reg:
        (found,) = reg.list_artifacts(kind="checkpoint")
        (run,) = reg.list_runs(kind="quantization", status="succeeded")
    return {"sha256": found.sha256, "resumed_at_block": run.details["quantizer"].get(
        "resumed_at_block"), "quantize_seconds": run.details.get("quantize_seconds")}


def bare(recipe: Path, out_dir: Path) -> None:
    """Plan, quantize, export and evaluate through the plugins alone (one process)."""
    from quantmill.flows.recipe import load_job
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager

    job = load_job(recipe, Catalog(get_plugin_manager()))
    device = job.device()
    base = job.model_source.load(job.model_path, device)
    calibration = job.calibration.build(base.tokenizer) if job.calibration else None
    for evaluator in job.evaluators:
        evaluator.evaluate(base, None)
    model = job.model_source.load_deferred(job.model_path, device) \
        if job.quantizer.accepts_deferred_weights else base
    plan = job.allocator.plan(model.model, job.quantizable(model.model),
                              job.quantizer.default_spec(), calibration)
    result = job.quantizer.quantize(model.model, plan, calibration)
    job.exporter.export(model, result, out_dir)
    reader = Catalog(get_plugin_manager()).model_sources.get(job.exporter.format_name)()
    quantized = reader.load(out_dir, device)
    for evaluator in job.evaluators:
        evaluator.evaluate(quantized, out_dir)


def blocks_of(recipe: Path) -> int:
    import yaml
    from transformers import AutoConfig  # noqa: F401 - the GGUF reader needs transformers

    from quantmill.flows.recipe import expand_path

    text = yaml.safe_load(recipe.read_text())
    path = Path(expand_path(text["model"]["path"], recipe.parent))
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        for key, field in reader.fields.items():
            if key.endswith(".block_count"):
                return int(field.parts[field.data[0]][0])
    return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])


def markdown(report: dict[str, Any]) -> str:
    r, m = report["runs"], report["machine"]
    lines = [f"# Resume benchmark ({report['when']})", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, ISA {', '.join(m['isa'])}; torch "
             f"{m['torch']} (CPU capability {m['torch_cpu_capability']}, "
             f"{m['torch_threads']} threads); Python {m['python']}.", "",
             f"Recipe `{report['recipe']}`, {report['blocks']} decoder blocks; killed after "
             f"block {report['kill_after']}. One run of each, in this order, same machine.", "",
             "| command | wall s | exit | checkpoint sha256 | resumed at block |",
             "|---|---|---|---|---|"]
    for name in ("bare", "uninterrupted", "killed", "rerun"):
        run = r[name]
        lines.append(f"| {name} | {run['seconds']:.1f} | {run['exit']} | "
                     f"{run.get('sha256', '-')[:16]} | {run.get('resumed_at_block', '-')} |")
    lines += ["",
              f"- rerun / uninterrupted: **{report['rerun_ratio']:.2f}x** (target <= 0.55x); "
              f"same checkpoint: **{report['identical']}**",
              f"- killed + rerun / uninterrupted: {report['killed_plus_rerun_ratio']:.2f}x",
              f"- flow / bare: **{report['flow_overhead']:.2f}x** (target <= 1.10x)",
              f"- the flow runs share one Prefect home, migrated beforehand in "
              f"{report['prefect_migration']['seconds']:.1f} s (exit "
              f"{report['prefect_migration']['exit']}): what a brand-new home adds once", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path,
                        default=REPO / "examples" / "smollm2-gptq-w4g128.yaml")
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantmill-resume-bench"))
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)  # internal: one bare run
    args = parser.parse_args()
    recipe = args.recipe.resolve()
    if args.bare:
        bare(recipe, args.bare)
        return
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    blocks = blocks_of(recipe)
    kill_after = args.kill_after if args.kill_after is not None else blocks // 2 - 1
    cli = [sys.executable, "-m", "quantmill.flows.cli", "run", str(recipe)]
    runs: dict[str, dict[str, Any]] = {}
    # One Prefect home for the flow runs, migrated before any clock starts: a machine that
    # runs jobs has one (a brand-new home first migrates Prefect's database: timed apart)
    prefect_home = args.work / "prefect"
    migrate = timed([str(Path(sys.executable).with_name("prefect")), "server", "database",
                     "upgrade", "-y"], fresh_home(args.work, "prefect-migration"),
                    prefect_home=prefect_home)
    home = fresh_home(args.work, "bare")
    runs["bare"] = timed([sys.executable, __file__, "--recipe", str(recipe),
                          "--bare", str(home / "checkpoint")], home)
    home = fresh_home(args.work, "uninterrupted")
    runs["uninterrupted"] = timed(cli, home, prefect_home=prefect_home)
    runs["uninterrupted"].update(checkpoint(home))
    home = fresh_home(args.work, "killed")
    runs["killed"] = timed(cli, home, failpoint=f"kill-after-block:{kill_after}",
                           prefect_home=prefect_home)
    runs["rerun"] = timed(cli, home, prefect_home=prefect_home)
    runs["rerun"].update(checkpoint(home))
    whole = runs["uninterrupted"]["seconds"]
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/resume_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "recipe": str(recipe.relative_to(REPO)), "blocks": blocks,
        "kill_after": kill_after, "runs": runs, "prefect_migration": migrate,
        "rerun_ratio": runs["rerun"]["seconds"] / whole,
        "killed_plus_rerun_ratio": (runs["killed"]["seconds"] + runs["rerun"]["seconds"]) / whole,
        "flow_overhead": whole / runs["bare"]["seconds"],
        "identical": runs["rerun"]["sha256"] == runs["uninterrupted"]["sha256"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resume.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "resume.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
