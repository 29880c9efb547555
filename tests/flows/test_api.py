"""The registry's HTTP API on SQLite and PostgreSQL: tokens and roles, every attack from issue #5
(each answered with a 4xx and a message, and changing nothing), a remote worker registering a run
that an auditor then sees, the OpenAPI schema, and the ``serve``/``token`` commands."""

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from typer.testing import CliRunner

from quantmill.flows.api import create_app
from quantmill.flows.cli import app as cli_app
from quantmill.registry import (
    Artifact,
    NewArtifact,
    NewMetric,
    Registry,
    SchemaOutdated,
    head_revision,
)
from quantmill.registry.migrate import upgrade
from quantmill.registry.tokens import create_token, list_tokens, revoke_token

# The registry tests' database fixtures (SQLite and PostgreSQL, created and dropped per test),
# loaded by path: tests/ is not a package, and a conftest of another folder is not visible here.
_spec = importlib.util.spec_from_file_location(
    "quantmill_tests_registry_conftest", Path(__file__).parents[1] / "registry" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_registry_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_registry_fixtures)
databases = _registry_fixtures.databases
backend = _registry_fixtures.backend
db_url = _registry_fixtures.db_url
registry = _registry_fixtures.registry

ALL_TABLES = ("artifacts", "runs", "run_edges", "run_completions", "metrics", "corrections",
              "api_tokens", "api_token_revocations", "ledger")
READ_ROUTES = ["/artifacts", "/artifacts/1", "/artifacts/1/lineage", "/runs", "/runs/1",
               "/compare?a=1&b=2"]
AUDIT_ROUTES = ["/artifacts/1/export", "/artifacts/1/export?format=prov", "/verify"]
SQL_ATTACKS = ["' OR 1=1 --", "%", "_", ";", "'; DROP TABLE artifacts; --", '" OR ""="',
               "\\", "*", "1 UNION SELECT sha256 FROM artifacts", "\x00"]


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class World:
    """A registry with a base model, a data set, one quantization run and two tokens."""

    registry: Registry
    client: TestClient
    auditor: str
    writer: str
    base: Artifact
    dataset: Artifact
    checkpoint: Artifact
    run_id: int

    def get(self, path: str, token: str | None = None, **kwargs: Any) -> Any:
        headers = bearer(token) if token else {}
        response = self.client.get(path, headers=headers, **kwargs)
        assert response.status_code != 500, response.text
        return response

    def post_run(self, body: Any, token: str | None = None, **kwargs: Any) -> Any:
        headers = bearer(token) if token else {}
        response = self.client.post("/runs", json=body, headers=headers, **kwargs)
        assert response.status_code != 500, response.text
        return response


def seed(registry: Registry) -> tuple[Artifact, Artifact, Artifact, int]:
    base = registry.upsert_artifact(kind="model", name="smollm2-base", sha256=sha("base"),
                                    size_bytes=100, uri="file:///base", format="gguf")
    dataset = registry.upsert_artifact(kind="dataset", name="wikitext-test",
                                       sha256=sha("data"), size_bytes=20, uri="file:///data",
                                       format="text")
    run = registry.start_run(job_id="job-1", kind="quantization", name="rtn-4bit",
                             recipe={"quantization": {"method": "rtn", "bits": 4}},
                             plugins={"rtn": "0.1.0"}, versions={"quantmill": "0.1.0"},
                             inputs=[(base.id, "model"), (dataset.id, "calibration")])
    registry.finish_run(run.id, outputs=[NewArtifact(
        kind="checkpoint", name="smollm2-rtn4", sha256=sha("ckpt"), size_bytes=50,
        uri="file:///ckpt", format="gptq", role="checkpoint",
        metadata={"method": "rtn", "bits": 4})], metrics=[NewMetric(
            evaluator="perplexity", name="perplexity", value=27.5, artifact_sha256=sha("ckpt"),
            dataset_artifact_id=dataset.id)])
    return base, dataset, registry.get_artifact(sha("ckpt")), run.id


def stored_remote_checkpoint() -> str:
    """The content ``remote_run`` claims, stored in the default (local) storage: its URI."""
    from quantmill.storage.local import LocalStorage

    storage = LocalStorage()
    if not storage.object_path(sha("remote")).exists():
        source = storage.root.parent / "remote-upload"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(b"remote")
        storage.put_tree(source, consume=True)
    return storage.object_path(sha("remote")).as_uri()


