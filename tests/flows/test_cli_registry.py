"""``quantmill registry lineage|search|show|compare|export|verify`` through typer's CliRunner.

The registries are filled through the Registry API (no Prefect flow runs), on SQLite and
PostgreSQL; the last test records two real checkpoints with the compress flow's step functions
(called directly, no Prefect server) to show that search and compare work on what jobs store.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prov.model import ProvActivity, ProvDocument, ProvEntity
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.registry import NewArtifact, NewMetric, Registry
from quantmill.registry import migrate as migrate_module
from quantmill.registry.export import check_lineage_json

runner = CliRunner()


def _load(path: Path) -> ModuleType:
    """The registry tests' conftest, for its database factory (tests are not a package)."""
    spec = importlib.util.spec_from_file_location("qm_registry_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_REGISTRY_CONFTEST = _load(Path(__file__).parents[1] / "registry" / "conftest.py")
tamper = _REGISTRY_CONFTEST.tamper  # raw database access, shared with the registry tests


@pytest.fixture(params=_REGISTRY_CONFTEST.BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of the backend under test, dropped afterwards."""
    factory = _REGISTRY_CONFTEST.Databases(tmp_path)
    try:
        yield factory.create(backend)
    finally:
        factory.drop_all()


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def cli(*args: str, code: int = 0) -> Any:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def cli_json(*args: str, code: int = 0) -> Any:
    return json.loads(cli(*args, "--json", code=code).stdout)


def fill(url: str, tmp_path: Path) -> dict[str, int]:
    """A base model and data set (real files), two checkpoints quantized from them with
    metrics, and a report made from the second checkpoint."""
    ids: dict[str, int] = {}
    with Registry.open(url) as reg:
        for label, kind in (("base", "model"), ("wiki", "dataset")):
            file = tmp_path / label
            file.write_bytes(label.encode() * 10)
            ids[label] = reg.upsert_artifact(
                kind=kind, name=label, sha256=hashlib.sha256(file.read_bytes()).hexdigest(),
                size_bytes=file.stat().st_size, uri=file.as_uri(), format="raw").id
        for label, method, bits, ppl in (("ck-rtn4", "rtn", 4, 32.0), ("ck-gptq3", "gptq", 3,
                                                                      35.0)):
            run = reg.start_run(job_id=label, kind="quantization", name=label,
                                recipe={"quantization": {"method": method, "bits": bits}},
                                plugins={method: "0.1.0"}, versions={"torch": "2.13.0"},
                                flow_run_id=f"flow-{label}",
                                inputs=[(ids["base"], "base_model"), (ids["wiki"], "calib")])
            reg.finish_run(run.id, outputs=[NewArtifact(
                kind="checkpoint", name=label, sha256=sha(label), size_bytes=100 * bits,
                uri=f"file:///nowhere/{label}", format="gptq", role="quantized_checkpoint",
                metadata={"method": method, "bits": bits})],
                metrics=[NewMetric(evaluator="perplexity", name="perplexity", value=ppl,
                                   artifact_sha256=sha(label))])
            ids[label] = reg.get_artifact(sha(label)).id
            ids[f"run-{label}"] = run.id
        report = reg.start_run(job_id="r", kind="report", name="report", recipe={}, plugins={},
                               versions={}, inputs=[(ids["ck-gptq3"], "checkpoint")])
        reg.finish_run(report.id, outputs=[NewArtifact(
            kind="report", name="report", sha256=sha("report"), size_bytes=5,
            uri="file:///nowhere/report", format="markdown", role="report")])
        ids["report"] = reg.get_artifact(sha("report")).id
        metric = reg.metrics_for_artifact(ids["ck-gptq3"])[0]
        ids["metric"] = reg.correct_metric(metric.id, 34.5, reason="rerun", author="eve").id
    return ids


# --- search ----------------------------------------------------------------------------------


def test_search(db_url: str, tmp_path: Path) -> None:
    ids = fill(db_url, tmp_path)
    url = ("--database-url", db_url)
    page = cli_json("registry", "search", "--method", "rtn", "--bits", "4", *url)
    assert [a["id"] for a in page["items"]] == [ids["ck-rtn4"]]
    page = cli_json("registry", "search", "--metric", "perplexity<35", "--kind", "checkpoint",
                    *url)
    assert [a["name"] for a in page["items"]] == ["ck-gptq3", "ck-rtn4"]  # 34.5 after the fix
    page = cli_json("registry", "search", "-m", "perplexity>34", "-m", "perplexity<=34.5", *url)
    assert [a["name"] for a in page["items"]] == ["ck-gptq3"]
    page = cli_json("registry", "search", "--base-model", str(ids["base"]), "--limit", "2",
                    *url)
    assert ([a["name"] for a in page["items"]], page["total"], page["next_offset"]) == (
        ["report", "ck-gptq3"], 3, 2)
    base_sha = hashlib.sha256(b"base" * 10).hexdigest()  # the file's content, see fill()
    page = cli_json("registry", "search", "--base-model", base_sha[:8], "--offset", "2", *url)
    assert ([a["name"] for a in page["items"]], page["next_offset"]) == (["ck-rtn4"], None)
    page = cli_json("registry", "search", "--name", "ck-", "--format", "gptq",
                    "--since", "2000-01-01", "--until", "2999-01-01T00:00:00+02:00", *url)
    assert page["total"] == 2
    assert cli_json("registry", "search", "--until", "2000-01-01", *url)["total"] == 0
    out = cli("registry", "search", "--kind", "checkpoint", "--limit", "1", *url).stdout
    assert "ck-gptq3" in out and "gptq" in out and "ck-rtn4" not in out
    assert "1-1 of 2 match(es); next page: --offset 1" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "perplexity<<3"], "invalid metric filter 'perplexity<<3'"),
    (["--metric", "perplexity<nan"], "not a finite number"),
    (["--since", "yesterday"], "--since: 'yesterday' is not an ISO 8601 date"),
    (["--until", "2026-13-01"], "--until: '2026-13-01' is not an ISO 8601"),
    (["--limit", "0"], "limit must be from 1 to 500, got 0"),
    (["--limit", "501"], "limit must be from 1 to 500, got 501"),
    (["--offset", "-1"], "offset must be 0 or more"),
    (["--bits", "64"], "bits must be an integer from 1 to 32"),
    (["--base-model", "' OR 1=1 --"], "is not an artifact id or a sha256 prefix"),
    (["--base-model", "999999"], "no artifact with id 999999"),
    (["--kind", "a\x00b"], "kind contains a NUL character"),
])
def test_search_refuses_bad_input(db_url: str, tmp_path: Path, args: list[str],
                                  message: str) -> None:
    fill(db_url, tmp_path)
    result = cli("registry", "search", *args, "--database-url", db_url, code=2)
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


# --- show, compare, lineage, export ------------------------------------------------------------


def test_show(db_url: str, tmp_path: Path) -> None:
    ids = fill(db_url, tmp_path)
    url = ("--database-url", db_url)
    details = cli_json("registry", "show", str(ids["ck-gptq3"]), *url)
    (produced,) = details["produced_by"]
    run = produced["run"]
    assert (run["id"], run["flow_run_id"], run["status"]) == (
        ids["run-ck-gptq3"], "flow-ck-gptq3", "succeeded")
    assert run["plugins"] == {"gptq": "0.1.0"} and run["versions"] == {"torch": "2.13.0"}
    assert len(run["recipe_sha256"]) == 64 and run["host"] and run["started_by"]
    assert [m["value"] for m in details["metrics"]] == [35.0, 34.5]
    assert details["metrics"][0]["superseded_by"] == ids["metric"]
    assert details["metrics"][0]["corrections"][0]["author"] == "eve"
    out = cli("registry", "show", sha("ck-gptq3")[:10], *url).stdout
    for expected in (f"produced by run #{ids['run-ck-gptq3']}", "flow-ck-gptq3",
                     f"superseded by #{ids['metric']}", "rerun", "base_model #1 base",
                     "torch"):
        assert expected in out, expected
    result = cli("registry", "show", "424242", *url, code=2)
    assert "no artifact with id 424242" in result.stderr


def test_compare(db_url: str, tmp_path: Path) -> None:
    ids = fill(db_url, tmp_path)
    url = ("--database-url", db_url)
    result = cli_json("registry", "compare", str(ids["ck-rtn4"]), str(ids["ck-gptq3"]), *url)
    (ppl,) = result["metrics"]
    assert (ppl["a"], ppl["b"], ppl["difference"]) == (32.0, 34.5, 2.5)
    assert result["recipe"]["differences"] == [
        {"key": "quantization.bits", "a": 4, "b": 3},
        {"key": "quantization.method", "a": "rtn", "b": "gptq"}]
    assert result["roots"]["common"] == [ids["base"], ids["wiki"]]
    out = cli("registry", "compare", str(ids["ck-rtn4"]), str(ids["ck-gptq3"]), *url).stdout
    for expected in ("quantization.bits", "2.5", "software versions: identical",
                     f"common roots: [{ids['base']}, {ids['wiki']}]"):
        assert expected in out, expected
    assert "no artifact" in cli("registry", "compare", "1", "999", *url, code=2).stderr


def test_lineage_both_ways(db_url: str, tmp_path: Path) -> None:
    ids = fill(db_url, tmp_path)
    url = ("--database-url", db_url)
    up = cli_json("registry", "lineage", str(ids["report"]), *url)
    assert {a["name"] for a in up["artifacts"]} == {"report", "ck-gptq3", "base", "wiki"}
    down = cli_json("registry", "lineage", str(ids["base"]), "--direction", "downstream",
                    "--depth", "1", *url)
    assert {a["name"] for a in down["artifacts"]} == {"base", "ck-rtn4", "ck-gptq3"}
    tree = cli("registry", "lineage", str(ids["base"]), "--direction", "downstream",
               *url).stdout
    assert "report" in tree and f"run #{ids['run-ck-rtn4']}" in tree and "as base_model" in tree
    tree = cli("registry", "lineage", str(ids["report"]), *url).stdout
    assert "base_model: model #1 base" in tree
    # the corrected perplexity is shown next to its replacement, marked as replaced
    assert f"superseded by metric #{ids['metric']}" in tree and "34.5" in tree
    # the older command still answers the same question
    assert f"run #{ids['run-ck-gptq3']}" in cli("lineage", str(ids["report"]), *url).stdout


def test_export(db_url: str, tmp_path: Path) -> None:
    ids = fill(db_url, tmp_path)
    url = ("--database-url", db_url)
    doc = json.loads(cli("registry", "export", str(ids["ck-gptq3"]), *url).stdout)
    assert {a["name"] for a in doc["artifacts"]} == {"ck-gptq3", "base", "wiki"}
    assert doc["corrections"][0]["author"] == "eve"
    with Registry.open(db_url) as reg:
        assert check_lineage_json(doc, reg) == []
    out = tmp_path / "lineage.prov.json"
    printed = cli("registry", "export", str(ids["base"]), "--format", "prov", "--direction",
                  "downstream", "--out", str(out), *url).stdout
    assert f"wrote {out}" in printed
    read = ProvDocument.deserialize(content=out.read_text(), format="json")
    assert len(list(read.get_records(ProvActivity))) == 3
    # base, both checkpoints, the report, and three measurements (one corrected)
    assert len(list(read.get_records(ProvEntity))) == 4 + 3 + 1  # + the correction
    result = cli("registry", "export", "999", "--format", "xml", *url, code=2)
    assert "xml" in result.stderr


# --- verify --------------------------------------------------------------------------------


def test_verify_intact_and_anchored(db_url: str, tmp_path: Path) -> None:
    fill(db_url, tmp_path)
    url = ("--database-url", db_url)
    with Registry.open(db_url) as reg:
        entries, head = reg.head()
    out = cli("registry", "verify", *url).stdout
    assert f"ledger: {entries} entries, head {head}" in out and "OK" in out
    report = cli_json("registry", "verify", "--expect-head", head, *url)
    assert report["ok"] is True and report["head_hash"] == head
    report = cli_json("registry", "verify", "--expect-head", "f" * 64, *url, code=1)
    assert [p["kind"] for p in report["problems"]] == ["anchor"]
    result = cli("registry", "verify", "--expect-head", "abc", *url, code=2)
    assert "--expect-head: 'abc' is not a sha256" in result.stderr


def test_verify_fails_after_tampering(db_url: str, tamper: Any, tmp_path: Path) -> None:
    ids = fill(db_url, tmp_path)
    url = ("--database-url", db_url)
    tamper.drop_guards()
    cli("registry", "verify", *url)  # dropping the guards alone changes no record
    tamper.sql(f"UPDATE metrics SET value = 1.0 WHERE id = {ids['metric']}")
    tamper.sql(f"UPDATE runs SET started_by = 'mallory' WHERE id = {ids['run-ck-rtn4']}")
    result = cli("registry", "verify", *url, code=1)
    assert f"metrics #{ids['metric']}" in result.stdout
    assert "value: chained 34.5, now 1.0" in result.stdout
    assert "mallory" in result.stdout and "FAILED: 2 problem(s)" in result.stdout
    report = cli_json("registry", "verify", *url, code=1)
    assert {(p["kind"], p["record"]) for p in report["problems"]} == {
        ("changed", f"metrics #{ids['metric']}"), ("changed", f"runs #{ids['run-ck-rtn4']}")}


def test_verify_files(db_url: str, tmp_path: Path) -> None:
    from quantmill.storage.local import LocalStorage, LocalStorageConfig

    url = ("--database-url", db_url)
    tree = tmp_path / "checkpoint"
    tree.mkdir()
    (tree / "model.safetensors").write_bytes(b"weights")
    (tree / "config.json").write_text("{}")
    stored = LocalStorage(LocalStorageConfig(root=tmp_path / "store")).put_tree(tree)
    plain = tmp_path / "data.txt"
    plain.write_text("some text")
    with Registry.open(db_url) as reg:
        reg.upsert_artifact(kind="checkpoint", name="ck", sha256=stored.sha256,
                            size_bytes=stored.size_bytes, uri=stored.uri, format="gptq")
        reg.upsert_artifact(kind="dataset", name="data", sha256=sha("some text"),
                            size_bytes=9, uri=plain.as_uri(), format="text")
    out = cli("registry", "verify", "--files", *url).stdout
    assert "files: 2 re-hashed" in out and "OK" in out
    stored_file = Path(stored.uri.removeprefix("file://")) / "model.safetensors"
    stored_file.write_bytes(b"tampered")
    plain.unlink()
    report = cli_json("registry", "verify", "--files", *url, code=1)
    details = {p["record"]: p["detail"] for p in report["problems"]}
    assert "content differs" in details["artifacts #1 (ck)"]
    assert "stored content missing" in details["artifacts #2 (data)"]
    assert report["files_checked"] == 1


def test_outdated_schema_is_refused_with_the_upgrade_command(db_url: str) -> None:
    migrate_module.upgrade(db_url, "0001")
    for command in (["registry", "search"], ["registry", "verify"],
                    ["registry", "show", "1"]):
        result = cli(*command, "--database-url", db_url, code=2)
        assert "quantmill registry upgrade --database-url" in result.stderr
        assert "needs" in result.stderr
    cli("registry", "upgrade", "--database-url", db_url)
    assert cli_json("registry", "search", "--database-url", db_url)["total"] == 0


# --- real jobs -------------------------------------------------------------------------------


def _job(tiny_recipe: Any, name: str, bits: int, group_size: int) -> dict[str, Any]:
    """One compress job through its step functions (the flow's order, no Prefect server)."""
    import yaml

    from quantmill.flows import tasks
    from quantmill.flows.context import JobRef, RunContext
    from quantmill.flows.environment import software_versions

    recipe = tiny_recipe(f"{name}.yaml", quantization={"bits": bits, "group_size": group_size})
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "name": name},
                                     sort_keys=False))
    ctx = RunContext.of(JobRef(recipe.read_text(), str(recipe), f"job-{name}", None))
    job = ctx.job
    inputs = tasks.register_inputs_step(ctx)
    calibration = tasks.calibrate_step(ctx, inputs)
    evaluations = [tasks.evaluate_base_step(ctx, inputs, i) for i in range(len(job.evaluators))]
    run = ctx.registry.start_run(job_id=ctx.job_id, kind="quantization", name=name,
                                 recipe=job.recipe_json(), plugins=job.plugin_versions,
                                 versions=software_versions(),
                                 inputs=[(inputs.base_model_id, "base_model"),
                                         (calibration.artifact_id, "calibration_set")])
    plan = tasks.plan_step(ctx, calibration)
    quantized = tasks.quantize_and_export(ctx, inputs, calibration, plan)
    evaluations += [tasks.evaluate_checkpoint_step(ctx, quantized, i)
                    for i in range(len(job.evaluators))]
    checkpoint = tasks.register_step(ctx, run.id, inputs, plan, quantized, evaluations, None)
    tasks.clear_work_area(ctx, quantized.work_key)
    ctx.close()
    return {"checkpoint": checkpoint, "base": inputs.base_model_id, "run": run.id}


