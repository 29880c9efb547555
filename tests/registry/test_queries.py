"""Auditor's queries (search, compare, describe) on SQLite and PostgreSQL.

The history, recorded through the Registry API like real jobs record it:

    smollm2 + wiki -(calibration)-> calib
    smollm2 + calib -(quantization rtn w4)-> ck-rtn4 (perplexity 32.0)
    smollm2 + calib -(quantization gptq w4)-> ck-gptq4 (28.0) -(report)-> report
    smollm2 + calib -(quantization gptq w3)-> ck-gptq3 (40.0, corrected to 35.0)
    tinyllama -(quantization rtn w4)-> ck-other (20.0)
    plus loose artifacts named "50%_done" and "50x-done", and two with odd "bits" metadata.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pytest
from sqlalchemy import func, select

from quantmill.registry import (
    ArtifactNotFound,
    InvalidQuery,
    NewArtifact,
    NewMetric,
    Registry,
)
from quantmill.registry.models import CHAINED_TABLES, LedgerRow
from quantmill.registry.queries import (
    MAX_PAGE_SIZE,
    ArtifactQuery,
    MetricFilter,
    Page,
    compare_artifacts,
    describe_artifact,
    parse_metric_filter,
    search_artifacts,
)

PROTOCOL = {"seq_len": 512, "windows": 40}
VERSIONS = {"quantmill": "0.1.0", "torch": "2.13.0"}


class CreatesDatabases(Protocol):
    def create(self, backend: str) -> str: ...


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def _put(reg: Registry, label: str, kind: str, fmt: str, **metadata: Any) -> int:
    return reg.upsert_artifact(kind=kind, name=label, sha256=sha(label), size_bytes=1000,
                               uri=f"file:///store/{label}", format=fmt, metadata=metadata).id


def _quantize(reg: Registry, ids: dict[str, int], label: str, base: str, method: str,
              bits: int, ppl: float, versions: dict[str, str] = VERSIONS) -> int:
    inputs = [(ids[base], "base_model")] + ([(ids["calib"], "calibration_set")]
                                            if base == "smollm2" else [])
    recipe = {"name": label, "model": {"path": f"/models/{base}"},
              "quantization": {"method": method, "bits": bits, "group_size": 128}}
    run = reg.start_run(job_id=f"job-{label}", kind="quantization", name=label, recipe=recipe,
                        plugins={method: "0.1.0", "gptq-writer": "0.1.0"}, versions=versions,
                        inputs=inputs)
    reg.finish_run(run.id, outputs=[NewArtifact(
        kind="checkpoint", name=label, sha256=sha(label), size_bytes=500 * bits,
        uri=f"file:///store/{label}", format="gptq", role="quantized_checkpoint",
        metadata={"method": method, "bits": bits, "group_size": 128,
                  "base_model_sha256": sha(base)})],
        metrics=[NewMetric(evaluator="perplexity", name="perplexity", value=ppl,
                           protocol=PROTOCOL, artifact_sha256=sha(label),
                           dataset_artifact_id=ids["wiki"]),
                 NewMetric(evaluator="size", name="size_bytes", value=500.0 * bits,
                           artifact_sha256=sha(label))])
    ids[f"run_{label}"] = run.id
    return reg.get_artifact(sha(label)).id


def build_history(reg: Registry) -> dict[str, int]:
    """Record the history in the module docstring; return ids by short name."""
    ids = {"smollm2": _put(reg, "smollm2", "model", "gguf"),
           "wiki": _put(reg, "wiki", "dataset", "text"),
           "tinyllama": _put(reg, "tinyllama", "model", "hf")}
    cal = reg.start_run(job_id="job-cal", kind="calibration", name="calibrate", recipe={},
                        plugins={"text": "0.1.0"}, versions=VERSIONS,
                        inputs=[(ids["smollm2"], "tokenizer_model"),
                                (ids["wiki"], "calibration_data")])
    reg.finish_run(cal.id, outputs=[NewArtifact(
        kind="calibration_set", name="calib", sha256=sha("calib"), size_bytes=64,
        uri="file:///store/calib", format="safetensors-token-ids", role="calibration_set")])
    ids["calib"] = reg.get_artifact(sha("calib")).id
    ids["ck-rtn4"] = _quantize(reg, ids, "ck-rtn4", "smollm2", "rtn", 4, 32.0)
    ids["ck-gptq4"] = _quantize(reg, ids, "ck-gptq4", "smollm2", "gptq", 4, 28.0,
                                versions={"quantmill": "0.1.1", "torch": "2.13.0"})
    ids["ck-gptq3"] = _quantize(reg, ids, "ck-gptq3", "smollm2", "gptq", 3, 40.0)
    ids["ck-other"] = _quantize(reg, ids, "ck-other", "tinyllama", "rtn", 4, 20.0)
    old = next(m for m in reg.metrics_for_artifact(ids["ck-gptq3"]) if m.name == "perplexity")
    ids["metric_old"] = old.id
    ids["metric_new"] = reg.correct_metric(old.id, 35.0, reason="full test split",
                                           author="auditor").id
    report = reg.start_run(job_id="job-report", kind="report", name="report", recipe={},
                           plugins={}, versions=VERSIONS,
                           inputs=[(ids["ck-gptq4"], "checkpoint")])
    reg.finish_run(report.id, outputs=[NewArtifact(
        kind="report", name="report", sha256=sha("report"), size_bytes=10,
        uri="file:///store/report", format="markdown", role="report")])
    ids["report"] = reg.get_artifact(sha("report")).id
    ids["run_report"] = report.id
    ids["pct"] = _put(reg, "50%_done", "note", "text")
    ids["pct-x"] = _put(reg, "50x-done", "note", "text")
    ids["odd-text"] = _put(reg, "odd-text", "note", "text", bits="four", method=7)
    ids["odd-float"] = _put(reg, "odd-float", "note", "text", bits=4.5)
    return ids


def names(page: Page[Any]) -> list[str]:
    return [artifact.name for artifact in page.items]


def search(reg: Registry, limit: int = 50, offset: int = 0, **fields: Any) -> Page[Any]:
    return search_artifacts(reg, ArtifactQuery(**fields), limit=limit, offset=offset)


# --- filters, one by one and combined ---------------------------------------------------------


def test_each_filter(registry: Registry) -> None:
    ids = build_history(registry)
    assert names(search(registry, kind="checkpoint")) == [
        "ck-other", "ck-gptq3", "ck-gptq4", "ck-rtn4"]  # newest first
    assert names(search(registry, format="gguf")) == ["smollm2"]
    assert names(search(registry, method="gptq")) == ["ck-gptq3", "ck-gptq4"]
    # the odd metadata ("four", 4.5) neither matches nor breaks the search on PostgreSQL
    assert names(search(registry, bits=4)) == ["ck-other", "ck-gptq4", "ck-rtn4"]
    assert names(search(registry, bits=3)) == ["ck-gptq3"]
    assert names(search(registry, base_model=ids["smollm2"])) == [
        "report", "ck-gptq3", "ck-gptq4", "ck-rtn4", "calib"]
    assert names(search(registry, base_model=sha("smollm2")[:10])) == names(
        search(registry, base_model=ids["smollm2"]))
    assert names(search(registry, base_model=ids["ck-gptq4"])) == ["report"]
    assert names(search(registry, base_model=ids["report"])) == []
    assert names(search(registry, name_contains="gptq")) == ["ck-gptq3", "ck-gptq4"]
    assert names(search(registry, name_contains="GPTQ")) == []  # case-sensitive
    # % and _ are characters, not wildcards
    assert names(search(registry, name_contains="%_")) == ["50%_done"]
    assert names(search(registry, name_contains="50%")) == ["50%_done"]


def test_metric_filters_read_current_measurements_only(registry: Registry) -> None:
    build_history(registry)

    def by(*texts: str) -> list[str]:
        query = ArtifactQuery(metrics=tuple(parse_metric_filter(t) for t in texts))
        return names(search_artifacts(registry, query))

    assert by("perplexity<=32") == ["ck-other", "ck-gptq4", "ck-rtn4"]
    assert by("perplexity<32") == ["ck-other", "ck-gptq4"]
    assert by("perplexity>=38") == []  # 40.0 was superseded by 35.0
    assert by("perplexity=35") == ["ck-gptq3"]
    assert by("perplexity>20", "perplexity<30") == ["ck-gptq4"]
    assert by("size_bytes>1600") == ["ck-other", "ck-gptq4", "ck-rtn4"]
    assert by("nonexistent<1e9") == []


def test_filters_combine(registry: Registry) -> None:
    ids = build_history(registry)
    assert names(search(registry, method="rtn", bits=4)) == ["ck-other", "ck-rtn4"]
    assert names(search(registry, method="rtn", bits=4, base_model=ids["smollm2"])) == [
        "ck-rtn4"]
    assert names(search(registry, kind="checkpoint", base_model=ids["smollm2"],
                        metrics=(MetricFilter("perplexity", "<", 30),))) == ["ck-gptq4"]
    assert names(search(registry, kind="checkpoint", format="gptq", name_contains="ck-",
                        bits=3, method="gptq")) == ["ck-gptq3"]
    assert names(search(registry, kind="model", method="rtn")) == []


def test_created_window(registry: Registry) -> None:
    build_history(registry)
    earlier = search(registry).total
    middle = datetime.now(UTC)
    time.sleep(0.01)
    late = _put(registry, "late", "note", "text")
    assert names(search(registry, created_after=middle)) == ["late"]
    before = search(registry, created_before=middle, limit=MAX_PAGE_SIZE)
    assert late not in [a.id for a in before.items] and before.total == earlier
    # a naive datetime is UTC; another zone is converted
    naive = middle.replace(tzinfo=None)
    assert names(search(registry, created_after=naive)) == ["late"]
    plus_two = middle.astimezone(timezone_plus(2))
    assert names(search(registry, created_after=plus_two)) == ["late"]
    assert search(registry, created_after=middle - timedelta(days=1),
                  created_before=middle + timedelta(days=1)).total == before.total + 1


def timezone_plus(hours: int) -> Any:
    from datetime import timezone

    return timezone(timedelta(hours=hours))


def test_pagination(registry: Registry) -> None:
    build_history(registry)
    everything = names(search(registry, kind="checkpoint"))
    first = search(registry, kind="checkpoint", limit=3)
    assert (names(first), first.total, first.next_offset) == (everything[:3], 4, 3)
    last = search(registry, kind="checkpoint", limit=3, offset=first.next_offset)
    assert (names(last), last.total, last.next_offset) == (everything[3:], 4, None)
    exact = search(registry, kind="checkpoint", limit=4)
    assert exact.next_offset is None and len(exact.items) == 4
    beyond = search(registry, kind="checkpoint", offset=10)
    assert (beyond.items, beyond.total, beyond.next_offset) == ([], 4, None)
    assert first.to_json()["items"][0] == first.items[0].to_json()
    assert {k: v for k, v in first.to_json().items() if k != "items"} == {
        "total": 4, "limit": 3, "offset": 0, "next_offset": 3}
    assert search(registry, limit=MAX_PAGE_SIZE).total == search(registry, limit=1).total


@pytest.mark.parametrize(("limit", "offset"), [(0, 0), (MAX_PAGE_SIZE + 1, 0), (-1, 0),
                                               (10, -1), (True, 0), (10, 1.5)])
def test_bad_pages_are_refused(registry: Registry, limit: Any, offset: Any) -> None:
    with pytest.raises(InvalidQuery, match="limit|offset"):
        search_artifacts(registry, ArtifactQuery(), limit=limit, offset=offset)


# --- hostile input -------------------------------------------------------------------------------

NASTY = ["' OR 1=1 --", "%", "_", ";", '"', "\\", "x'; DROP TABLE artifacts; --",
         "') OR ('1'='1", "*", "$.bits", "null"]


def _state(registry: Registry) -> tuple[Any, ...]:
    with registry.session() as session:
        counts = tuple(session.scalar(select(func.count()).select_from(model))
                       for model in (*CHAINED_TABLES.values(), LedgerRow))
    return counts, registry.head()


@pytest.mark.parametrize("field", ["kind", "format", "method", "name_contains"])
def test_sql_metacharacters_in_text_filters(registry: Registry, field: str) -> None:
    ids = build_history(registry)
    before = _state(registry)
    for value in NASTY:
        found = names(search(registry, **{field: value}))
        expected = ["50%_done"] if field == "name_contains" and value in ("%", "_") else []
        assert found == expected, (field, value)
    with pytest.raises(InvalidQuery, match="NUL"):
        ArtifactQuery(**{field: "check\x00point"})
    with pytest.raises(InvalidQuery, match="empty"):
        ArtifactQuery(**{field: ""})
    assert _state(registry) == before
    assert registry.verify().ok
    assert registry.get_artifact(ids["ck-rtn4"]).name == "ck-rtn4"


def test_sql_metacharacters_in_references_and_metric_filters(registry: Registry) -> None:
    build_history(registry)
    before = _state(registry)
    for value in NASTY + ["1 OR 1=1", "abc\x00def12"]:
        with pytest.raises(InvalidQuery):
            ArtifactQuery(base_model=value)
        try:  # "_" and "null" are valid metric names: they match nothing
            named = parse_metric_filter(f"{value}<3")
        except InvalidQuery:
            pass
        else:
            assert search(registry, metrics=(named,)).total == 0
        with pytest.raises(InvalidQuery):
            parse_metric_filter(f"perplexity<{value}")
        with pytest.raises(ArtifactNotFound):
            compare_artifacts(registry, value, 1)
        with pytest.raises(ArtifactNotFound):
            describe_artifact(registry, value)
    assert _state(registry) == before
    assert registry.verify().ok


@pytest.mark.parametrize("text", [
    "", "perplexity", "perplexity<", "<30", "perplexity<<30", "perplexity=<30",
    "perplexity!=30", "perplexity<=abc", "perplexity<=nan", "perplexity>-inf",
    "perplexity<=1_0", "perp lexity<3", "perplexity<3 4", "perplexity<3;", "ppl\x00<3",
])
def test_malformed_metric_filters_are_refused(text: str) -> None:
    with pytest.raises(InvalidQuery, match="invalid metric filter"):
        parse_metric_filter(text)


def test_metric_filters_parse() -> None:
    assert parse_metric_filter("perplexity<=30.5") == MetricFilter("perplexity", "<=", 30.5)
    assert parse_metric_filter(" size.bytes > 1e6 ") == MetricFilter("size.bytes", ">", 1e6)
    assert parse_metric_filter("eval-loss=-2") == MetricFilter("eval-loss", "=", -2.0)
    with pytest.raises(InvalidQuery, match="operator"):
        MetricFilter("perplexity", "!=", 1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidQuery, match="finite"):
        MetricFilter("perplexity", "<", float("inf"))
    with pytest.raises(InvalidQuery, match="metric name"):
        MetricFilter("perplexity;", "<", 1.0)


@pytest.mark.parametrize("fields", [
    {"bits": 0}, {"bits": 33}, {"bits": True}, {"bits": "4"},
    {"created_after": datetime(2026, 2, 1), "created_before": datetime(2026, 1, 1)},
    {"created_after": "2026-01-01"}, {"base_model": 0}, {"base_model": "abc"},
    {"metrics": ("perplexity<3",)}, {"kind": 3},
])
def test_invalid_queries_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidQuery):
        ArtifactQuery(**fields)


def test_query_normalises_values() -> None:
    query = ArtifactQuery(base_model=" ABCDEF12 ", created_after=datetime(2026, 1, 1),
                          metrics=[MetricFilter("perplexity", "<", 3)])  # type: ignore[arg-type]
    assert query.base_model == "abcdef12"
    assert query.created_after == datetime(2026, 1, 1, tzinfo=UTC)
    assert query.metrics == (MetricFilter("perplexity", "<", 3.0),)


def test_unknown_references(registry: Registry) -> None:
    ids = build_history(registry)
    with pytest.raises(ArtifactNotFound):
        search(registry, base_model=99_999)
    with pytest.raises(ArtifactNotFound):
        search(registry, base_model="abcdef" * 2)
    with pytest.raises(ArtifactNotFound):
        compare_artifacts(registry, ids["ck-rtn4"], 99_999)
    with pytest.raises(ArtifactNotFound):
        describe_artifact(registry, 99_999)


# --- compare and describe ----------------------------------------------------------------------


def test_compare_two_checkpoints_of_one_base(registry: Registry) -> None:
    ids = build_history(registry)
    result = compare_artifacts(registry, ids["ck-rtn4"], sha("ck-gptq4")[:12])
    assert result["a"]["artifact"]["id"] == ids["ck-rtn4"]
    assert result["b"]["run"]["id"] == ids["run_ck-gptq4"]
    ppl = next(m for m in result["metrics"] if m["name"] == "perplexity")
    assert (ppl["a"], ppl["b"], ppl["difference"]) == (32.0, 28.0, -4.0)
    assert ppl["protocol_sha256"] == registry.metrics_for_artifact(ids["ck-rtn4"])[0]\
        .protocol_sha256
    size = next(m for m in result["metrics"] if m["name"] == "size_bytes")
    assert size["difference"] == 0.0
    assert result["recipe"]["same"] is False
    assert result["recipe"]["differences"] == [
        {"key": "name", "a": "ck-rtn4", "b": "ck-gptq4"},
        {"key": "quantization.method", "a": "rtn", "b": "gptq"},
    ]
    assert result["plugins"] == [{"key": "gptq", "b": "0.1.0"}, {"key": "rtn", "a": "0.1.0"}]
    assert result["versions"] == [{"key": "quantmill", "a": "0.1.0", "b": "0.1.1"}]
    assert result["roots"] == {"common": sorted([ids["smollm2"], ids["wiki"]]),
                               "only_a": [], "only_b": []}
    assert json.loads(json.dumps(result)) == result  # JSON-ready


def test_compare_reads_corrected_metrics_and_other_bases(registry: Registry) -> None:
    ids = build_history(registry)
    result = compare_artifacts(registry, ids["ck-gptq3"], ids["ck-other"])
    ppl = next(m for m in result["metrics"] if m["name"] == "perplexity")
    assert (ppl["a"], ppl["a_metric_id"], ppl["b"]) == (35.0, ids["metric_new"], 20.0)
    assert result["roots"] == {"common": [], "only_a": sorted([ids["smollm2"], ids["wiki"]]),
                               "only_b": [ids["tinyllama"]]}
    # a base model has no producing run: nothing to diff, and it is its own root
    bases = compare_artifacts(registry, ids["smollm2"], ids["ck-other"])
    assert bases["a"]["run"] is None and bases["recipe"] is None and bases["plugins"] is None
    assert bases["a"]["roots"][0]["id"] == ids["smollm2"]
    # metrics only one side has are listed with None on the other side
    only = [m for m in bases["metrics"] if m["a"] is None]
    assert {m["name"] for m in only} == {"perplexity", "size_bytes"}
    assert all(m["difference"] is None for m in only)


def test_describe_artifact(registry: Registry) -> None:
    ids = build_history(registry)
    registry.correct("run", ids["run_ck-gptq3"], {"host": "gpu-7"}, reason="wrong host")
    details = describe_artifact(registry, ids["ck-gptq3"])
    assert details["artifact"]["name"] == "ck-gptq3"
    metrics = {m["id"]: m for m in details["metrics"]}
    assert metrics[ids["metric_old"]]["superseded_by"] == ids["metric_new"]
    assert metrics[ids["metric_old"]]["corrections"][0]["reason"] == "full test split"
    assert metrics[ids["metric_new"]]["superseded_by"] is None
    (produced,) = details["produced_by"]
    run = produced["run"]
    assert run["id"] == ids["run_ck-gptq3"] and run["status"] == "succeeded"
    assert run["plugins"] == {"gptq": "0.1.0", "gptq-writer": "0.1.0"}
    assert run["versions"] == VERSIONS and run["recipe_sha256"] and run["started_by"]
    assert run["finished_at"] is not None
    assert produced["inputs"] == [
        {"artifact_id": ids["smollm2"], "name": "smollm2", "role": "base_model"},
        {"artifact_id": ids["calib"], "name": "calib", "role": "calibration_set"},
    ]
    assert produced["outputs"] == [
        {"artifact_id": ids["ck-gptq3"], "name": "ck-gptq3", "role": "quantized_checkpoint"}]
    assert produced["corrections"][0]["changes"] == {"host": "gpu-7"}
    assert describe_artifact(registry, ids["ck-gptq4"])["used_by_run_ids"] == [ids["run_report"]]
    base = describe_artifact(registry, ids["smollm2"])
    assert base["produced_by"] == [] and len(base["used_by_run_ids"]) == 4


# --- both databases agree --------------------------------------------------------------------


def _without_times(value: Any) -> Any:
    """Drop what differs between two recordings of one history: the times."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items()
                if not k.endswith("_at")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


