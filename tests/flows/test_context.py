"""One run context per flow run and process: the recipe is resolved and the registry opened once
for all the steps, step results are frozen records, and a context travels as its job ref."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from quantmill.flows import context as context_module
from quantmill.flows import tasks
from quantmill.flows.context import JobRef, RunContext
from quantmill.registry import Registry


def test_the_steps_of_a_job_share_one_job_and_one_registry(
        quantmill_home: Path, tiny_recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"resolve_job": 0, "open": 0}
    real_resolve, real_open = context_module.resolve_job, Registry.open.__func__

    def resolve(*args, **kwargs):
        calls["resolve_job"] += 1
        return real_resolve(*args, **kwargs)

    def open_registry(cls, *args, **kwargs):
        calls["open"] += 1
        return real_open(cls, *args, **kwargs)

    monkeypatch.setattr(context_module, "resolve_job", resolve)
    monkeypatch.setattr(Registry, "open", classmethod(open_registry))
    recipe = tiny_recipe(evaluation=[{"evaluator": "size"}])
    ctx = RunContext.of(JobRef(recipe.read_text(), str(recipe), "job-shared", None))
    try:
        inputs = tasks.register_inputs_step(ctx)
        calibration = tasks.calibrate_step(ctx, inputs)
        base = tasks.evaluate_base_step(ctx, inputs, 0)
        plan = tasks.plan_step(ctx, calibration)
        quantized = tasks.quantize_and_export(ctx, inputs, calibration, plan)
        measured = tasks.evaluate_checkpoint_step(ctx, quantized, 0)
    finally:
        ctx.close()
    assert calls == {"resolve_job": 1, "open": 1}
    for result in (inputs, calibration, base, plan, quantized, measured):
        assert dataclasses.is_dataclass(result)
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.__setattr__(dataclasses.fields(result)[0].name, None)
    # what passed between the steps is stored content, not a scratch path
    assert quantized.checkpoint.uri.startswith("file://")
    assert not (ctx.work_dir / "checkpoint").exists()
    assert measured.target == "quantized" and base.recorded_by_run is not None


def test_a_context_travels_as_its_ref(tmp_path: Path) -> None:
    ref = JobRef("name: x\n", str(tmp_path / "r.yaml"), "job-travels", None)
    ctx = RunContext.of(ref)
    try:
        assert pickle.loads(pickle.dumps(ctx)) is ctx  # same process: the same context
        payload = pickle.dumps(ctx)
        assert len(payload) < 1000  # the ref, not the job, its plugins or a model
        script = ("import pickle, sys; ctx = pickle.loads(sys.stdin.buffer.read()); "
                  "print(type(ctx).__name__, ctx.ref.job_id, 'job' in ctx.__dict__)")
        other = subprocess.run([sys.executable, "-c", script], input=payload,
                               capture_output=True, check=True)
        assert other.stdout.decode().split() == ["RunContext", "job-travels", "False"]
    finally:
        ctx.close()
    assert RunContext.of(ref) is not ctx  # closed: forgotten
    RunContext.of(ref).close()
