"""``bulk.record_runs`` stores what the per-run calls would, ledger included, or nothing."""

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from quantmill.registry import (
    ArtifactConflict,
    ArtifactNotFound,
    InvalidClaim,
    NewArtifact,
    NewMetric,
    Registry,
)
from quantmill.registry.bulk import record_runs
from quantmill.registry.db import create_registry_engine
from quantmill.registry.models import LedgerRow
from quantmill.registry.writes import EndedRun, RunCompletion, RunInput

PROTOCOL = {"seq_len": 512}


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def output(label: str, kind: str = "checkpoint", role: str = "checkpoint") -> NewArtifact:
    return NewArtifact(kind=kind, name=label, sha256=sha(label), size_bytes=len(label),
                       uri=f"file:///{label}", format="raw", role=role)


def roots(registry: Registry) -> dict[str, int]:
    return {label: registry.upsert_artifact(kind=kind, name=label, sha256=sha(label),
                                            size_bytes=len(label), uri=f"file:///{label}",
                                            format="raw").id
            for label, kind in (("base", "model"), ("calib", "dataset"), ("eval", "dataset"))}


def ended(*, inputs: Any = (), outputs: Any = (), metrics: Any = (), details: Any = None,
          error: str | None = None, **start: Any) -> EndedRun:
    """An ended run as the tests write it: inputs as (ref, role), failed when ``error``."""
    completion = RunCompletion("failed", {}, error) if error is not None else \
        RunCompletion("succeeded", dict(details or {}))
    return EndedRun(**start, completion=completion,
                    inputs=tuple(RunInput(ref, role) for ref, role in inputs),
                    outputs=tuple(outputs), metrics=tuple(metrics))


def history(ids: dict[str, int]) -> list[EndedRun]:
    """A chain of two quantizations (the second takes the first's output by sha256), a failed
    attempt, and a re-quantization that reproduces an already registered checkpoint (named as
    its input: an artifact has one producing run)."""
    common: dict[str, Any] = {"job_id": "job-1", "plugins": {"rtn": "0.1"},
                              "versions": {"quantmill": "test"}}
    return [
        ended(kind="quantization", name="q1", recipe={"bits": 8}, **common,
                  inputs=[(ids["base"], "model"), (ids["calib"], "calibration")],
                  outputs=[output("ckpt-1"), output("report-1", "report", "report")],
                  metrics=[NewMetric(evaluator="perplexity", name="perplexity", value=25.5,
                                     protocol=PROTOCOL, artifact_sha256=sha("ckpt-1"),
                                     dataset_artifact_id=ids["eval"])],
                  details={"seconds": 3.5}),
        ended(kind="quantization", name="q2-attempt", recipe={"bits": 4}, **common,
                  inputs=[(sha("ckpt-1"), "model")], error="out of memory"),
        ended(kind="quantization", name="q2", recipe={"bits": 4}, **common,
                  inputs=[(sha("ckpt-1"), "model"), (ids["calib"], "calibration")],
                  outputs=[output("ckpt-2")],
                  metrics=[NewMetric(evaluator="size", name="bytes", value=6.0,
                                     artifact_sha256=sha("ckpt-2"))]),
        ended(kind="conversion", name="again", recipe={}, **common,
                  inputs=[(ids["base"], "model"), (sha("ckpt-1"), "reproduced")],
                  metrics=[NewMetric(evaluator="size", name="bytes", value=6.0,
                                     artifact_sha256=sha("ckpt-1"))]),
    ]


def through_api(registry: Registry, records: list[EndedRun]) -> None:
    for record in records:
        inputs = [(item.artifact if isinstance(item.artifact, int)
                   else registry.get_artifact(item.artifact).id, item.role)
                  for item in record.inputs]
        run = registry.start_run(job_id=record.job_id, kind=record.kind, name=record.name,
                                 recipe=record.recipe, plugins=record.plugins,
                                 versions=record.versions, inputs=inputs)
        if record.completion.status == "failed":
            registry.fail_run(run.id, record.completion.error)
        else:
            registry.finish_run(run.id, outputs=record.outputs, metrics=record.metrics,
                                details=record.completion.details)


