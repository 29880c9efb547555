"""Tamper evidence on both databases: every record is chained, the tables refuse UPDATE and
DELETE, and ``verify`` names exactly what was changed, deleted, slipped in or re-written."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from quantmill.registry import (
    ArtifactLocation,
    NewArtifact,
    NewMetric,
    Registry,
    RegistryError,
    RunStateError,
)
from quantmill.registry import migrate as migrate_module
from quantmill.registry.db import create_registry_engine


def _sha(text_: str) -> str:
    return hashlib.sha256(text_.encode()).hexdigest()


def _history(reg: Registry) -> dict[str, int]:
    """A base model, a calibration set, a quantize run with an output and a metric."""
    base = reg.upsert_artifact(kind="model", name="base", sha256=_sha("base"), size_bytes=4,
                               uri="file:///base", format="hf")
    data = reg.upsert_artifact(kind="dataset", name="calib", sha256=_sha("calib"), size_bytes=5,
                               uri="file:///calib", format="text")
    run = reg.start_run(job_id="job-1", kind="quantize", name="gptq", recipe={"bits": 4},
                        plugins={"gptq": "1.0"}, versions={"torch": "2.13"},
                        inputs=[(base.id, "base_model"), (data.id, "calibration")])
    reg.finish_run(run.id, outputs=[NewArtifact(kind="checkpoint", name="out",
                                                sha256=_sha("out"), size_bytes=6,
                                                uri="file:///out", format="gptq", role="model")],
                   metrics=[NewMetric(evaluator="perplexity", name="perplexity", value=31.25,
                                      artifact_sha256=_sha("out"))],
                   details={"seconds": 12.5})
    metric = reg.metrics_for_run(run.id)[0]
    return {"base": base.id, "data": data.id, "run": run.id, "metric": metric.id,
            "out": reg.get_artifact(_sha("out")).id}


def test_every_record_is_chained_and_verifies(registry: Registry) -> None:
    ids = _history(registry)
    count, head = registry.head()
    # 3 artifacts, 1 run, 3 edges (2 in, 1 out), 1 metric, 1 completion
    assert count == 9
    report = registry.verify(expected_head=head)
    assert report.ok, report.problems
    assert report.entries == 9 and report.head_hash == head
    run = registry.get_run(ids["run"])
    assert run.status == "succeeded" and run.details == {"seconds": 12.5}
    assert run.finished_at is not None


@pytest.mark.parametrize("statement", [
    "UPDATE metrics SET value = 1",
    "DELETE FROM metrics",
    "UPDATE runs SET started_by = 'mallory'",
    "DELETE FROM run_completions",
    "UPDATE artifacts SET uri = 'file:///elsewhere'",
    "UPDATE ledger SET payload = '{}'",
    "DELETE FROM ledger",
])
def test_tables_refuse_update_and_delete(registry: Registry, tamper: Any, statement: str) -> None:
    _history(registry)
    with pytest.raises(DatabaseError, match="append-only"):
        tamper.sql(statement)
    assert registry.verify().ok


def test_verify_names_changed_fields(registry: Registry, tamper: Any) -> None:
    ids = _history(registry)
    tamper.drop_guards()
    tamper.sql(f"UPDATE metrics SET value = 29.0 WHERE id = {ids['metric']}")
    tamper.sql(f"UPDATE runs SET started_by = 'mallory' WHERE id = {ids['run']}")
    report = registry.verify()
    found = {(p.kind, p.record): p.detail for p in report.problems}
    assert found[("changed", f"metrics #{ids['metric']}")] == "value: chained 31.25, now 29.0"
    assert "started_by: chained" in found[("changed", f"runs #{ids['run']}")]
    assert "now 'mallory'" in found[("changed", f"runs #{ids['run']}")]
    assert len(report.problems) == 2


def test_verify_finds_deleted_and_slipped_in_rows(
    registry: Registry, tamper: Any
) -> None:
    ids = _history(registry)
    tamper.drop_guards()
    tamper.sql(f"DELETE FROM metrics WHERE id = {ids['metric']}")
    tamper.sql("INSERT INTO corrections (target_type, target_id, changes, reason, author, "
                 "created_at) VALUES ('run', 1, '{}', 'x', 'mallory', '2026-01-01 00:00:00')")
    kinds = {(p.kind, p.record) for p in registry.verify().problems}
    assert ("deleted", f"metrics #{ids['metric']}") in kinds
    assert ("unchained", "corrections #1") in kinds


def test_verify_detects_a_rewritten_ledger(registry: Registry, tamper: Any) -> None:
    ids = _history(registry)
    _, head = registry.head()
    tamper.drop_guards()
    # Edit a record and its chained copy consistently: the copy's hash no longer matches.
    tamper.sql(f"UPDATE metrics SET value = 1.0 WHERE id = {ids['metric']}")
    tamper.sql("UPDATE ledger SET payload = replace(payload, '31.25', '1.0') "
                 "WHERE record_type = 'metrics'")
    problems = registry.verify().problems
    assert any(p.kind == "chain" and "sha256" in p.detail for p in problems), problems
    assert not any(p.kind == "changed" for p in problems)
    # Re-hashing everything after the edit still leaves an old anchor unmatched.
    assert registry.verify(expected_head="f" * 64).problems[-1].kind == "anchor"
    assert all(p.kind != "anchor" for p in registry.verify(expected_head=head).problems)


def test_verify_rehashes_stored_files(registry: Registry, tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"weights")
    registry.upsert_artifact(kind="model", name="w", sha256=_sha("weights"),
                             size_bytes=7, uri=file.as_uri(), format="raw")
    registry.upsert_artifact(kind="model", name="gone", sha256=_sha("gone"),
                             size_bytes=4, uri=(tmp_path / "gone").as_uri(), format="raw")

    def rehash(location: ArtifactLocation) -> tuple[str, int]:
        path = Path(location.uri.removeprefix("file://"))
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), len(data)

    report = registry.verify(rehash=rehash)
    details = {p.record: p.detail for p in report.problems}
    assert report.files_checked == 1
    assert "stored content missing" in details["artifacts #2 (gone)"]
    assert "artifacts #1 (w)" not in details  # intact
    file.write_bytes(b"tampered")
    details = {p.record: p.detail for p in registry.verify(rehash=rehash).problems}
    assert "content differs" in details["artifacts #1 (w)"]


def test_a_run_ends_once(registry: Registry) -> None:
    ids = _history(registry)
    with pytest.raises(RunStateError, match="already succeeded"):
        registry.fail_run(ids["run"], "late failure")
    assert registry.get_run(ids["run"]).status == "succeeded"
    assert registry.verify().ok


def test_corrections_append_and_metrics_supersede(registry: Registry) -> None:
    ids = _history(registry)
    newer = registry.correct_metric(ids["metric"], 30.5, reason="evaluated on the full split",
                                    author="auditor-1")
    assert newer.supersedes_id == ids["metric"]
    current = registry.find_metrics(artifact_id=ids["out"], evaluator="perplexity", protocol={})
    assert [m.value for m in current] == [30.5]
    # the old measurement is still there, with the reason it was replaced
    assert [m.value for m in registry.metrics_for_artifact(ids["out"])] == [31.25, 30.5]
    note = registry.corrections_for("metric", ids["metric"])[0]
    assert note.changes == {"value": 30.5, "superseded_by": newer.id}
    assert note.author == "auditor-1"
    with pytest.raises(RegistryError, match="already corrected"):
        registry.correct_metric(ids["metric"], 1.0, reason="again")
    fix = registry.correct("artifact", ids["out"], {"name": "smollm2-w4"}, reason="typo")
    assert registry.corrections_for("artifact", ids["out"]) == [fix]
    with pytest.raises(RegistryError, match="no run with id 999"):
        registry.correct("run", 999, {"name": "x"}, reason="r")
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.correct("run", ids["run"], {"name": "x"}, reason=" ")
    assert registry.verify().ok


def test_migration_0002_keeps_and_chains_existing_history(db_url: str, tamper: Any) -> None:
    """A registry written by 0001 (runs updated in place) upgrades to completions and a valid
    chain, and downgrades back without losing the run's outcome."""
    migrate_module.upgrade(db_url, "0001")
    now = "'2026-11-01 10:00:00'"
    tamper.sql("INSERT INTO artifacts (kind, name, sha256, size_bytes, uri, format, metadata, "
                 f"created_at) VALUES ('model', 'base', '{_sha('b')}', 1, 'file:///b', 'hf', "
                 f"'{{}}', {now})")
    tamper.sql("INSERT INTO runs (job_id, kind, name, status, recipe, recipe_sha256, plugins, "
                 "versions, details, host, started_by, started_at, finished_at, error) VALUES "
                 f"('j', 'quantize', 'q', 'failed', '{{}}', '{_sha('r')}', '{{}}', '{{}}', "
                 f"'{{\"x\": 1}}', 'h', 'u', {now}, {now}, 'boom')")
    tamper.sql("INSERT INTO run_edges (run_id, artifact_id, direction, role) "
                 "VALUES (1, 1, 'input', 'base_model')")
    migrate_module.upgrade(db_url)
    with Registry.open(db_url) as reg:
        run = reg.get_run(1)
        assert (run.status, run.error, run.details) == ("failed", "boom", {"x": 1})
        report = reg.verify()
        assert report.ok, report.problems
        assert report.entries == 4  # artifact, run, edge, completion
        reg.start_run(job_id="j2", kind="quantize", name="q2", recipe={}, plugins={},
                      versions={})
        assert reg.verify().ok
    migrate_module.downgrade(db_url, "0001")
    engine = create_registry_engine(db_url, pooled=False)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, status, error FROM runs ORDER BY id")).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(1, "failed", "boom"), (2, "running", None)]


def test_verify_sees_a_changed_type(registry: Registry, tamper: Any) -> None:
    """4 -> 4.0 or true -> 1 compare equal in Python but change what searches find: verify
    compares canonical text, not dicts."""
    ids = _history(registry)
    tamper.drop_guards()
    tamper.sql(f"UPDATE runs SET recipe = '{{\"bits\": 4.0}}' WHERE id = {ids['run']}")
    problems = registry.verify().problems
    assert [(p.kind, p.record) for p in problems] == [("changed", f"runs #{ids['run']}")]
    assert "recipe: chained {'bits': 4}, now {'bits': 4.0}" in problems[0].detail