@pytest.mark.slow
def test_real_checkpoints_search_and_compare(quantmill_home: Path, tiny_recipe: Any) -> None:
    w4 = _job(tiny_recipe, "tiny-w4", 4, 32)
    w3 = _job(tiny_recipe, "tiny-w3", 3, 64)
    assert w4["base"] == w3["base"]
    with Registry.open() as reg:
        base = reg.get_artifact(w4["base"])
        metadata = reg.get_artifact(w3["checkpoint"]).metadata
    assert (metadata["method"], metadata["bits"], metadata["group_size"]) == ("rtn", 3, 64)
    assert metadata["base_model_sha256"] == base.sha256
    found = cli_json("registry", "search", "--method", "rtn", "--bits", "4")
    assert [a["id"] for a in found["items"]] == [w4["checkpoint"]]
    found = cli_json("registry", "search", "--base-model", base.sha256[:12], "--kind",
                     "checkpoint", "-m", "perplexity>1")
    assert [a["id"] for a in found["items"]] == [w3["checkpoint"], w4["checkpoint"]]
    result = cli_json("registry", "compare", str(w4["checkpoint"]), str(w3["checkpoint"]))
    differences = {row["key"]: (row.get("a"), row.get("b"))
                   for row in result["recipe"]["differences"]}
    assert differences["quantization.bits"] == (4, 3)
    assert differences["quantization.group_size"] == (32, 64)
    assert differences["name"] == ("tiny-w4", "tiny-w3")
    assert base.id in result["roots"]["common"]
    assert result["roots"]["only_a"] == result["roots"]["only_b"] == []
    assert result["versions"] == [] and result["plugins"] == []
    ppl = next(m for m in result["metrics"] if m["name"] == "perplexity")
    assert ppl["a"] > 0 and ppl["b"] > 0 and ppl["difference"] == ppl["b"] - ppl["a"]
    assert cli_json("registry", "verify", "--files")["files_checked"] >= 4


