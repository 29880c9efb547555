"""Resume of a real ``quantmill run`` killed with SIGKILL: in the middle of its quantization
(the rerun continues at the next block, says so, and writes the same checkpoint, same sha256,
as an uninterrupted run; a changed input starts from block 0), and after its checkpoint was
stored and measured (the rerun quantizes and measures nothing). The killed run is closed as
abandoned by the next run; the work area is gone once the run is registered."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.registry import Registry

BLOCKS = 6


@pytest.fixture(scope="module")
def six_block_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny test Llama with six decoder blocks (and its tokenizer)."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("six-blocks")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = BLOCKS
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in tiny_model_dir.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(name, path / name.name)
    return path


def _recipe(tiny_recipe, model: Path, method: dict, seed: int = 0, file: str = "r.yaml"):
    import yaml

    path = tiny_recipe(file,
                       model={"path": str(model), "source": "hf"},
                       calibration={"num_samples": 4, "seq_len": 32, "seed": seed},
                       evaluation=[{"evaluator": "size"}],
                       export={"format": EXPORTS[method["method"]]})
    recipe = yaml.safe_load(path.read_text())
    recipe["quantization"] = dict(method)  # exactly the method's keys, no RTN defaults
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_work_clean_removes_what_an_interrupted_job_left(quantmill_home: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from quantmill.storage.local import LocalStorage

    storage = LocalStorage()
    for key in ("a1" * 32, "b2" * 32):
        storage.work_area(key).write("index.json", b'{"last_block": 4}')
    runner = CliRunner()
    refused = runner.invoke(app, ["work", "clean"])
    assert refused.exit_code == 2 and "pass --all" in refused.stderr
    assert runner.invoke(app, ["work", "clean", "a1a1"]).exit_code == 0
    assert storage.work_area_keys() == ["b2" * 32]
    assert runner.invoke(app, ["work", "clean", "--all"]).exit_code == 0
    assert storage.work_area_keys() == []


def _checkpoint_sha(home: Path) -> str:
    os.environ["QUANTMILL_HOME"] = str(home)
    with Registry.open() as reg:
        (checkpoint,) = reg.list_artifacts(kind="checkpoint")
    return checkpoint.sha256


def _outputs(reg: Registry, run_id: int) -> set[int]:
    return {edge.artifact_id for edge in reg.run_edges(run_id) if edge.direction == "output"}


EXPORTS = {"gptq": "gptq", "clustering": "lut", "trellis": "trellis"}
METHODS = {
    "gptq": {"method": "gptq", "bits": 4, "group_size": 32},
    "clustering": {"method": "clustering", "bits": 3, "compensate": True, "iterations": 4},
    "trellis": {"method": "trellis", "bits": 2, "sequence_length": 64, "tile_width": 16},
}


@pytest.mark.parametrize("method", ["gptq", pytest.param("clustering", marks=pytest.mark.slow),
                                    pytest.param("trellis", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_killed_run_resumes_at_the_next_block_with_the_same_checkpoint(
        quantmill_home: Path, tmp_path: Path, tiny_recipe, six_block_model: Path,
        monkeypatch: pytest.MonkeyPatch, run_quantmill, method: str) -> None:
    recipe = _recipe(tiny_recipe, six_block_model, METHODS[method])
    whole_home = tmp_path / "uninterrupted"
    assert run_quantmill(recipe, whole_home).returncode == 0
    expected = _checkpoint_sha(whole_home)

    killed = run_quantmill(recipe, quantmill_home, failpoint="kill-after-block:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    work = quantmill_home / "storage" / "work"
    (area,) = work.iterdir()
    monkeypatch.setenv("QUANTMILL_HOME", str(quantmill_home))
    listing = CliRunner().invoke(app, ["work", "list"], env={"COLUMNS": "200"})
    assert area.name[:16] in listing.stdout and "0-2" in listing.stdout

    # another calibration seed is another job: it starts from block 0 and leaves the
    # interrupted job's area alone
    reseeded = run_quantmill(_recipe(tiny_recipe, six_block_model, METHODS[method], seed=1,
                            file="seed1.yaml"), quantmill_home)
    assert reseeded.returncode == 0, reseeded.stderr[-3000:]
    assert "resuming" not in reseeded.stderr
    assert [p.name for p in work.iterdir()] == [area.name]
    # the next run on this host found the killed run's process gone and closed its run
    with Registry.open() as reg:
        (abandoned,) = reg.list_runs(status="abandoned")
        assert abandoned.kind == "quantization" and not _outputs(reg, abandoned.id)
    assert "is gone" in abandoned.error and "closed as abandoned" in reseeded.stderr

    rerun = run_quantmill(recipe, quantmill_home)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at block 3 of {BLOCKS}" in rerun.stderr
    with Registry.open() as reg:
        runs = reg.list_runs(kind="quantization", status="succeeded")
        produced = _outputs(reg, runs[0].id)  # newest first: the resumed run
        (checkpoint,) = [a for a in reg.list_artifacts(kind="checkpoint") if a.id in produced]
    assert [r.details["quantizer"]["resumed_at_block"] for r in runs] == [3, 0]
    assert checkpoint.sha256 == expected
    assert not any(work.iterdir())  # registered: the finished blocks are gone


@pytest.mark.slow
def test_a_job_killed_after_measuring_its_checkpoint_quantizes_and_measures_nothing_again(
        quantmill_home: Path, tiny_recipe, six_block_model: Path, run_quantmill) -> None:
    recipe = _recipe(tiny_recipe, six_block_model, METHODS["gptq"])
    killed = run_quantmill(recipe, quantmill_home, failpoint="kill-after-evaluation:size")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    os.environ["QUANTMILL_HOME"] = str(quantmill_home)
    with Registry.open() as reg:
        (base_measurement,) = reg.list_runs(kind="evaluation", status="succeeded")
        (interrupted,) = reg.list_runs(kind="quantization")
    assert interrupted.status == "running"

    rerun = run_quantmill(recipe, quantmill_home)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "the checkpoint an interrupted run stored" in rerun.stderr
    with Registry.open() as reg:
        runs = {r.status: r for r in reg.list_runs(kind="quantization")}
        assert set(runs) == {"abandoned", "succeeded"}
        assert runs["abandoned"].id == interrupted.id
        # the base model was measured once, by the killed job, and the measurement reused
        assert [r.id for r in reg.list_runs(kind="evaluation")] == [base_measurement.id]
        done = runs["succeeded"]
        (checkpoint,) = reg.list_artifacts(kind="checkpoint")
        metrics = {m.name for m in reg.metrics_for_artifact(checkpoint.id)}
    assert done.details["checkpoint_reused_from_work_area"] is True
    assert done.details["base_measured_by_runs"] == {"size": base_measurement.id}
    assert done.details["measured_base"] is False
    assert {"param_count", "bits_per_weight"} <= metrics  # the killed job's measurement
    assert not any((quantmill_home / "storage" / "work").iterdir())


def test_the_work_area_key_changes_with_every_input_of_a_block(monkeypatch) -> None:
    """Calibration, quantizer settings, the plan, the base model and quantmill's version all
    change the key, so a rerun with any of them changed starts from block 0."""
    import torch

    from quantmill.flows import environment, work
    from quantmill.plugins.base import QuantPlan
    from quantmill.plugins.quantizers.gptq.plugin import GPTQQuantizer

    def key(base="a" * 64, calibration="c" * 64, bits=4, damp=0.01, plan_bits=4):
        quantizer = GPTQQuantizer.from_options({"bits": bits, "damp_percent": damp})
        spec = quantizer.default_spec()
        plan = QuantPlan({"model.layers.0.mlp.down_proj":
                          type(spec)(plan_bits, spec.group_size, spec.sym, spec.method)})
        return work.fingerprint(base, calibration, quantizer, plan, torch.device("cpu"))

    reference = key()
    assert key() == reference
    changed = [key(base="b" * 64), key(calibration="d" * 64), key(bits=3), key(damp=0.02),
               key(plan_bits=3)]
    assert len({reference, *changed}) == 6
    real = environment._version
    monkeypatch.setattr(environment, "_version",
                        lambda name: "0.0.0-other" if name == "quantmill" else real(name))
    assert key() != reference
