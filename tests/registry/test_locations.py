"""Artifact locations on SQLite and PostgreSQL: recorded with a run's outputs or one by one,
read primary first, append-only and chained, re-hashed one by one by ``verify``."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import DatabaseError

from quantmill.registry import (
    ArtifactConflict,
    ArtifactLocation,
    ArtifactNotFound,
    NewArtifact,
    NewLocation,
    NewMetric,
    Registry,
)
from quantmill.registry import migrate as migrate_module
from quantmill.registry import verify as verify_module
from quantmill.registry.bulk import record_runs
from quantmill.registry.db import create_registry_engine
from quantmill.registry.export import check_lineage_json, lineage_json
from quantmill.registry.models import LedgerRow
from quantmill.registry.remote import InvalidRun, record_run
from quantmill.registry.writes import EndedRun, RunCompletion

S3 = {"backend": "s3", "endpoint_url": "http://127.0.0.1:8333", "region": "us-east-1"}


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def checkpoint(label: str = "ckpt", *locations: NewLocation, size: int = 6) -> NewArtifact:
    return NewArtifact(kind="checkpoint", name=label, sha256=sha(label), size_bytes=size,
                       uri=f"file:///store/{label}", format="gptq", role="model",
                       locations=locations)


def start(registry: Registry, name: str = "q") -> int:
    return registry.start_run(job_id="job", kind="quantize", name=name, recipe={},
                              plugins={}, versions={}).id


def ledger(url: str) -> list[tuple[str, int]]:
    """(record_type, record_id) of every link, in chain order."""
    engine = create_registry_engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(LedgerRow.record_type, LedgerRow.record_id)
                                      .order_by(LedgerRow.seq)).all()
    finally:
        engine.dispose()
    return [tuple(row) for row in rows]


def places(locations: list[ArtifactLocation]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(location.uri, location.role, location.details) for location in locations]


# --- recording ---------------------------------------------------------------------------------


def test_locations_are_recorded_with_a_run_output(registry: Registry, db_url: str) -> None:
    run_id = start(registry)
    primary = NewLocation("file:///store/ckpt", details={"backend": "local"})
    copy = NewLocation("s3://models/ckpt", role="copy", details=S3)
    registry.finish_run(run_id, outputs=[checkpoint("ckpt", primary, copy)])

    artifact = registry.get_artifact(sha("ckpt"))
    found = registry.locations(artifact.id)
    assert places(found) == [("file:///store/ckpt", "stored", {"backend": "local"}),
                             ("s3://models/ckpt", "copy", S3)]
    assert all(location.artifact_id == artifact.id for location in found)
    assert found[0].id is not None and found[0].id < found[1].id
    assert {location.created_by for location in found} == {registry.get_run(run_id).started_by}
    assert all(location.created_at is not None for location in found)
    # chained in the run's transaction, right after the artifact they belong to
    links = ledger(db_url)
    at = links.index(("artifacts", artifact.id))
    assert links[at + 1:at + 3] == [("artifact_locations", found[0].id),
                                    ("artifact_locations", found[1].id)]
    assert links[-1][0] == "run_completions"
    assert registry.verify().ok


def test_a_failed_finish_stores_no_location(registry: Registry) -> None:
    run_id = start(registry)
    before = registry.head()
    with pytest.raises(ArtifactNotFound):
        registry.finish_run(run_id, outputs=[checkpoint("ckpt", NewLocation("s3://m/ckpt"))],
                            metrics=[NewMetric(evaluator="e", name="n", value=1.0,
                                               artifact_sha256=sha("elsewhere"))])
    assert registry.head() == before
    assert registry.list_artifacts() == []
    assert registry.get_run(run_id).status == "running"


def test_an_existing_artifact_gains_new_locations_only(registry: Registry) -> None:
    first, second = start(registry, "first"), start(registry, "second")
    registry.finish_run(first, outputs=[checkpoint("ckpt", NewLocation("s3://a/ckpt"))])
    count, _ = registry.head()
    # another run cannot claim it (one producing run): nothing of that call is stored
    with pytest.raises(ArtifactConflict, match="was produced by run"):
        registry.finish_run(second, outputs=[checkpoint("ckpt", NewLocation("s3://c/ckpt"))])
    assert registry.head()[0] == count and registry.get_run(second).status == "running"
    # the same content registered again: one known place (skipped), one new place
    registry.upsert_artifact(kind="checkpoint", name="ckpt", sha256=sha("ckpt"), size_bytes=6,
                             uri="file:///store/ckpt", format="gptq",
                             locations=[NewLocation("s3://a/ckpt", role="published"),
                                        NewLocation("s3://b/ckpt")])
    assert places(registry.locations(sha("ckpt"))) == [
        ("file:///store/ckpt", "stored", {}), ("s3://a/ckpt", "stored", {}),
        ("s3://b/ckpt", "stored", {})]
    assert registry.head()[0] == count + 1  # the one new location
    assert registry.verify().ok


def test_upsert_artifact_records_locations(registry: Registry) -> None:
    made = registry.upsert_artifact(kind="model", name="m", sha256=sha("m"), size_bytes=1,
                                    uri="file:///m", format="hf",
                                    locations=[NewLocation("s3://x/m", "published", S3)])
    again = registry.upsert_artifact(kind="model", name="other", sha256=sha("m"), size_bytes=1,
                                     uri="file:///elsewhere", format="hf",
                                     locations=[NewLocation("s3://x/m"),
                                                NewLocation("s3://y/m", "copy")])
    assert again == made
    assert places(registry.locations(made.id)) == [
        ("file:///m", "stored", {}), ("s3://x/m", "published", S3), ("s3://y/m", "copy", {})]


def test_add_location_is_idempotent(registry: Registry) -> None:
    artifact = registry.upsert_artifact(kind="model", name="m", sha256=sha("m"), size_bytes=1,
                                        uri="file:///m", format="hf")
    added = registry.add_location(artifact.id, "s3://x/m", details=S3)
    assert (added.artifact_id, added.uri, added.role, added.details) == (
        artifact.id, "s3://x/m", "copy", S3)
    count, head = registry.head()
    # again, by sha256 prefix and with another role: the first record, nothing appended
    assert registry.add_location(sha("m")[:8], "s3://x/m", role="published") == added
    assert registry.head() == (count, head)
    assert [location.id for location in registry.locations(artifact.id)] == [None, added.id]
    with pytest.raises(ArtifactNotFound):
        registry.add_location(999, "s3://x/m")
    with pytest.raises(ValueError, match="role 'mirror'"):
        registry.add_location(artifact.id, "s3://z/m", role="mirror")
    assert registry.head() == (count, head)
    assert registry.verify().ok


def test_locations_order_and_the_synthesized_primary(registry: Registry) -> None:
    artifact = registry.upsert_artifact(kind="model", name="m", sha256=sha("m"), size_bytes=1,
                                        uri="file:///m", format="hf")
    [primary] = registry.locations(artifact.id)
    assert primary == ArtifactLocation(id=None, artifact_id=artifact.id, uri="file:///m",
                                       role="stored", details={}, created_by=None,
                                       created_at=None)
    assert primary.to_json()["created_at"] is None
    second = registry.add_location(artifact.id, "s3://b/m")
    first = registry.add_location(artifact.id, "s3://a/m")
    assert [loc.uri for loc in registry.locations(artifact.id)] == [
        "file:///m", "s3://b/m", "s3://a/m"]
    # a record of the primary uri, made last, still comes first and replaces the synthesized one
    named = registry.add_location(artifact.id, "file:///m", role="stored", details={"n": 1})
    assert registry.locations(sha("m")) == [named, second, first]
    with pytest.raises(ArtifactNotFound):
        registry.locations(12345)


# --- inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arguments", "message"), [
    ({"uri": "s3://x/m", "role": "mirror"}, "role 'mirror'"),
    ({"uri": " "}, "non-empty uri"),
    ({"uri": "s3://x/m", "details": {"aws_secret_access_key": "k"}}, "look"),
    ({"uri": "s3://x/m", "details": {"auth": {"Token": "t"}}}, "details.auth.Token"),
    ({"uri": "https://user:pw@host/m"}, "credentials"),
    ({"uri": "https://host/m?X-Amz-Signature=abc&X-Amz-Credential=id"}, "X-Amz-Signature"),
    ({"uri": "https://account.blob.core.windows.net/c/m?sv=2024-01-01&sig=abc"}, "sig"),
])
def test_new_location_refuses_bad_roles_and_secrets(arguments: dict[str, Any],
                                                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NewLocation(**arguments)


def test_new_artifact_takes_only_new_locations() -> None:
    made = checkpoint("c", NewLocation("s3://x/c"))
    assert made.locations == (NewLocation("s3://x/c"),)
    listed = NewArtifact(kind="k", name="n", sha256=sha("n"), size_bytes=1, uri="u", format="f",
                         role="r", locations=[NewLocation("s3://x/n")])  # type: ignore[arg-type]
    assert isinstance(listed.locations, tuple)
    with pytest.raises(TypeError, match="NewLocation"):
        NewArtifact(kind="k", name="n", sha256=sha("n"), size_bytes=1, uri="u", format="f",
                    role="r", locations=({"uri": "s3://x/n"},))  # type: ignore[arg-type]


# --- append-only and tamper evidence -----------------------------------------------------------


@pytest.mark.parametrize("statement", [
    "UPDATE artifact_locations SET uri = 's3://elsewhere/ckpt'",
    "UPDATE artifact_locations SET details = '{}'",
    "DELETE FROM artifact_locations",
])
def test_location_rows_refuse_update_and_delete(registry: Registry, tamper: Any,
                                                statement: str) -> None:
    registry.finish_run(start(registry), outputs=[checkpoint(
        "ckpt", NewLocation("s3://m/ckpt", details=S3))])
    with pytest.raises(DatabaseError, match="append-only"):
        tamper.sql(statement)
    assert places(registry.locations(sha("ckpt")))[1] == ("s3://m/ckpt", "stored", S3)
    assert registry.verify().ok


def test_verify_reports_a_location_edited_behind_the_stores_back(
    registry: Registry, tamper: Any
) -> None:
    artifact = registry.upsert_artifact(kind="model", name="m", sha256=sha("m"), size_bytes=1,
                                        uri="file:///m", format="hf")
    location = registry.add_location(artifact.id, "s3://x/m", details=S3)
    tamper.drop_guards()
    tamper.sql(f"UPDATE artifact_locations SET uri = 's3://evil/m' WHERE id = {location.id}")
    tamper.sql("INSERT INTO artifact_locations (artifact_id, uri, role, details, created_by, "
               f"created_at) VALUES ({artifact.id}, 's3://sneaked/m', 'copy', '{{}}', "
               "'mallory', '2026-01-01 00:00:00')")
    problems = {(p.kind, p.record): p.detail for p in registry.verify().problems}
    assert problems[("changed", f"artifact_locations #{location.id}")] == (
        "uri: chained 's3://x/m', now 's3://evil/m'")
    assert ("unchained", f"artifact_locations #{location.id + 1}") in problems
    assert len(problems) == 2


# --- verify --files ----------------------------------------------------------------------------


class FileRehash:
    """Re-hashes ``file://`` locations and remembers every location it was asked for."""

    def __init__(self) -> None:
        self.seen: list[ArtifactLocation] = []

    def __call__(self, location: ArtifactLocation) -> tuple[str, int]:
        self.seen.append(location)
        data = Path(location.uri.removeprefix("file://")).read_bytes()
        return hashlib.sha256(data).hexdigest(), len(data)