@pytest.mark.parametrize(("plan", "weight_kind", "expected"), [
    ({"a": {"bits": 4, "group_size": 128}, "b": {"bits": 4, "group_size": 128}}, "uniform",
     {"bits": 4, "group_size": 128}),
    ({"a": {"bits": 2, "group_size": 128}, "b": {"bits": 8, "group_size": 128}}, "uniform",
     {"bits_mixed": [2, 8], "group_size": 128}),
    ({"a": {"bits": 3, "group_size": -1}}, "codebook", {"bits": 3}),
    ({}, "uniform", {"bits": 8, "group_size": -1}),  # nothing planned: the default spec
])
def test_checkpoint_metadata_states_what_the_plan_did(
    plan: dict[str, Any], weight_kind: str, expected: dict[str, Any]
) -> None:
    from types import SimpleNamespace

    from quantmill.flows.tasks import checkpoint_metadata
    from quantmill.plugins.base import ModuleQuantSpec

    quantizer = SimpleNamespace(
        name="m", weight_kind=weight_kind,
        default_spec=lambda: ModuleQuantSpec(bits=8, group_size=-1, sym=True, method="m"))
    job = SimpleNamespace(quantizer=quantizer)
    metadata = checkpoint_metadata(job, {"x": 1}, plan, "ab" * 32)
    assert metadata == {"export": {"x": 1}, "method": "m", "base_model_sha256": "ab" * 32,
                        **expected}


