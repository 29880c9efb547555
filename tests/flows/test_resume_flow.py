"""Block-level resume of a real ``quantmill run`` killed with SIGKILL in the middle of its
quantization: the rerun continues at the next block, says so, and writes the same checkpoint
(same sha256) as an uninterrupted run; a changed input starts from block 0; the work area is
gone once the run is registered."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
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
    return tiny_recipe(file,
                       model={"path": str(model), "source": "hf"},
                       calibration={"num_samples": 4, "seq_len": 32, "seed": seed},
                       quantization=method, evaluation=[{"evaluator": "size"}],
                       export={"format": "gptq" if method["method"] == "gptq"
                               else method["method"]})


def _run(recipe: Path, home: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUANTMILL_HOME": str(home), "COLUMNS": "200"}
    env.pop("QUANTMILL_DATABASE_URL", None)
    env.pop("QUANTMILL_FAILPOINT", None)
    if failpoint:
        env["QUANTMILL_FAILPOINT"] = failpoint
    # output to files, and the child in a process group of its own: a killed run cannot stop
    # the Prefect server it started, which would hold pipes open and outlive the test
    out, err = home.parent / f"{home.name}.out", home.parent / f"{home.name}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "quantmill.flows.cli", "run",
                                  str(recipe)], env=env, stdout=stdout, stderr=stderr,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(child.args, code, out.read_text(), err.read_text())


def _checkpoint_sha(home: Path) -> str:
    os.environ["QUANTMILL_HOME"] = str(home)
    with Registry.open() as reg:
        (checkpoint,) = reg.list_artifacts(kind="checkpoint")
    return checkpoint.sha256


METHODS = {
    "gptq": {"method": "gptq", "bits": 4, "group_size": 32},
    "clustering": {"method": "clustering", "bits": 3, "compensate": True, "iterations": 4},
    "trellis": {"method": "trellis", "bits": 2, "sequence_length": 64, "tile_width": 16},
}


@pytest.mark.parametrize("method", ["gptq"])
def test_killed_run_resumes_at_the_next_block_with_the_same_checkpoint(
        quantmill_home: Path, tmp_path: Path, tiny_recipe, six_block_model: Path,
        monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    recipe = _recipe(tiny_recipe, six_block_model, METHODS[method])
    whole_home = tmp_path / "uninterrupted"
    assert _run(recipe, whole_home).returncode == 0
    expected = _checkpoint_sha(whole_home)

    killed = _run(recipe, quantmill_home, failpoint="kill-after-block:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    work = quantmill_home / "storage" / "work"
    (area,) = work.iterdir()
    monkeypatch.setenv("QUANTMILL_HOME", str(quantmill_home))
    listing = CliRunner().invoke(app, ["work", "list"], env={"COLUMNS": "200"})
    assert area.name[:16] in listing.stdout and "0-2" in listing.stdout

    rerun = _run(recipe, quantmill_home)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at block 3 of {BLOCKS}" in rerun.stderr
    assert _checkpoint_sha(quantmill_home) == expected
    assert not any(work.iterdir())  # registered: the finished blocks are gone
    with Registry.open() as reg:
        (done,) = reg.list_runs(kind="quantization", status="succeeded")
    assert done.details["quantizer"]["resumed_at_block"] == 3
