"""The ``tradeoff`` flow: run every point of a batch through ``compress``, then report perplexity
against size with the Pareto front.

Each point is an ordinary ``compress`` subflow, so it is a registered, audited run like any other
(its recipe, plugins, lineage and metrics are in the registry; all points share the batch's job
id). The report is then read back from the registry, not from the subflows' return values, so a
rerun that skips points already measured reports them exactly as a fresh run would.

* A point whose run fails is reported as failed, with its error, and the batch goes on.
* Rerunning a batch skips every point with a succeeded quantization run of the same recipe (the
  registry's ``recipe_sha256``) on the same base model (its content hash); ``rerun=True`` runs
  them again. Data files are matched by the path in the recipe, not by content.
* Wall time is the registry run's duration (plan, quantize, evaluate, publish, register; not
  the calibration set or the base-model measurement, which later points reuse). The point whose
  job first measured the base model says so (``measured_base``).
* The reference row is the base model under the same evaluators; its size is its parameters at
  16 bits (the size of an fp16 checkpoint), because its source file may itself be compressed
  (the demo GGUF is Q4_1).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, tags
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from quantmill.flows.batch import BatchPlan, PlannedPoint, plan_batch
from quantmill.flows.compress import REPORT_KEY, flow_run_scope
from quantmill.flows.fanout import InProcess, OnDask, OnPool, Outcome
from quantmill.flows.prefect_server import SERVICE_TAG
from quantmill.plugins.catalog import Catalog
from quantmill.plugins.errors import ConfigError
from quantmill.plugins.hashing import sha256_path
from quantmill.plugins.manager import get_plugin_manager
from quantmill.plugins.progress import progress_bar
from quantmill.plugins.reporting.pareto import (
    TRADEOFF_COLUMNS,
    mark_front,
    tradeoff_cells,
    tradeoff_markdown,
)
from quantmill.registry import ArtifactNotFound, Registry, Run

PAGE = 200
REFERENCE_LABEL = "base model"


# ---------------------------------------------------------------------------------------------
# Registry look-ups
# ---------------------------------------------------------------------------------------------


def _runs(reg: Registry, status: str) -> Iterator[Run]:
    """Quantization runs with ``status``, newest first, a page at a time."""
    offset = 0
    while True:
        page = reg.list_runs(kind="quantization", status=status, limit=PAGE, offset=offset)
        yield from page
        if len(page) < PAGE:
            return
        offset += PAGE


def _edge(reg: Registry, run_id: int, direction: str, role: str) -> int | None:
    return next((e.artifact_id for e in reg.run_edges(run_id)
                 if e.direction == direction and e.role == role), None)


def base_model_id(reg: Registry, model_path: Path) -> int | None:
    """The registry id of the model file's current content (None: never registered)."""
    sha, _ = sha256_path(model_path)
    try:
        return reg.get_artifact(sha).id
    except ArtifactNotFound:
        return None


def registered_runs(reg: Registry, plan: BatchPlan) -> dict[str, int]:
    """``label -> run id`` of the newest succeeded run of each point's recipe on this model."""
    model_id = base_model_id(reg, plan.model_path)
    if model_id is None:
        return {}
    wanted = {p.recipe_sha256: p.label for p in plan.points}
    found: dict[str, int] = {}
    for run in _runs(reg, "succeeded"):
        label = wanted.get(run.recipe_sha256)
        if label is not None and label not in found \
                and _edge(reg, run.id, "input", "base_model") == model_id:
            found[label] = run.id
            if len(found) == len(wanted):
                break
    return found


def _seconds(run: Run) -> float | None:
    if run.finished_at is None:
        return None
    return round((run.finished_at - run.started_at).total_seconds(), 3)