def test_verify_files_rehashes_every_location(registry: Registry, tmp_path: Path) -> None:
    for name in ("a", "a-copy", "b"):
        (tmp_path / name).write_bytes(b"weights" if name.startswith("a") else b"bias")
    a = registry.upsert_artifact(kind="model", name="a", sha256=sha("weights"), size_bytes=7,
                                 uri=(tmp_path / "a").as_uri(), format="raw")
    copy = registry.add_location(a.id, (tmp_path / "a-copy").as_uri(), details={"n": 1})
    gone = registry.add_location(a.id, (tmp_path / "gone").as_uri())
    b = registry.upsert_artifact(kind="model", name="b", sha256=sha("bias"), size_bytes=4,
                                 uri=(tmp_path / "b").as_uri(), format="raw")

    rehash = FileRehash()
    report = registry.verify(rehash=rehash)
    assert [(loc.artifact_id, loc.uri) for loc in rehash.seen] == [
        (a.id, a.uri), (a.id, copy.uri), (a.id, gone.uri), (b.id, b.uri)]
    assert rehash.seen[1] == copy  # the full record, details included, reaches the rehash
    assert report.files_checked == 3
    assert [(p.kind, p.record, p.detail) for p in report.problems] == [
        ("file", f"artifacts #{a.id} (a)", f"stored content missing: {gone.uri}")]

    (tmp_path / "a-copy").write_bytes(b"tampered")
    [differs, missing] = registry.verify(rehash=FileRehash()).problems
    assert differs.record == f"artifacts #{a.id} (a)"
    assert differs.detail.startswith("content differs: registered sha256")
    assert differs.detail.endswith(f"8 bytes at {copy.uri}")
    assert missing.detail == f"stored content missing: {gone.uri}"