def contents(registry: Registry, url: str) -> dict[str, Any]:
    """Everything stored, without what differs between two recordings (times, host)."""
    def strip(entity: Any) -> dict[str, Any]:
        skip = {"created_at", "started_at", "finished_at", "host", "started_by"}
        return {k: v for k, v in entity.to_json().items() if k not in skip}

    runs = sorted(registry.list_runs(limit=100), key=lambda run: run.id)
    engine = create_registry_engine(url, pooled=False)
    try:
        with engine.connect() as connection:
            links = connection.execute(
                select(LedgerRow.record_type, LedgerRow.record_id).order_by(LedgerRow.seq)).all()
    finally:
        engine.dispose()
    return {
        "artifacts": [strip(a) for a in sorted(registry.list_artifacts(limit=100),
                                               key=lambda a: a.id)],
        "runs": [strip(run) for run in runs],
        "edges": [edge.to_json() for run in runs for edge in registry.run_edges(run.id)],
        "metrics": [strip(m) for run in runs for m in registry.metrics_for_run(run.id)],
        "ledger": [tuple(link) for link in links],
    }


def test_bulk_stores_what_the_per_run_calls_store(
    databases: Any, open_registry: Callable[[str], Registry], backend: str
) -> None:
    api_url, bulk_url = databases.create(backend), databases.create(backend)
    api, bulk = open_registry(api_url), open_registry(bulk_url)
    through_api(api, history(roots(api)))
    run_ids = record_runs(bulk, history(roots(bulk)))

    assert run_ids == [run.id for run in sorted(bulk.list_runs(), key=lambda run: run.id)]
    assert contents(bulk, bulk_url) == contents(api, api_url)
    report = bulk.verify()
    assert report.ok, report.problems
    assert report.entries == bulk.head()[0] == len(contents(bulk, bulk_url)["ledger"])
    # The lineage reads the same, e.g. the second checkpoint's.
    ckpt = bulk.get_artifact(sha("ckpt-2")).id
    assert set(bulk.upstream(ckpt).depths.values()) == {0, 1, 2}


@pytest.mark.parametrize("bad", ["unknown input", "input not yet made", "size conflict",
                                 "size conflict within the batch", "another run's output",
                                 "another run's output within the batch",
                                 "a metric of a foreign artifact"])
def test_a_bad_record_stores_nothing(registry: Registry, bad: str) -> None:
    ids = roots(registry)
    records = history(ids)
    if bad == "unknown input":
        records.append(ended(job_id="j", kind="k", name="n", recipe={}, plugins={},
                                 versions={}, inputs=[(sha("nowhere"), "model")]))
        error: type[Exception] = ArtifactNotFound
    elif bad == "input not yet made":  # a run may not consume what a later record outputs
        records.insert(0, ended(job_id="j", kind="k", name="n", recipe={}, plugins={},
                                    versions={}, inputs=[(sha("ckpt-2"), "model")]))
        error = ArtifactNotFound
    elif bad == "size conflict":
        records.append(ended(job_id="j", kind="k", name="n", recipe={}, plugins={},
                                 versions={}, outputs=[NewArtifact(
                                     kind="checkpoint", name="x", sha256=sha("base"),
                                     size_bytes=999, uri="u", format="raw", role="r")]))
        error = ArtifactConflict
    elif bad == "another run's output":  # q1 produced ckpt-1
        records.append(ended(job_id="j", kind="k", name="n", recipe={}, plugins={},
                             versions={}, outputs=[output("ckpt-1")]))
        error = ArtifactConflict
    elif bad == "another run's output within the batch":
        records.append(ended(job_id="j", kind="k", name="n", recipe={}, plugins={},
                             versions={}, outputs=[output("ckpt-2")]))
        error = ArtifactConflict
    elif bad == "a metric of a foreign artifact":  # the run neither consumed nor made it
        records.append(ended(job_id="j", kind="k", name="n", recipe={}, plugins={},
                             versions={}, inputs=[(ids["calib"], "data")],
                             metrics=[NewMetric(evaluator="perplexity", name="perplexity",
                                                value=1.0, artifact_id=ids["base"])]))
        error = InvalidClaim
    else:  # two new outputs with one sha256 and different sizes, both inside the batch
        for size in (10, 11):
            records.append(ended(job_id="j", kind="k", name="n", recipe={}, plugins={},
                                     versions={}, outputs=[NewArtifact(
                                         kind="report", name="x", sha256=sha("twin"),
                                         size_bytes=size, uri="u", format="raw", role="r")]))
        error = ArtifactConflict
    before = registry.head()
    with pytest.raises(error):
        record_runs(registry, records)
    assert registry.head() == before
    assert registry.list_runs() == [] and len(registry.list_artifacts()) == 3
    assert registry.verify().ok