def point_row(reg: Registry, point: PlannedPoint, outcome: Outcome) -> dict[str, Any]:
    """One report row, its numbers read from the registry."""
    row: dict[str, Any] = {
        "label": point.label, "method": point.method, "bits": point.bits,
        "budget": point.budget, "status": outcome.status, "run_id": outcome.run_id,
        "recipe_name": point.recipe_name, "recipe_sha256": point.recipe_sha256,
        "error": outcome.error, "flow_s": outcome.flow_s, "metrics": {},
        "flow_run_id": outcome.flow_run_id, "attempts": outcome.attempts,
        "where": outcome.where,
        "perplexity": None, "size_mb": None, "bits_per_weight": None, "wall_s": None,
        "quantize_s": None, "reused_sensitivity": False, "checkpoint_id": None,
        "base_model_id": None,
        "measured_base": False,
    }
    if outcome.status == "failed" or outcome.run_id is None:
        return row
    run = reg.get_run(outcome.run_id)
    # a run that reproduced a registered checkpoint names it as an input
    checkpoint = _edge(reg, run.id, "output", "quantized_checkpoint") or \
        _edge(reg, run.id, "input", "reproduced_checkpoint")
    base = _edge(reg, run.id, "input", "base_model")
    recorded = reg.metrics_for_run(run.id)
    metrics = {m.name: m.value for m in recorded if m.artifact_id == checkpoint}
    row.update(
        checkpoint_id=checkpoint, base_model_id=base, metrics=metrics,
        perplexity=metrics.get("perplexity"), size_mb=metrics.get("disk_mb"),
        bits_per_weight=metrics.get("bits_per_weight"), wall_s=_seconds(run),
        quantize_s=run.details.get("quantize_seconds"),
        reused_sensitivity=bool(run.details.get("plan_details", {}).get("sensitivity_reused")),
        measured_base=bool(run.details.get("measured_base")),
        protocols={m.evaluator: m.protocol.get("config") for m in recorded
                   if m.artifact_id == checkpoint},
    )
    return row