def test_verify_files_reads_locations_in_batches(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handful of queries per batch of artifacts, not one per artifact."""
    monkeypatch.setattr(verify_module, "FILE_BATCH", 2)
    total = 5
    for index in range(total):
        file = tmp_path / f"w{index}"
        file.write_bytes(f"w{index}".encode())
        made = registry.upsert_artifact(kind="model", name=f"w{index}", sha256=sha(f"w{index}"),
                                        size_bytes=2, uri=file.as_uri(), format="raw")
        registry.add_location(made.id, file.as_uri())  # the primary, recorded
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(registry._engine, "before_cursor_execute", count)
    try:
        report = verify_module.VerifyReport()
        rehash = FileRehash()
        with registry.session() as session:
            verify_module.verify_files(session, rehash, report)
    finally:
        event.remove(registry._engine, "before_cursor_execute", count)
    assert report.ok and report.files_checked == total == len(rehash.seen)
    selects = [statement for statement in statements if statement.startswith("SELECT")]
    # per batch the artifacts and their locations, plus the final empty read of artifacts
    assert len(selects) == 2 * math.ceil(total / 2) + 1, selects


# --- other write paths -------------------------------------------------------------------------


def test_bulk_records_locations_as_the_per_run_calls_do(
    databases: Any, open_registry: Callable[[str], Registry], backend: str
) -> None:
    def records() -> list[EndedRun]:
        common: dict[str, Any] = {"job_id": "j", "kind": "quantize", "recipe": {},
                                  "plugins": {}, "versions": {},
                                  "completion": RunCompletion("succeeded")}
        return [
            EndedRun(name="one", **common, outputs=(
                checkpoint("c1", NewLocation("file:///store/c1", details={"n": 1}),
                           NewLocation("s3://m/c1", "copy", S3)),
                checkpoint("c2"))),
            EndedRun(name="two", **common, outputs=(
                checkpoint("c3", NewLocation("s3://m/c3", "published"),
                           NewLocation("s3://n/c3", "published")),
                checkpoint("c4", NewLocation("s3://m/c4"), NewLocation("s3://m/c4")))),
        ]

    per_run_url, bulk_url = databases.create(backend), databases.create(backend)
    per_run, bulk = open_registry(per_run_url), open_registry(bulk_url)
    for record in records():
        per_run.finish_run(start(per_run, record.name), outputs=record.outputs)
    record_runs(bulk, records())

    def stored(registry: Registry) -> dict[Any, dict[str, Any]]:
        """Location records by id (the synthesized primary ones by uri), without the time (ids
        may differ: a skipped insert uses up a PostgreSQL sequence value)."""
        return {location.id or location.uri: {k: v for k, v in location.to_json().items()
                                              if k not in ("id", "created_at")}
                for label in ("c1", "c2", "c3", "c4")
                for location in registry.locations(sha(label))}

    def chained(registry: Registry, url: str) -> list[tuple[str, Any]]:
        """The ledger in order, location links as their records' content."""
        records = stored(registry)
        return [(kind, records[ref] if kind == "artifact_locations" else None)
                for kind, ref in ledger(url)]

    assert list(stored(bulk).values()) == list(stored(per_run).values())
    assert [loc["uri"] for loc in stored(bulk).values()] == [
        "file:///store/c1", "s3://m/c1", "file:///store/c2", "file:///store/c3", "s3://m/c3",
        "s3://n/c3", "file:///store/c4", "s3://m/c4"]
    # the same records, chained at the same places
    assert chained(bulk, bulk_url) == chained(per_run, per_run_url)
    assert sum(kind == "artifact_locations" for kind, _ in chained(bulk, bulk_url)) == 5
    assert bulk.verify().ok


def test_record_run_takes_locations_as_plain_data(registry: Registry) -> None:
    output = {"kind": "checkpoint", "name": "c", "sha256": sha("c"), "size_bytes": 1,
              "uri": "s3://bucket/c", "format": "gptq", "role": "checkpoint",
              "locations": [{"uri": "s3://bucket/c", "details": S3},
                            {"uri": "s3://mirror/c", "role": "copy"}]}
    body: dict[str, Any] = {"job_id": "j", "kind": "k", "name": "n", "recipe": {},
                            "plugins": {}, "versions": {}, "outputs": [output],
                            "completion": {"status": "succeeded"}}
    record_run(registry, body, started_by="token:worker-1")
    found = registry.locations(sha("c"))
    assert places(found) == [("s3://bucket/c", "stored", S3), ("s3://mirror/c", "copy", {})]
    assert {location.created_by for location in found} == {"token:worker-1"}

    before = registry.head()
    for bad, message in ((
            {"uri": "s3://x/c", "role": "mirror"}, r"outputs\[0\].locations\[0\]: location role"),
            ({"uri": "s3://x/c", "colour": "red"}, "unknown field"),
            ({"uri": "s3://x/c", "details": {"v": math.nan}}, "NaN")):
        output["locations"] = [bad]
        with pytest.raises(InvalidRun, match=message):
            record_run(registry, body, started_by="token:worker-1")
    assert registry.head() == before


def test_export_lists_and_checks_locations(registry: Registry) -> None:
    registry.finish_run(start(registry), outputs=[checkpoint(
        "ckpt", NewLocation("s3://m/ckpt", "published", S3))])
    artifact = registry.get_artifact(sha("ckpt"))
    doc = lineage_json(registry, registry.upstream(artifact.id))
    [exported] = doc["locations"]
    assert (exported["artifact_id"], exported["uri"], exported["details"]) == (
        artifact.id, "s3://m/ckpt", S3)
    assert ("artifact_locations", exported["id"]) in {
        (link["record_type"], link["record_id"]) for link in doc["ledger"]["records"]}
    assert check_lineage_json(doc, registry) == []
    exported["uri"] = "s3://evil/ckpt"
    assert check_lineage_json(doc) == [
        f"artifact_locations #{exported['id']}: uri is 's3://evil/ckpt' in the export but "
        "'s3://m/ckpt' in the chained copy"]


def test_upgrade_needs_no_backfill(db_url: str, tamper: Any) -> None:
    """An artifact registered before locations existed reads its uri as its one location, and
    its history still verifies."""
    migrate_module.upgrade(db_url, "0001")
    tamper.sql("INSERT INTO artifacts (kind, name, sha256, size_bytes, uri, format, metadata, "
               f"created_at) VALUES ('model', 'old', '{sha('old')}', 1, 'file:///old', 'hf', "
               "'{}', '2026-11-01 10:00:00')")
    migrate_module.upgrade(db_url)
    with Registry.open(db_url) as registry:
        assert places(registry.locations(sha("old"))) == [("file:///old", "stored", {})]
        registry.add_location(sha("old"), "s3://m/old")
        report = registry.verify()
        assert report.ok, report.problems
        assert report.entries == 2  # the old artifact (chained by 0002) and the new location