@pytest.mark.postgres
def test_sqlite_and_postgresql_give_identical_answers(
    databases: CreatesDatabases, open_registry: Any
) -> None:
    answers = []
    for backend in ("sqlite", "postgresql"):
        reg = open_registry(databases.create(backend))
        ids = build_history(reg)
        queries = [
            ArtifactQuery(), ArtifactQuery(kind="checkpoint"), ArtifactQuery(bits=4),
            ArtifactQuery(method="gptq", metrics=(MetricFilter("perplexity", "<", 36),)),
            ArtifactQuery(base_model=ids["smollm2"]), ArtifactQuery(name_contains="%_"),
            ArtifactQuery(format="text", name_contains="done"),
            ArtifactQuery(metrics=(MetricFilter("size_bytes", ">=", 1500),)),
        ]
        pages = [search_artifacts(reg, q, limit=3, offset=1).to_json() for q in queries]
        pages += [search_artifacts(reg, q, limit=MAX_PAGE_SIZE).to_json() for q in queries]
        answers.append(_without_times({
            "pages": pages,
            "compare": compare_artifacts(reg, ids["ck-rtn4"], ids["ck-gptq3"]),
            "describe": describe_artifact(reg, ids["ck-gptq3"]),
        }))
    assert answers[0] == answers[1]
    assert answers[0]["pages"][1]["total"] == 4


def test_out_of_range_dates_and_long_metric_filters_are_refused() -> None:
    from datetime import datetime, timedelta, timezone

    from quantmill.registry.queries import ArtifactQuery, parse_metric_filter

    late = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))
    with pytest.raises(InvalidQuery, match="out of range"):
        ArtifactQuery(created_after=late)
    with pytest.raises(InvalidQuery, match="longer than 200 characters"):
        parse_metric_filter("a=x" + " " * 5000 + "\ny")