def reference_row(reg: Registry, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The base model measured under the points' evaluator settings (newest measurement)."""
    measured = [r for r in rows if r.get("base_model_id") is not None]
    if not measured:
        return None
    base_id = measured[0]["base_model_id"]
    protocols = measured[0]["protocols"]
    metrics: dict[str, float] = {}
    for m in reg.metrics_for_artifact(base_id):  # oldest first: the newest wins
        if protocols.get(m.evaluator) == m.protocol.get("config"):
            metrics[m.name] = m.value
    params = metrics.get("param_count")
    base = reg.get_artifact(base_id)
    return {
        "label": REFERENCE_LABEL, "method": f"reference ({base.format})", "bits": None,
        "budget": None, "status": "reference", "reference": True, "base_model_id": base_id,
        "perplexity": metrics.get("perplexity"),
        "size_mb": params * 2 / 1e6 if params else None,
        "bits_per_weight": 16.0 if params else None,
        "source_disk_mb": metrics.get("disk_mb"), "source_name": base.name,
        "metrics": metrics,
    }


def build_report(plan: BatchPlan, outcomes: dict[str, Outcome], job_id: str,
                 database_url: str | None) -> dict[str, Any]:
    with Registry.open(database_url) as reg:
        rows = [point_row(reg, p, outcomes[p.label]) for p in plan.points]
        reference = reference_row(reg, rows)
        database = reg.url
    rows = mark_front(rows)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: (r["size_mb"], r["label"]))
    return {
        "batch": plan.name, "description": plan.description, "batch_file": str(plan.path),
        "job_id": job_id, "database": database,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "reference": reference, "points": rows,
        "pareto_front": [r["label"] for r in front],
        "failed": [r["label"] for r in rows if r["status"] == "failed"],
    }


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The reference (if measured) followed by the points, in batch order."""
    return ([report["reference"]] if report.get("reference") else []) + list(report["points"])


# ---------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------


@flow(name="tradeoff", flow_run_name="tradeoff-{batch_name}", log_prints=True)
def tradeoff(batch_text: str, batch_path: str, batch_name: str,
             database_url: str | None = None, only: list[str] | None = None,
             rerun: bool = False, validated: bool = False,
             environment: dict[str, Any] | None = None, pool: str | None = None,
             point_retries: int = 1, on_dask: bool = False) -> dict[str, Any]:
    """Run the batch's points and return the report.

    Points run as ``compress`` subflows in this process, as child flow runs on ``pool`` (each
    failed point retried alone ``point_retries`` times), or, with ``on_dask``, as tasks of this
    flow's ``DaskTaskRunner`` (``flows/fanout.py``). Every point is validated first, unless the
    caller says it ``validated`` this very text; ``environment`` is the deployer's software
    record (see ``compress``).
    """
    if pool is not None and on_dask:
        raise ConfigError("a batch's points run on a work pool or on Dask, not both")
    runner = OnPool(pool, point_retries) if pool else OnDask() if on_dask else InProcess()
    with flow_run_scope(environment):
        return _tradeoff(batch_text, batch_path, batch_name, database_url, only, rerun,
                         validated, runner)


def _tradeoff(batch_text: str, batch_path: str, batch_name: str, database_url: str | None,
              only: list[str] | None, rerun: bool, validated: bool,
              runner: InProcess | OnPool | OnDask) -> dict[str, Any]:
    plan = plan_batch(batch_text, Path(batch_path), Catalog(get_plugin_manager()), only,
                      resolve=not validated)
    job_id = f"tradeoff-{uuid.uuid4().hex}"
    with Registry.open(database_url) as reg:
        earlier = {} if rerun else registered_runs(reg, plan)
    outcomes: dict[str, Outcome] = {}
    for point in plan.points:
        if point.label in earlier:
            print(f"{point.label}: registered earlier (run {earlier[point.label]}), skipped")
            outcomes[point.label] = Outcome("reused", earlier[point.label])
    todo = [p for p in plan.points if p.label not in earlier]
    with progress_bar(f"{batch_name}: points", total=len(plan.points)) as advance:
        advance(len(outcomes))
        outcomes.update(runner.run(plan, todo, job_id, database_url, advance))
    report = build_report(plan, outcomes, job_id, database_url)
    key = REPORT_KEY.sub("-", f"tradeoff-{batch_name}".lower()).strip("-")[:90]
    headers = [h for h, _, _ in TRADEOFF_COLUMNS]
    front = ", ".join(report["pareto_front"]) or "(none)"
    create_table_artifact(
        key=key, table=[dict(zip(headers, tradeoff_cells(r), strict=True))
                        for r in report_rows(report)],
        description=f"Trade-off of batch {batch_name}: Pareto front {front}")
    create_markdown_artifact(key=f"{key}-pareto", markdown=pareto_markdown(report),
                             description=f"Perplexity against size of batch {batch_name}")
    return report


# ---------------------------------------------------------------------------------------------
# Files: JSON, markdown, PNG
# ---------------------------------------------------------------------------------------------


def pareto_markdown(report: dict[str, Any]) -> str:
    """The table and the Pareto plot as one markdown document with the plot embedded (a data
    URI: the Prefect UI renders it, and a worker's batch has no other place to put the file)."""
    import base64
    import tempfile

    from quantmill.plugins.reporting.plot import plot_tradeoff

    rows = report_rows(report)
    with tempfile.TemporaryDirectory(prefix="quantmill-pareto-") as tmp:
        png = Path(tmp) / "tradeoff.png"
        plot_tradeoff(rows, png, f"{report['batch']}: perplexity against size")
        image = base64.b64encode(png.read_bytes()).decode()
    front = " -> ".join(report["pareto_front"]) or "(none)"
    return "\n".join([f"# {report['batch']}: perplexity against size", "",
                      f"Pareto front, smallest first: {front}", "",
                      tradeoff_markdown(rows), "",
                      f"![perplexity against size](data:image/png;base64,{image})", ""])


def _json_ready(value: Any) -> Any:
    """Non-finite floats as strings ("inf"): JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


NOTES = """\
- perplexity and size come from the registry (the `perplexity` and `size` evaluators of each
  point's run); size MB is the checkpoint directory on disk, bits/weight what each quantized
  weight costs with its scales, zeros, group indices or codebooks.
- The reference row is the base model under the same evaluators; its size is its parameters at
  16 bits (an fp16 checkpoint), its source file being {source}.
- wall s is the registry run's duration (plan, quantize, evaluate, upload, register); `*` marks
  the run that also measured the base model; `†` a mixed-precision point whose allocator reused
  the sensitivity table an earlier point measured on the same model, calibration and settings
  (its wall time leaves that measurement out). quantize s is the quantizer alone (the
  allocator's plan is `plan_seconds` in the run's details).
- Pareto: no other point is both smaller and better (ties stay on the front).
"""


def write_report(report: dict[str, Any], out_dir: Path, stem: str = "tradeoff",
                 command: str | None = None, context: list[str] | None = None
                 ) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``; ``context``
    lines (e.g. the machine) go under the command."""
    from quantmill.plugins.reporting.plot import plot_tradeoff

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{stem}.{kind}" for kind in ("json", "md", "png")}
    report = {**report, "command": command, "context": context or []}
    rows = report_rows(report)
    plotted = plot_tradeoff(rows, paths["png"], f"{report['batch']}: perplexity against size")
    report["plot"] = {"points": len(plotted.points), "front": len(plotted.front),
                      "log_y": plotted.log_y, "left_out": plotted.left_out}
    paths["json"].write_text(json.dumps(_json_ready(report), indent=2) + "\n")

    reference = report.get("reference")
    source = (f"{reference['source_name']}, {reference['source_disk_mb']:.1f} MB"
              if reference and reference.get("source_disk_mb") else "not measured")
    counts = {s: sum(r["status"] == s for r in report["points"])
              for s in ("succeeded", "reused", "failed")}
    lines = [f"# Trade-off: {report['batch']} ({report['date']})", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if context:
        lines += [*context, ""]
    if report.get("description"):
        lines += [report["description"].strip(), ""]
    lines += [f"{len(report['points'])} points: {counts['succeeded']} run now, "
              f"{counts['reused']} taken from earlier runs, {counts['failed']} failed "
              f"(registry job `{report['job_id']}`, batch file `{Path(report['batch_file']).name}`"
              f").", "", tradeoff_markdown(rows), ""]
    front = [r for r in report["points"] if r["label"] in report["pareto_front"]]
    front.sort(key=lambda r: r["size_mb"])
    if front:
        lines += ["Pareto front, smallest first: " + " -> ".join(
            f"{r['label']} ({r['size_mb']:.1f} MB, {r['perplexity']:.2f})" for r in front), ""]
    lines += [NOTES.format(source=source), f"![perplexity against size]({paths['png'].name})", ""]
    failed = [r for r in report["points"] if r["status"] == "failed"]
    if failed:
        lines += ["## Failed points", ""] + [f"- {r['label']}: {r['error']}" for r in failed] + [""]
    paths["md"].write_text("\n".join(lines))
    return paths


def run_batch(text: str, path: Path, out_dir: Path, database_url: str | None = None,
              only: list[str] | None = None, rerun: bool = False, command: str | None = None,
              plan: BatchPlan | None = None, context: list[str] | None = None,
              pool: str | None = None, point_retries: int = 1, dask_address: str | None = None,
              dask_workers: int | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Validate the whole batch (before Prefect starts; skipped when the caller passes the
    ``plan`` it validated), run it, write the report files.

    ``pool`` sends the points to a work pool; ``dask_address`` (a scheduler) or
    ``dask_workers`` (a LocalCluster of that many processes) to Dask.
    """
    plan = plan or plan_batch(text, path, Catalog(get_plugin_manager()), only)
    Registry.open(database_url).close()  # refuse an out-of-date registry before any work
    on_dask = dask_address is not None or dask_workers is not None
    flow_ = tradeoff
    if on_dask:
        from quantmill.flows.fanout import dask_task_runner

        flow_ = tradeoff.with_options(task_runner=dask_task_runner(dask_address, dask_workers))
    with tags(SERVICE_TAG):
        report = flow_(text, str(plan.path), plan.name, database_url, only, rerun,
                       validated=True, pool=pool, point_retries=point_retries, on_dask=on_dask)
    return report, write_report(report, out_dir, command=command, context=context)