@pytest.fixture
def world(registry: Registry, db_url: str, quantmill_home: Path) -> Iterator[World]:
    stored_remote_checkpoint()
    base, dataset, checkpoint, run_id = seed(registry)
    auditor, _ = create_token(registry, "auditor-1", "auditor")
    writer, _ = create_token(registry, "writer-1", "writer")
    with TestClient(create_app(db_url)) as client:
        yield World(registry, client, auditor, writer, base, dataset, checkpoint, run_id)


def state(registry: Registry) -> tuple[Any, dict[str, int]]:
    """The ledger head and every table's row count: equal before and after = nothing written."""
    with registry.session() as session:
        counts = {table: session.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
                  for table in ALL_TABLES}
    return registry.head(), counts


def assert_unchanged(registry: Registry, before: tuple[Any, dict[str, int]]) -> None:
    assert state(registry) == before
    assert registry.verify().ok


def remote_run(base_ref: int | str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": "remote-job",
        "kind": "quantization",
        "name": "gptq-3bit",
        "recipe": {"quantization": {"method": "gptq", "bits": 3}},
        "plugins": {"gptq": "0.1.0"},
        "versions": {"quantmill": "0.1.0", "torch": "2.13.0"},
        "host": "gpu-node-7",
        "inputs": [{"artifact": base_ref, "role": "model"}],
        "outputs": [{"kind": "checkpoint", "name": "smollm2-gptq3", "sha256": sha("remote"),
                     "size_bytes": 6, "uri": stored_remote_checkpoint(), "format": "gptq",
                     "role": "checkpoint", "metadata": {"method": "gptq", "bits": 3}}],
        "metrics": [{"evaluator": "perplexity", "name": "perplexity", "value": 31,
                     "artifact_sha256": sha("remote")}],
        "completion": {"status": "succeeded", "details": {"seconds": 61.5}},
    }
    body.update(changes)
    return body


# --- the service -------------------------------------------------------------------------------


