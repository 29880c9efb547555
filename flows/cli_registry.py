"""``quantmill registry lineage|search|show|compare|export|verify``: the auditor's commands.

Imported at the end of ``quantmill.flows.cli``, which owns the ``registry`` command group. Every
command is a thin shell over ``quantmill.registry.queries`` / ``export`` / ``Registry.verify``
(the HTTP API calls the same functions), printing rich tables or, with ``--json``, plain JSON
for scripts. Bad input is one line on stderr and exit status 2; ``verify`` exits 1 when anything
differs, so it can gate a pipeline.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table
from rich.tree import Tree

from quantmill.flows.cli import (
    DatabaseOption,
    _fmt,
    _ref,
    console,
    registry_app,
    render_lineage,
    user_errors,
)

if TYPE_CHECKING:
    pass

_HEAD_RE = re.compile(r"^[0-9a-fA-F]{64}$")


class Direction(StrEnum):
    """Which way to walk the lineage graph from the artifact."""

    upstream = "upstream"
    downstream = "downstream"


class ExportFormat(StrEnum):
    """quantmill's own lineage JSON (with ledger links) or W3C PROV-JSON."""

    json = "json"
    prov = "prov"


DirectionOption = typer.Option(Direction.upstream, "--direction",
                               help="upstream: what it was made from; downstream: what was "
                                    "made from it.")
DepthOption = typer.Option(50, "--depth", min=0, max=1000, help="Maximum number of runs away.")
JsonOption = typer.Option(False, "--json", help="Print JSON instead of tables.")


def _echo_json(document: Any) -> None:
    """Plain JSON on stdout: no colours or wrapping, so it pipes into jq or a file."""
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False, default=str))


def _graph(reg: Any, ref: str, direction: Direction, depth: int) -> Any:
    root = reg.get_artifact(_ref(ref))
    if direction is Direction.upstream:
        return reg.upstream(root.id, max_depth=depth)
    return reg.downstream(root.id, max_depth=depth)


# --- lineage -------------------------------------------------------------------------------


def render_downstream(graph: Any, root_id: int) -> Tree:
    """A rich tree: artifact -> runs that used it -> their outputs -> ..."""
    consumers: dict[int, list[tuple[int, str]]] = {}
    outputs: dict[int, list[tuple[int, str]]] = {}
    for edge in graph.edges:
        side = consumers if edge.direction == "input" else outputs
        key = edge.artifact_id if edge.direction == "input" else edge.run_id
        value = (edge.run_id if edge.direction == "input" else edge.artifact_id, edge.role)
        side.setdefault(key, []).append(value)

    def label(artifact_id: int, role: str | None = None) -> str:
        a = graph.artifacts[artifact_id]
        prefix = f"[dim]{role}:[/] " if role else ""
        return (f"{prefix}[bold cyan]{a.kind}[/] #{a.id} {a.name} "
                f"[dim]({a.format}, sha256 {a.sha256[:12]})[/]")

    def add(node: Tree, artifact_id: int, seen: set[int]) -> None:
        for run_id, role in consumers.get(artifact_id, []):
            if run_id not in graph.runs:
                continue
            r = graph.runs[run_id]
            branch = node.add(f"[dim]as {role}[/] [bold magenta]run[/] #{r.id} {r.kind} "
                              f"{r.name} [dim]({r.status}, {r.started_at:%Y-%m-%d %H:%M})[/]")
            for output_id, out_role in outputs.get(run_id, []):
                if output_id in graph.artifacts and output_id not in seen:
                    add(branch.add(label(output_id, out_role)), output_id, seen | {output_id})

    tree = Tree(label(root_id))
    add(tree, root_id, {root_id})
    return tree