def test_reap_closes_dead_runs_and_runs_lists_them(db_url: str, tamper: Any) -> None:
    import subprocess

    with Registry.open(db_url) as reg:
        dead = reg.start_run(job_id="j", kind="quantization", name="killed", recipe={},
                             plugins={}, versions={}).id
        alive = reg.start_run(job_id="j", kind="quantization", name="working", recipe={},
                              plugins={}, versions={}).id
    child = subprocess.Popen(["true"])
    child.wait()
    tamper.sql(f"UPDATE run_heartbeats SET pid = {child.pid} WHERE run_id = {dead}")
    planned = cli_json("registry", "reap", "--dry-run", "--database-url", db_url)
    assert [item["run"]["id"] for item in planned] == [dead]
    assert cli_json("registry", "runs", "--status", "running", "--database-url", db_url)
    shown = cli("registry", "reap", "--database-url", db_url).stdout
    assert "closed 1 run(s) as abandoned" in shown and f"process {child.pid}" in shown
    listed = cli_json("registry", "runs", "--status", "abandoned", "--database-url", db_url)
    assert [run["id"] for run in listed] == [dead]
    assert listed[0]["error"].startswith("abandoned: process")
    running = cli_json("registry", "runs", "--status", "running", "--database-url", db_url)
    assert [run["id"] for run in running] == [alive]
    verified = cli("registry", "verify", "--database-url", db_url).stdout
    assert "runs: 1 abandoned, 1 running" in verified and "OK" in verified
    assert "no abandoned runs" in cli("registry", "reap", "--database-url", db_url).stdout
    bad = cli("registry", "runs", "--status", "lost", "--database-url", db_url, code=2)
    assert "lost" in bad.stderr


@pytest.mark.slow
def test_a_job_that_reproduces_a_checkpoint_names_it_as_an_input(quantmill_home: Path,
                                                                  tiny_recipe: Any) -> None:
    """RTN is deterministic: the same job twice makes the same bytes. An artifact has one
    producing run, so the second run records that it reproduced (and measured) it."""
    first = _job(tiny_recipe, "tiny-again", 4, 32)
    second = _job(tiny_recipe, "tiny-again", 4, 32)
    assert second["checkpoint"] == first["checkpoint"]
    with Registry.open() as reg:
        assert reg.producer(first["checkpoint"]) == first["run"]
        edges = {(e.direction, e.role, e.artifact_id) for e in reg.run_edges(second["run"])}
        assert ("input", "reproduced_checkpoint", first["checkpoint"]) in edges
        assert not [edge for edge in edges if edge[0] == "output"]
        assert reg.get_run(second["run"]).details["reproduces_run"] == first["run"]
        measured_by = {m.run_id for m in reg.metrics_for_artifact(first["checkpoint"])}
        assert measured_by == {first["run"], second["run"]}
        assert reg.get_run(second["run"]).status == "succeeded" and reg.verify().ok