def test_openapi_schema_is_served_and_lists_the_routes(world: World) -> None:
    schema = world.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/health", "/artifacts", "/artifacts/{ref}", "/artifacts/{ref}/lineage",
                 "/artifacts/{ref}/export", "/runs", "/runs/{run_id}", "/compare", "/verify"):
        assert path in paths, path
    assert {"get", "post"} <= set(paths["/runs"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    run_in = schema["components"]["schemas"]["RunIn"]
    assert run_in["additionalProperties"] is False and "completion" in run_in["required"]
    assert "limit" in {p["name"] for p in paths["/artifacts"]["get"]["parameters"]}
    assert world.get("/docs").status_code == 200


def test_health_needs_no_token_and_shows_no_data(world: World) -> None:
    response = world.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "schema_revision": head_revision()}


def test_the_service_refuses_a_database_whose_schema_is_behind(db_url: str) -> None:
    with pytest.raises(SchemaOutdated, match="create it with: quantmill registry upgrade"):
        create_app(db_url)  # empty: the service never creates a schema
    upgrade(db_url, "0001")
    with pytest.raises(SchemaOutdated, match="at schema revision '0001'.*quantmill registry "
                                             "upgrade --database-url"):
        create_app(db_url)


# --- tokens and roles ----------------------------------------------------------------------------


def test_no_token_no_data(world: World) -> None:
    before = state(world.registry)
    for path in [*READ_ROUTES, *AUDIT_ROUTES]:
        response = world.get(path)
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "missing bearer token" in response.json()["detail"]
        assert set(response.json()) == {"detail"}
    response = world.post_run(remote_run(world.base.id))
    assert response.status_code == 401 and "missing bearer token" in response.json()["detail"]
    assert_unchanged(world.registry, before)


@pytest.mark.parametrize("header", ["Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer ", "Token qm_x",
                                    "qm_abc"])
def test_malformed_authorization_headers_are_refused(world: World, header: str) -> None:
    before = state(world.registry)
    for path in ["/artifacts", "/verify"]:
        response = world.client.get(path, headers={"Authorization": header})
        assert response.status_code == 401
        assert "malformed Authorization header" in response.json()["detail"]
    response = world.client.post("/runs", json=remote_run(world.base.id),
                                 headers={"Authorization": header})
    assert response.status_code == 401
    assert_unchanged(world.registry, before)


def test_oversized_and_over_nested_bodies_are_refused(world: World,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The body cap applies before FastAPI parses anything, so before the token check: a
    stranger cannot make the server buffer a huge body. Deep JSON is refused by name."""
    from quantmill.flows import api_limits

    before = state(world.registry)
    big = b"{" + b" " * (api_limits.MAX_BODY_BYTES + 1) + b"}"
    for token in (None, world.writer):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = world.client.post("/runs", content=big, headers=headers)
        assert response.status_code == 413
        assert "request body larger than" in response.json()["detail"]
    nested: Any = 1
    for _ in range(200):
        nested = {"a": nested}
    response = world.post_run(remote_run(world.base.id, recipe=nested), world.writer)
    assert response.status_code == 422 and "nested deeper than" in response.json()["detail"]
    # a lone surrogate, escaped in the JSON text (it cannot be encoded raw)
    escaped = json.dumps(remote_run(world.base.id, name="bad \ud800"))
    response = world.client.post("/runs", content=escaped, headers={
        **bearer(world.writer), "Content-Type": "application/json"})
    assert response.status_code == 422 and "name" in response.json()["detail"]
    assert_unchanged(world.registry, before)


@pytest.mark.parametrize("token", ["qm_unknown", "qm_" + "A" * 43, "not-ours", "' OR 1=1 --",
                                   "qm_%", "x" * 5000])
def test_unknown_tokens_are_refused(world: World, token: str) -> None:
    before = state(world.registry)
    for path in [*READ_ROUTES, *AUDIT_ROUTES]:
        response = world.get(path, token)
        assert response.status_code == 401, path
        assert response.json() == {"detail": "the bearer token is unknown or revoked"}
    assert world.post_run(remote_run(world.base.id), token).status_code == 401
    assert_unchanged(world.registry, before)


def test_a_revoked_token_stops_working_at_once(world: World) -> None:
    assert world.get("/artifacts", world.writer).status_code == 200
    assert world.get("/verify", world.auditor).status_code == 200
    revoke_token(world.registry, "writer-1", reason="worker retired")
    revoke_token(world.registry, "auditor-1", reason="audit over")
    before = state(world.registry)
    for token in (world.writer, world.auditor):
        for path in ["/artifacts", "/runs/1", "/verify"]:
            response = world.get(path, token)
            assert response.status_code == 401
            assert "unknown or revoked" in response.json()["detail"]
    assert world.post_run(remote_run(world.base.id), world.writer).status_code == 401
    assert_unchanged(world.registry, before)


def test_an_auditor_token_cannot_register_runs(world: World) -> None:
    before = state(world.registry)
    response = world.post_run(remote_run(world.base.id), world.auditor)
    assert response.status_code == 403
    assert response.json()["detail"] == ("this route needs a writer token; token 'auditor-1' "
                                         "is an auditor token")
    # Refused before the body is even looked at: an invalid one gets the same answer.
    assert world.post_run({"nonsense": True}, world.auditor).status_code == 403
    assert_unchanged(world.registry, before)


def test_a_writer_token_cannot_use_the_auditor_routes(world: World) -> None:
    before = state(world.registry)
    for path in AUDIT_ROUTES:
        response = world.get(path, world.writer)
        assert response.status_code == 403, path
        assert "needs an auditor token; token 'writer-1' is a writer token" in (
            response.json()["detail"])
    assert_unchanged(world.registry, before)


def test_both_roles_read(world: World) -> None:
    for token in (world.auditor, world.writer):
        for path in READ_ROUTES:
            assert world.get(path, token).status_code == 200, path


# --- reading -----------------------------------------------------------------------------------


def test_artifact_detail_by_id_and_sha256_prefix(world: World) -> None:
    by_id = world.get(f"/artifacts/{world.checkpoint.id}", world.auditor).json()
    by_prefix = world.get(f"/artifacts/{sha('ckpt')[:8]}", world.auditor).json()
    assert by_id == by_prefix
    assert by_id["artifact"]["sha256"] == sha("ckpt")
    assert [(m["name"], m["value"]) for m in by_id["metrics"]] == [("perplexity", 27.5)]
    assert by_id["corrections"] == []


def test_search_filters_and_pages(world: World) -> None:
    def names(**params: Any) -> list[str]:
        response = world.get("/artifacts", world.auditor, params=params)
        assert response.status_code == 200, response.text
        return [item["name"] for item in response.json()["items"]]

    assert names(kind="checkpoint", bits=4, method="rtn") == ["smollm2-rtn4"]
    assert names(metric=["perplexity<30", "perplexity>=27.5"]) == ["smollm2-rtn4"]
    assert names(metric="perplexity<27") == []
    assert names(base_model=str(world.base.id)) == ["smollm2-rtn4"]
    assert names(base_model=sha("base")[:6]) == ["smollm2-rtn4"]
    assert names(name="wiki") == ["wikitext-test"]
    page = world.get("/artifacts", world.auditor, params={"limit": 2}).json()
    assert (page["total"], len(page["items"]), page["next_offset"]) == (3, 2, 2)
    rest = world.get("/artifacts", world.auditor, params={"limit": 2, "offset": 2}).json()
    assert len(rest["items"]) == 1 and rest["next_offset"] is None


def test_lineage_runs_and_compare(world: World) -> None:
    graph = world.get(f"/artifacts/{world.checkpoint.id}/lineage", world.writer).json()
    assert {a["id"] for a in graph["artifacts"]} == {world.base.id, world.dataset.id,
                                                     world.checkpoint.id}
    assert [r["id"] for r in graph["runs"]] == [world.run_id]
    down = world.get(f"/artifacts/{world.base.id}/lineage", world.writer,
                     params={"direction": "downstream", "depth": 1}).json()
    assert {a["id"] for a in down["artifacts"]} == {world.base.id, world.checkpoint.id}
    run = world.get(f"/runs/{world.run_id}", world.writer).json()
    assert run["run"]["status"] == "succeeded" and len(run["edges"]) == 3
    listed = world.get("/runs", world.writer, params={"status": "succeeded"}).json()
    assert [r["id"] for r in listed["items"]] == [world.run_id]
    assert world.get("/runs", world.writer, params={"job_id": "other"}).json()["items"] == []
    compared = world.get("/compare", world.auditor,
                         params={"a": world.base.id, "b": world.checkpoint.id}).json()
    assert compared["b"]["artifact"]["id"] == world.checkpoint.id


def test_audit_routes(world: World) -> None:
    report = world.get("/verify", world.auditor).json()
    assert report["ok"] is True and report["problems"] == []
    assert report["head"] == {"entries": world.registry.head()[0],
                              "hash": world.registry.head()[1]}
    anchored = world.get("/verify", world.auditor, params={"expected_head": sha("nope")}).json()
    assert anchored["ok"] is False and anchored["problems"][0]["kind"] == "anchor"
    bad = world.get("/verify", world.auditor, params={"expected_head": "' OR 1=1 --"})
    assert bad.status_code == 422 and "expected_head" in bad.json()["detail"]
    exported = world.get(f"/artifacts/{world.checkpoint.id}/export", world.auditor).json()
    assert {a["id"] for a in exported["artifacts"]} >= {world.base.id, world.checkpoint.id}
    prov = world.get(f"/artifacts/{world.checkpoint.id}/export", world.auditor,
                     params={"format": "prov"}).json()
    assert "entity" in prov and "activity" in prov
    assert world.get(f"/artifacts/{world.checkpoint.id}/export", world.auditor,
                     params={"format": "xml"}).status_code == 422


# --- bad input -----------------------------------------------------------------------------------


def test_unknown_artifacts_and_runs_are_404(world: World) -> None:
    before = state(world.registry)
    cases = {
        "/artifacts/999999": "no artifact with id 999999",
        "/artifacts/0": "no artifact with id 0",
        "/artifacts/abcdef123": "no artifact with a sha256 starting with 'abcdef123'",
        "/artifacts/99999/lineage": "no artifact with id 99999",
        "/runs/99999": "no run with id 99999",
        "/compare?a=1&b=99999": "99999",
    }
    for path, message in cases.items():
        response = world.get(path, world.auditor)
        assert response.status_code == 404, path
        assert message in response.json()["detail"], path
    response = world.get("/artifacts/99999/export", world.auditor)
    assert response.status_code == 404 and "no artifact" in response.json()["detail"]
    assert_unchanged(world.registry, before)


def test_an_ambiguous_sha256_prefix_is_409(world: World) -> None:
    for label in ("a", "b"):
        world.registry.upsert_artifact(kind="model", name=label, sha256="abcdef" + sha(label)[6:],
                                       size_bytes=1, uri="file:///x", format="gguf")
    before = state(world.registry)
    response = world.get("/artifacts/abcdef", world.auditor)
    assert response.status_code == 409 and "give more characters" in response.json()["detail"]
    assert_unchanged(world.registry, before)


@pytest.mark.parametrize("metric", ["perplexity", "perplexity<<3", "perplexity<abc", "<3",
                                    "perplexity<nan", "perplexity<inf", "' OR 1=1 --", "",
                                    "perplexity<3; DROP TABLE metrics"])
def test_malformed_metric_filters_are_422(world: World, metric: str) -> None:
    before = state(world.registry)
    response = world.get("/artifacts", world.auditor, params={"metric": metric})
    assert response.status_code == 422
    assert "metric filter" in response.json()["detail"]
    assert_unchanged(world.registry, before)


@pytest.mark.parametrize(("params", "named"), [
    ({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"limit": -1}, "limit"),
    ({"offset": -1}, "offset"), ({"limit": "ten"}, "limit"), ({"offset": 2**70}, "offset"),
    ({"bits": 0}, "bits"), ({"bits": 99}, "bits"), ({"created_after": "yesterday"},
                                                     "created_after"),
    ({"created_after": "2030-01-01T00:00:00", "created_before": "2020-01-01T00:00:00"},
     "created_after"),
    ({"base_model": "xyz"}, "base_model"),
])
def test_invalid_search_parameters_are_422(world: World, params: dict, named: str) -> None:
    before = state(world.registry)
    response = world.get("/artifacts", world.auditor, params=params)
    assert response.status_code == 422
    assert named in response.json()["detail"]
    assert isinstance(response.json()["detail"], str)
    assert_unchanged(world.registry, before)


def test_page_bounds_on_runs_and_the_largest_page(world: World) -> None:
    for params in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"status": "done"}):
        response = world.get("/runs", world.auditor, params=params)
        assert response.status_code == 422, params
    assert world.get("/artifacts", world.auditor, params={"limit": 500}).status_code == 200
    for path in ("/runs/0", "/runs/-1", "/runs/abc", f"/runs/{2**64}"):
        assert world.get(path, world.auditor).status_code == 422, path


def test_sql_metacharacters_in_every_filter_and_path_change_nothing(world: World) -> None:
    before = state(world.registry)
    artifact_filters = ["kind", "format", "method", "name", "base_model", "metric", "bits",
                        "created_after", "created_before", "limit", "offset"]
    for attack in SQL_ATTACKS:
        for name in artifact_filters:
            value = f"{attack}<3" if name == "metric" else attack
            response = world.get("/artifacts", world.auditor, params={name: value})
            assert response.status_code in (200, 404, 422), (name, attack, response.text)
            if response.status_code == 200:
                assert response.json()["items"] == [], (name, attack)
            else:
                assert response.json()["detail"], (name, attack)
        for name in ("job_id", "kind", "status", "limit", "offset"):
            response = world.get("/runs", world.auditor, params={name: attack})
            assert response.status_code in (200, 422), (name, attack)
            if response.status_code == 200:
                assert response.json()["items"] == []
        for params in ({"a": attack, "b": "1"}, {"a": "1", "b": attack}):
            response = world.get("/compare", world.auditor, params=params)
            assert response.status_code in (404, 422), (params, response.text)
        for name in ("direction", "depth", "format"):
            response = world.get(f"/artifacts/{world.checkpoint.id}/export", world.auditor,
                                 params={name: attack})
            assert response.status_code == 422, (name, attack)
        response = world.get("/verify", world.auditor, params={"expected_head": attack})
        assert response.status_code == 422, attack
        encoded = quote(attack, safe="")
        for path in (f"/artifacts/{encoded}", f"/artifacts/{encoded}/lineage",
                     f"/artifacts/{encoded}/export", f"/runs/{encoded}"):
            response = world.get(path, world.auditor)
            assert 400 <= response.status_code < 500, (path, response.text)
            assert response.json()["detail"], path
    assert_unchanged(world.registry, before)
    assert len(world.registry.list_artifacts()) == 3


# --- a remote worker -----------------------------------------------------------------------------


def test_a_writer_registers_a_run_and_an_auditor_sees_its_lineage(world: World) -> None:
    entries_before = world.registry.head()[0]
    response = world.post_run(remote_run(sha("base")[:8]), world.writer)
    assert response.status_code == 201, response.text
    created = response.json()
    run = created["run"]
    assert (run["status"], run["started_by"], run["host"]) == (
        "succeeded", "token:writer-1", "gpu-node-7")
    assert run["details"] == {"seconds": 61.5}
    output = world.registry.get_artifact(sha("remote"))
    assert {(e["direction"], e["artifact_id"]) for e in created["edges"]} == {
        ("input", world.base.id), ("output", output.id)}
    assert [(m["name"], m["value"]) for m in created["metrics"]] == [("perplexity", 31.0)]

    graph = world.get(f"/artifacts/{output.id}/lineage", world.auditor).json()
    assert {a["id"] for a in graph["artifacts"]} == {world.base.id, output.id}
    assert [r["started_by"] for r in graph["runs"]] == ["token:writer-1"]
    down = world.get(f"/artifacts/{world.base.id}/lineage", world.auditor,
                     params={"direction": "downstream"}).json()
    assert {a["id"] for a in down["artifacts"]} == {world.base.id, world.checkpoint.id,
                                                    output.id}
    report = world.get("/verify", world.auditor).json()
    assert report["ok"] is True
    # run, input edge, output artifact, output edge, metric, completion: six chained records
    assert report["entries"] == entries_before + 6


def test_a_writer_registers_a_failed_run(world: World) -> None:
    body = remote_run(world.base.id, outputs=[], metrics=[],
                      completion={"status": "failed", "error": "CUDA out of memory"})
    response = world.post_run(body, world.writer)
    assert response.status_code == 201, response.text
    assert (response.json()["run"]["status"], response.json()["run"]["error"]) == (
        "failed", "CUDA out of memory")


def _bad_bodies(base_id: int) -> list[tuple[Any, int, str]]:
    """(body, status, text expected in detail)."""
    good = remote_run(base_id)

    def changed(**kw: Any) -> dict[str, Any]:
        return {**json.loads(json.dumps(good)), **kw}

    def output(**kw: Any) -> dict[str, Any]:
        return changed(outputs=[{**good["outputs"][0], **kw}])

    return [
        (changed(started_by="root"), 422, "started_by"),
        ({k: v for k, v in good.items() if k != "recipe"}, 422, "recipe"),
        (output(colour="red"), 422, "colour"),
        (output(size_bytes="40"), 422, "size_bytes"),
        (output(size_bytes=-1), 422, "size_bytes"),
        (output(sha256="' OR 1=1 --"), 422, "sha256"),
        (changed(job_id="j" * 65), 422, "job_id"),
        (changed(inputs=[{"artifact": 99999, "role": "model"}]), 422, "no artifact with id 99999"),
        (changed(inputs=[{"artifact": "%", "role": "model"}]), 422, "artifact"),
        (changed(completion={"status": "failed", "error": "x"}), 422, "failed run records no"),
        (changed(completion={"status": "succeeded", "error": "x"}), 422, "error"),
        (changed(completion={"status": "running"}), 422, "status"),
        (changed(metrics=[{**good["metrics"][0], "artifact_id": base_id}]), 422,
         "exactly one of artifact_sha256 or artifact_id"),
        (changed(metrics=[{**good["metrics"][0], "artifact_sha256": sha("nowhere")}]), 422,
         "neither an output of this run nor registered"),
        (output(sha256=sha("base")), 422, "not the claimed"),  # storage holds other bytes
        ([good], 422, "body"),
        ("not json", 422, "JSON"),
    ]


def test_invalid_runs_are_refused_with_the_field_named_and_nothing_written(world: World) -> None:
    before = state(world.registry)
    for body, code, message in _bad_bodies(world.base.id):
        if isinstance(body, str):
            response = world.client.post("/runs", content=body, headers={
                **bearer(world.writer), "Content-Type": "application/json"})
        else:
            response = world.post_run(body, world.writer)
        assert response.status_code == code, (body, response.text)
        assert message in response.json()["detail"], (message, response.json())
    nan = json.dumps(remote_run(world.base.id)).replace('"value": 31', '"value": NaN')
    response = world.client.post("/runs", content=nan, headers={
        **bearer(world.writer), "Content-Type": "application/json"})
    assert response.status_code == 422 and "value" in response.json()["detail"]
    assert_unchanged(world.registry, before)


# --- the command line -------------------------------------------------------------------------

runner = CliRunner()


def test_serve_refuses_an_outdated_schema_before_binding(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    def no_bind(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("uvicorn.run must not be reached")

    monkeypatch.setattr(uvicorn, "run", no_bind)
    upgrade(db_url, "0001")
    result = runner.invoke(cli_app, ["registry", "serve", "--database-url", db_url])
    assert result.exit_code == 2, result.output
    assert "at schema revision '0001'" in result.stderr
    assert "quantmill registry upgrade --database-url" in result.stderr


def test_serve_starts_uvicorn_on_a_current_schema(
    registry: Registry, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    result = runner.invoke(cli_app, ["registry", "serve", "--database-url", db_url,
                                     "--port", "9911"])
    assert result.exit_code == 0, result.output
    assert (served["host"], served["port"]) == ("127.0.0.1", 9911)
    with TestClient(served["app"]) as client:
        assert client.get("/health").json()["status"] == "ok"


def test_token_commands(registry: Registry, db_url: str) -> None:
    created = runner.invoke(cli_app, ["registry", "token", "create", "ci-writer", "--role",
                                      "writer", "--database-url", db_url])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    assert secret.startswith("qm_") and "\n" not in secret
    assert "cannot be shown again" in created.stderr
    listed = runner.invoke(cli_app, ["registry", "token", "list", "--database-url", db_url])
    assert listed.exit_code == 0 and "ci-writer" in listed.stdout and "active" in listed.stdout
    assert secret not in listed.stdout
    assert hashlib.sha256(secret.encode()).hexdigest()[:12] not in listed.stdout

    again = runner.invoke(cli_app, ["registry", "token", "create", "ci-writer", "--role",
                                    "auditor", "--database-url", db_url])
    assert again.exit_code == 2 and "exists already" in again.stderr
    bad_role = runner.invoke(cli_app, ["registry", "token", "create", "x", "--role", "admin",
                                       "--database-url", db_url])
    assert bad_role.exit_code == 2 and "admin" in bad_role.stderr

    revoked = runner.invoke(cli_app, ["registry", "token", "revoke", "ci-writer", "--reason",
                                      "rotated", "--database-url", db_url])
    assert revoked.exit_code == 0 and "revoked writer token ci-writer" in revoked.stdout
    twice = runner.invoke(cli_app, ["registry", "token", "revoke", "ci-writer",
                                    "--database-url", db_url])
    assert twice.exit_code == 2 and "already revoked" in twice.stderr
    assert [(t.name, t.revoked) for t in list_tokens(registry)] == [("ci-writer", True)]
    assert registry.verify().ok


def test_a_writer_reaps_runs_whose_process_died(world: World) -> None:
    import subprocess

    from sqlalchemy import text

    from quantmill.registry.db import create_registry_engine

    run = world.registry.start_run(job_id="job-dead", kind="quantization", name="killed",
                                   recipe={}, plugins={}, versions={})
    child = subprocess.Popen(["true"])
    child.wait()
    engine = create_registry_engine(world.registry.url, pooled=False)
    with engine.begin() as connection:  # as if that process had started it
        connection.execute(text(f"UPDATE run_heartbeats SET pid = {child.pid}"))
    engine.dispose()
    assert world.client.post("/runs/reap", headers=bearer(world.auditor)).status_code == 403
    response = world.client.post("/runs/reap", headers=bearer(world.writer))
    assert response.status_code == 200, response.text
    (item,) = response.json()["items"]
    assert item["run"]["id"] == run.id and item["run"]["status"] == "abandoned"
    assert item["reason"] == f"process {child.pid} on {run.host} is gone"
    listed = world.get("/runs", world.auditor, params={"status": "abandoned"}).json()["items"]
    assert [r["id"] for r in listed] == [run.id]
    assert world.client.post("/runs/reap", headers=bearer(world.writer)).json()["items"] == []


@pytest.mark.parametrize("uri", [
    "file:///etc/shadow", "../../../etc/passwd", "http://evil.example/x", "javascript:alert(1)",
    "file:///dev/zero", "s3://bucket/remote", "file:///tmp/../etc/passwd"])
def test_a_writer_cannot_register_what_storage_does_not_hold(world: World, uri: str) -> None:
    before = state(world.registry)
    body = remote_run(world.base.id)
    body["outputs"][0]["uri"] = uri
    response = world.post_run(body, world.writer)
    assert response.status_code == 422, response.text
    assert "is not an object of a storage this service accepts" in response.json()["detail"]
    assert_unchanged(world.registry, before)


def test_a_writer_cannot_claim_unstored_or_misdescribed_content(world: World) -> None:
    before = state(world.registry)
    body = remote_run(world.base.id)
    real = body["outputs"][0]["uri"]
    from quantmill.storage.local import LocalStorage

    assert real == LocalStorage().object_path(sha("remote")).as_uri()
    never = {**body["outputs"][0], "sha256": sha("never stored"),
             "uri": LocalStorage().object_path(sha("never stored")).as_uri()}
    wrong_hash = {**body["outputs"][0], "sha256": sha("other")}
    for output, message in ((never, "nothing readable is stored"),
                            (wrong_hash, "not the claimed")):
        response = world.post_run({**body, "outputs": [output], "metrics": []}, world.writer)
        assert response.status_code == 422, response.text
        assert message in response.json()["detail"]
    assert_unchanged(world.registry, before)
    assert world.post_run(body, world.writer).status_code == 201  # the honest claim


def test_a_writer_cannot_take_over_or_grade_another_runs_checkpoint(world: World) -> None:
    """The seeded run produced ``ckpt``: a new run can neither claim it as its output nor
    attach a metric to it without naming it as an input; and a rating by a run that merely
    read it never changes what a search by metric finds."""
    from quantmill.registry.queries import ArtifactQuery, parse_metric_filter, search_artifacts

    before = state(world.registry)
    stolen = {"kind": "checkpoint", "name": "mine", "sha256": world.checkpoint.sha256,
              "size_bytes": 50, "uri": world.checkpoint.uri, "format": "gptq", "role": "c"}
    flattering = [{"evaluator": "perplexity", "name": "perplexity", "value": 1.0,
                   "artifact_id": world.checkpoint.id}]
    claimed = world.post_run(remote_run(world.base.id, outputs=[stolen], metrics=flattering),
                             world.writer)
    assert claimed.status_code in (409, 422), claimed.text
    graded = world.post_run(remote_run(world.base.id, outputs=[], metrics=flattering),
                            world.writer)
    assert graded.status_code == 422, graded.text
    assert "neither an input nor an output of this run" in graded.json()["detail"]
    assert_unchanged(world.registry, before)
    # naming it as an input, a run may measure it; the search still reads the producer's value
    reader = remote_run(world.checkpoint.id, outputs=[], metrics=flattering)
    assert world.post_run(reader, world.writer).status_code == 201
    query = ArtifactQuery(kind="checkpoint", metrics=(parse_metric_filter("perplexity<2"),))
    assert search_artifacts(world.registry, query).total == 0
    honest = ArtifactQuery(kind="checkpoint", metrics=(parse_metric_filter("perplexity<28"),))
    assert [a.id for a in search_artifacts(world.registry, honest).items] == [world.checkpoint.id]


def test_response_models_carry_every_field_of_the_entities() -> None:
    """A field added to an entity (or to verify's report) and not to its response model would
    be dropped silently by FastAPI: the two must name the same fields."""
    import dataclasses

    from quantmill.flows import api_models
    from quantmill.registry import entities
    from quantmill.registry.verify import VerifyReport

    pairs = [(api_models.ArtifactOut, entities.Artifact), (api_models.RunOut, entities.Run),
             (api_models.MetricOut, entities.MetricRecord),
             (api_models.CorrectionOut, entities.Correction),
             (api_models.EdgeOut, entities.RunEdge),
             (api_models.LocationOut, entities.ArtifactLocation)]
    for model, entity in pairs:
        assert set(model.model_fields) == {f.name for f in dataclasses.fields(entity)}, model
    assert set(api_models.VerifyOut.model_fields) == set(VerifyReport().to_json()) | {"head"}
