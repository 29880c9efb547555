"""Runs whose process died are closed as ``abandoned`` (append-only, chained, with the reason),
never while their process lives; an abandoned run gains nothing afterwards."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import timedelta
from typing import Any

import pytest

from quantmill.registry import Artifact, NewArtifact, Registry, RunStateError

OLD = "2020-01-01 00:00:00"
Tamper = Any  # the ``tamper`` fixture (tests/registry/conftest.py)


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def add_artifact(registry: Registry, label: str) -> Artifact:
    return registry.upsert_artifact(kind="model", name=label, sha256=sha(label),
                                    size_bytes=len(label), uri=f"file:///store/{label}",
                                    format="gguf")


def start(registry: Registry, inputs: list[tuple[int, str]] | None = None) -> int:
    return registry.start_run(job_id="job-1", kind="quantization", name="rtn-4bit",
                              recipe={"quantizer": "rtn"}, plugins={"rtn": "0.1.0"},
                              versions={"quantmill": "0.1.0"}, inputs=inputs or []).id


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _status(registry: Registry, run_id: int) -> str:
    return registry.get_run(run_id).status


def test_a_run_of_a_live_process_is_never_reaped(registry: Registry, tamper: Tamper) -> None:
    run = start(registry)
    assert registry.reap(stale_after=timedelta(0)) == []  # this process: alive, however old
    tamper.sql(f"UPDATE run_heartbeats SET beat_at = '{OLD}'")
    assert registry.reap(stale_after=timedelta(0)) == []
    assert _status(registry, run) == "running"


def test_a_dead_process_on_this_host_is_abandoned_at_once(registry: Registry,
                                                         tamper: Tamper) -> None:
    run = start(registry)
    pid = _dead_pid()
    tamper.sql(f"UPDATE run_heartbeats SET pid = {pid}")
    assert [(r.id, r.status) for r, _ in registry.reap(dry_run=True)] == [(run, "running")]
    assert _status(registry, run) == "running"  # a dry run writes nothing
    ((reaped, reason),) = registry.reap()  # the default limit: no waiting for staleness
    assert reaped.id == run and reaped.status == "abandoned"
    assert reason == f"process {pid} on {reaped.host} is gone"
    stored = registry.get_run(run)
    assert stored.status == "abandoned" and stored.error == f"abandoned: {reason}"
    assert stored.details["abandoned"]["heartbeat"]["pid"] == pid
    assert registry.reap() == []  # closed once
    report = registry.verify()
    assert report.ok and report.runs == {"abandoned": 1}


def test_a_reused_pid_does_not_keep_a_dead_run_alive(registry: Registry,
                                                     tamper: Tamper) -> None:
    run = start(registry)
    tamper.sql("UPDATE run_heartbeats SET process_start = '1'")  # our pid, another process
    ((reaped, reason),) = registry.reap()
    assert reaped.id == run and "pid was reused" in reason


def test_another_hosts_run_is_abandoned_only_when_its_heartbeat_is_stale(
        registry: Registry, tamper: Tamper) -> None:
    run = start(registry)
    tamper.sql("UPDATE run_heartbeats SET host = 'worker-7'")
    assert registry.reap(stale_after=timedelta(minutes=10)) == []  # it beat just now
    tamper.sql(f"UPDATE run_heartbeats SET beat_at = '{OLD}'")
    ((reaped, reason),) = registry.reap(stale_after=timedelta(minutes=10))
    assert reaped.id == run
    assert reason.startswith("no heartbeat from process") and "worker-7" in reason


def test_a_beat_keeps_a_remote_run_alive(registry: Registry, tamper: Tamper) -> None:
    run = start(registry)
    tamper.sql(f"UPDATE run_heartbeats SET beat_at = '{OLD}'")
    assert registry.beat() == 1
    tamper.sql("UPDATE run_heartbeats SET host = 'worker-7'")
    assert registry.reap(stale_after=timedelta(minutes=10)) == []
    assert _status(registry, run) == "running"


def test_a_run_without_heartbeat_counts_from_its_start(registry: Registry,
                                                       tamper: Tamper) -> None:
    run = start(registry)
    tamper.sql("DELETE FROM run_heartbeats")  # as runs recorded before heartbeats existed
    assert registry.reap(stale_after=timedelta(hours=1)) == []
    ((reaped, reason),) = registry.reap(stale_after=timedelta(0))
    assert reaped.id == run and reason.startswith("no heartbeat")


def test_an_abandoned_run_never_gains_outputs(registry: Registry, tamper: Tamper) -> None:
    base = add_artifact(registry, "base")
    run = start(registry, [(base.id, "base_model")])
    tamper.sql(f"UPDATE run_heartbeats SET pid = {_dead_pid()}")
    registry.reap()
    output = NewArtifact(kind="checkpoint", name="late", sha256=sha("late"), size_bytes=4,
                         uri="file:///store/late", format="gptq", role="quantized_checkpoint")
    with pytest.raises(RunStateError, match="already abandoned"):
        registry.finish_run(run, outputs=[output])
    with pytest.raises(RunStateError, match="already abandoned"):
        registry.fail_run(run, "too late")
    assert registry.run_edges(run)[0].direction == "input" and len(registry.run_edges(run)) == 1


def test_verify_reports_an_abandoned_run_that_has_outputs(registry: Registry,
                                                          tamper: Tamper) -> None:
    base = add_artifact(registry, "base")
    run = start(registry)
    tamper.sql(f"UPDATE run_heartbeats SET pid = {_dead_pid()}")
    registry.reap()
    tamper.drop_guards()
    tamper.sql(f"INSERT INTO run_edges (run_id, artifact_id, direction, role) "
               f"VALUES ({run}, {base.id}, 'output', 'quantized_checkpoint')")
    problems = {p.kind: p for p in registry.verify().problems}
    assert problems["abandoned"].record == f"runs #{run}"
    assert "abandoned, yet it has 1 output edge" in problems["abandoned"].detail


def test_completions_stay_append_only_after_the_migration(registry: Registry,
                                                         tamper: Tamper) -> None:
    """0004 recreated run_completions on SQLite: its triggers came back with it."""
    run = start(registry)
    registry.fail_run(run, "boom")
    for statement in ("UPDATE run_completions SET status = 'succeeded'",
                      "DELETE FROM run_completions"):
        with pytest.raises(Exception, match="append-only"):
            tamper.sql(statement)