@registry_app.command("lineage")
@user_errors
def registry_lineage(
    artifact: str = typer.Argument(..., help="Artifact id or sha256 prefix."),
    direction: Direction = DirectionOption,
    depth: int = DepthOption,
    as_json: bool = JsonOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Show what ARTIFACT was made from (or, downstream, what was made from it)."""
    from quantmill.registry import Registry

    with Registry.open(database_url) as reg:
        graph = _graph(reg, artifact, direction, depth)
    if as_json:
        _echo_json(graph.to_json())
    elif direction is Direction.upstream:
        console.print(render_lineage(graph, graph.root_id))
    else:
        console.print(render_downstream(graph, graph.root_id))


# --- search --------------------------------------------------------------------------------


def _parse_time(option: str, text: str | None) -> datetime | None:
    from quantmill.registry import InvalidQuery

    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise InvalidQuery(f"{option}: {text!r} is not an ISO 8601 date or time (e.g. "
                           f"2026-11-01 or 2026-11-01T12:00:00+00:00)") from None


@registry_app.command("search")
@user_errors
def registry_search(
    kind: str | None = typer.Option(None, help="Artifact kind (model, checkpoint, dataset...)."),
    fmt: str | None = typer.Option(None, "--format", help="Artifact format (gptq, hf...)."),
    method: str | None = typer.Option(None, help="Quantization method (metadata 'method')."),
    bits: int | None = typer.Option(None, help="Bit width (metadata 'bits')."),
    base_model: str | None = typer.Option(None, "--base-model",
                                          help="Only artifacts made from this one (id or sha256 "
                                               "prefix), at any depth."),
    metric: list[str] = typer.Option([], "--metric", "-m",
                                     help="Metric filter, repeatable: 'perplexity<30'."),
    since: str | None = typer.Option(None, help="Created at or after (ISO 8601; UTC if no "
                                                "zone)."),
    until: str | None = typer.Option(None, help="Created before (ISO 8601; UTC if no zone)."),
    name: str | None = typer.Option(None, help="Name contains this text (case-sensitive)."),
    limit: int = typer.Option(50, help="Page size (1-500)."),
    offset: int = typer.Option(0, help="Skip this many matches."),
    as_json: bool = JsonOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Find artifacts by kind, format, method, bits, base model, metrics, date and name."""
    from quantmill.registry import Registry
    from quantmill.registry.queries import ArtifactQuery, parse_metric_filter, search_artifacts

    query = ArtifactQuery(
        kind=kind, format=fmt, method=method, bits=bits,
        base_model=_ref(base_model) if base_model is not None else None,
        metrics=tuple(parse_metric_filter(text) for text in metric),
        created_after=_parse_time("--since", since),
        created_before=_parse_time("--until", until),
        name_contains=name,
    )
    with Registry.open(database_url) as reg:
        page = search_artifacts(reg, query, limit=limit, offset=offset)
    if as_json:
        _echo_json(page.to_json())
        return
    table = Table()
    for column in ("id", "kind", "name", "format", "method", "bits", "size", "sha256",
                   "created"):
        table.add_column(column, justify="right" if column in ("id", "bits", "size") else "left")
    for a in page.items:
        table.add_row(str(a.id), a.kind, a.name, a.format, _fmt(a.metadata.get("method")),
                      _fmt(a.metadata.get("bits")), f"{a.size_bytes / 1e6:,.1f} MB",
                      a.sha256[:12], a.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)
    shown = f"{page.offset + 1}-{page.offset + len(page.items)}" if page.items else "none"
    more = f"; next page: --offset {page.next_offset}" if page.next_offset is not None else ""
    console.print(f"{shown} of {page.total} match(es){more}", highlight=False)


# --- show ----------------------------------------------------------------------------------


def _pairs(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True) if value else "-"
        table.add_row(key, _fmt(value))
    return table


def _corrections_table(title: str, notes: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("id", "target", "changes", "reason", "author", "at"):
        table.add_column(column, overflow="fold")
    for note in notes:
        table.add_row(str(note["id"]), f"{note['target_type']} #{note['target_id']}",
                      json.dumps(note["changes"], sort_keys=True), note["reason"],
                      note["author"], note["created_at"][:19])
    return table


@registry_app.command("show")
@user_errors
def registry_show(
    artifact: str = typer.Argument(..., help="Artifact id or sha256 prefix."),
    as_json: bool = JsonOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Show an artifact, its metrics and corrections, and the provenance of the run that made
    it (recipe, plugins, software versions, host, who, when, flow run, status)."""
    from quantmill.registry import Registry
    from quantmill.registry.queries import describe_artifact

    with Registry.open(database_url) as reg:
        details = describe_artifact(reg, _ref(artifact))
    if as_json:
        _echo_json(details)
        return
    a = details["artifact"]
    console.print(_pairs(f"artifact #{a['id']}", [(key, a[key]) for key in (
        "kind", "name", "format", "sha256", "size_bytes", "uri", "created_at", "metadata")]))
    metrics = Table(title="metrics", title_justify="left")
    for column in ("id", "evaluator", "name", "value", "unit", "run", "dataset", "state"):
        metrics.add_column(column)
    for m in details["metrics"]:
        state = f"superseded by #{m['superseded_by']}" if m["superseded_by"] else "current"
        metrics.add_row(str(m["id"]), m["evaluator"], m["name"], _fmt(m["value"]),
                        _fmt(m["unit"]), str(m["run_id"]), _fmt(m["dataset_artifact_id"]),
                        state)
    console.print(metrics)
    notes = details["corrections"] + [n for m in details["metrics"] for n in m["corrections"]]
    for produced in details["produced_by"]:
        run = produced["run"]
        edges = [f"{side}: " + ", ".join(f"{e['role']} #{e['artifact_id']} {e['name']}"
                                         for e in produced[side]) or "-"
                 for side in ("inputs", "outputs")]
        console.print(_pairs(f"produced by run #{run['id']}", [
            ("kind / name", f"{run['kind']} / {run['name']}"), ("status", run["status"]),
            ("job", run["job_id"]), ("recipe sha256", run["recipe_sha256"]),
            ("plugins", run["plugins"]), ("software", run["versions"]), ("host", run["host"]),
            ("started by", run["started_by"]), ("flow run", run["flow_run_id"]),
            ("started", run["started_at"]), ("finished", run["finished_at"]),
            ("error", run["error"]), ("edges", "; ".join(edges)),
        ]))
        notes += produced["corrections"]
    if not details["produced_by"]:
        console.print("no run produced this artifact (it was registered as an input)")
    if notes:
        console.print(_corrections_table("corrections", sorted(notes, key=lambda n: n["id"])))
    if details["used_by_run_ids"]:
        console.print("used by runs: " + ", ".join(map(str, details["used_by_run_ids"])))


# --- compare -------------------------------------------------------------------------------


def _diff_table(title: str, rows: list[dict[str, Any]] | None) -> Table | str:
    if rows is None:
        return f"{title}: not comparable (an artifact has no producing run)"
    if not rows:
        return f"{title}: identical"
    table = Table(title=title, title_justify="left")
    for column in ("key", "A", "B"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["key"], _fmt(row.get("a", "(absent)")), _fmt(row.get("b", "(absent)")))
    return table


@registry_app.command("compare")
@user_errors
def registry_compare(
    a: str = typer.Argument(..., help="Artifact A: id or sha256 prefix."),
    b: str = typer.Argument(..., help="Artifact B: id or sha256 prefix."),
    as_json: bool = JsonOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Compare two artifacts: metrics, recipes, plugins, software versions and roots."""
    from quantmill.registry import Registry
    from quantmill.registry.queries import compare_artifacts

    with Registry.open(database_url) as reg:
        result = compare_artifacts(reg, _ref(a), _ref(b))
    if as_json:
        _echo_json(result)
        return
    heads = Table()
    for column in ("", "A", "B"):
        heads.add_column(column, overflow="fold")
    sides = (result["a"], result["b"])
    for label, pick in (
        ("artifact", lambda s: f"#{s['artifact']['id']} {s['artifact']['name']}"),
        ("kind / format", lambda s: f"{s['artifact']['kind']} / {s['artifact']['format']}"),
        ("sha256", lambda s: s["artifact"]["sha256"][:16]),
        ("size", lambda s: f"{s['artifact']['size_bytes'] / 1e6:,.2f} MB"),
        ("produced by", lambda s: f"run #{s['run']['id']} {s['run']['name']}" if s["run"]
         else "-"),
        ("roots", lambda s: ", ".join(f"#{r['id']} {r['name']}" for r in s["roots"])),
    ):
        heads.add_row(label, *(pick(side) for side in sides))
    console.print(heads)
    metrics = Table(title="metrics (B - A)", title_justify="left")
    for column in ("evaluator", "metric", "A", "B", "difference"):
        metrics.add_column(column, justify="left" if column in ("evaluator", "metric")
                           else "right")
    for row in result["metrics"]:
        metrics.add_row(row["evaluator"], row["name"], _fmt(row["a"]), _fmt(row["b"]),
                        _fmt(row["difference"]))
    console.print(metrics)
    recipe = result["recipe"]
    console.print(_diff_table("recipe", recipe["differences"] if recipe else None))
    console.print(_diff_table("plugins", result["plugins"]))
    console.print(_diff_table("software versions", result["versions"]))
    roots = result["roots"]
    console.print(f"common roots: {roots['common'] or 'none'}; only A: {roots['only_a'] or '-'}"
                  f"; only B: {roots['only_b'] or '-'}", highlight=False)


# --- export --------------------------------------------------------------------------------


@registry_app.command("export")
@user_errors
def registry_export(
    artifact: str = typer.Argument(..., help="Artifact id or sha256 prefix."),
    fmt: ExportFormat = typer.Option(ExportFormat.json, "--format",
                                     help="json: quantmill lineage with ledger links; prov: "
                                          "W3C PROV-JSON."),
    direction: Direction = DirectionOption,
    depth: int = DepthOption,
    out: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
    database_url: str | None = DatabaseOption,
) -> None:
    """Export ARTIFACT's lineage graph as a self-contained document for an audit file."""
    from quantmill.registry import Registry
    from quantmill.registry.export import lineage_json, lineage_prov

    with Registry.open(database_url) as reg:
        graph = _graph(reg, artifact, direction, depth)
        document = (lineage_prov if fmt is ExportFormat.prov else lineage_json)(reg, graph)
    if out is None:
        _echo_json(document)
        return
    out.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    console.print(f"wrote {out} ({fmt.value}: {len(graph.artifacts)} artifact(s), "
                  f"{len(graph.runs)} run(s), {len(graph.metrics)} metric(s))", highlight=False)


# --- verify --------------------------------------------------------------------------------


@registry_app.command("verify")
@user_errors
def registry_verify(
    files: bool = typer.Option(False, "--files", help="Also re-hash every artifact's stored "
                                                      "content."),
    expect_head: str | None = typer.Option(None, "--expect-head",
                                           help="A head hash written down earlier; it must "
                                                "still be in the chain."),
    as_json: bool = JsonOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Check the tamper-evident ledger: every link, every record against its chained copy and
    (with --files) the stored content. Exit status 1 when anything differs."""
    from quantmill.registry import InvalidQuery, Registry

    if expect_head is not None and not _HEAD_RE.match(expect_head):
        raise InvalidQuery(f"--expect-head: {expect_head!r} is not a sha256 (64 hex characters)")
    from quantmill.flows.artifacts import Rehasher

    with Registry.open(database_url) as reg:
        report = reg.verify(rehash=Rehasher() if files else None, expected_head=expect_head)
    if as_json:
        _echo_json(report.to_json())
    else:
        typer.echo(f"ledger: {report.entries} entries, head {report.head_hash}")
        typer.echo("runs: " + (", ".join(f"{count} {status}" for status, count
                                         in sorted(report.runs.items())) or "none"))
        if files:
            typer.echo(f"files: {report.files_checked} re-hashed")
        if report.problems:
            table = Table(title=f"{len(report.problems)} problem(s)", title_justify="left")
            for column in ("kind", "record", "detail"):
                table.add_column(column, overflow="fold")
            for problem in report.problems:
                table.add_row(problem.kind, problem.record, problem.detail)
            console.print(table)
            typer.echo(f"FAILED: {len(report.problems)} problem(s)")
        else:
            typer.echo("OK: the registry is intact")
    if not report.ok:
        raise typer.Exit(1)


# --- runs and reap -------------------------------------------------------------------------


class RunStatus(StrEnum):
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    abandoned = "abandoned"


def _runs_table(title: str, runs: list[Any], reasons: list[str] | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("id", "kind", "name", "status", "job", "host", "started", "error"):
        table.add_column(column, overflow="fold")
    for index, run in enumerate(runs):
        error = reasons[index] if reasons else run.error
        table.add_row(str(run.id), run.kind, run.name, run.status, run.job_id[:12], run.host,
                      run.started_at.strftime("%Y-%m-%d %H:%M"), _fmt(error))
    return table


@registry_app.command("runs")
@user_errors
def registry_runs(
    status: RunStatus | None = typer.Option(None, "--status", help="Only runs in this state."),
    kind: str | None = typer.Option(None, help="Run kind (quantization, calibration, "
                                               "evaluation...)."),
    job: str | None = typer.Option(None, "--job", help="Only runs of this job id."),
    limit: int = typer.Option(50, min=1, max=500, help="At most this many, newest first."),
    as_json: bool = JsonOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """List runs, newest first: e.g. the abandoned ones (``--status abandoned``)."""
    from quantmill.registry import Registry

    with Registry.open(database_url) as reg:
        runs = reg.list_runs(job_id=job, kind=kind, status=status.value if status else None,
                             limit=limit)
    if as_json:
        _echo_json([run.to_json() for run in runs])
        return
    console.print(_runs_table(f"{len(runs)} run(s)", runs))


@registry_app.command("reap")
@user_errors
def registry_reap(
    stale_after: int = typer.Option(600, "--stale-after", min=60,
                                    help="Seconds without a heartbeat after which a run on "
                                         "another host counts as dead."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be closed."),
    as_json: bool = JsonOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Close runs whose process died as ``abandoned`` (append-only, with the reason). On this
    host a dead process is certain at once; elsewhere its heartbeat must be stale."""
    from datetime import timedelta

    from quantmill.registry import Registry

    with Registry.open(database_url) as reg:
        reaped = reg.reap(stale_after=timedelta(seconds=stale_after), dry_run=dry_run)
    if as_json:
        _echo_json([{"run": run.to_json(), "reason": reason} for run, reason in reaped])
        return
    if not reaped:
        typer.echo("no abandoned runs: every running run has a live process")
        return
    verb = "would close" if dry_run else "closed"
    console.print(_runs_table(f"{verb} {len(reaped)} run(s) as abandoned",
                              [run for run, _ in reaped], [reason for _, reason in reaped]))
