"""Slow: the demo recipe on the real SmolLM2-135M (fetched from PyPI), with fewer evaluation
windows. Checks the numbers are those of a real 4-bit model, not just that the job ran."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from quantmill.flows.cli import app
from quantmill.registry import Registry

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_model() -> Path:
    from quantmill.plugins.models.demo import DEMO_FILENAME, fetch_demo_model

    cached = Path.home() / ".quantmill" / "models" / DEMO_FILENAME
    return cached if cached.is_file() else fetch_demo_model()


def _example(name: str, quantmill_home: Path, demo_model: Path) -> dict:
    """An example recipe with the demo model in this test's home, the repository's data
    files and 8 evaluation windows."""
    recipe = yaml.safe_load((REPO / "examples" / name).read_text())
    models = quantmill_home / "models"
    models.mkdir()
    shutil.copy(demo_model, models / demo_model.name)
    recipe["calibration"]["path"] = str(REPO / "data/wikitext-2/valid.txt")
    recipe["evaluation"][0]["dataset"] = str(REPO / "data/wikitext-2/test.txt")
    recipe["evaluation"][0]["max_windows"] = 8
    return recipe


def test_demo_recipe_on_smollm2(quantmill_home: Path, demo_model: Path, tmp_path: Path) -> None:
    recipe = _example("demo-smollm2-rtn-w4g128.yaml", quantmill_home, demo_model)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(recipe))

    result = CliRunner().invoke(app, ["run", "--lineage", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.stdout}\n{result.stderr}"
    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        [base] = reg.list_artifacts(kind="model")
        q = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
        b = {m.name: m.value for m in reg.metrics_for_artifact(base.id)}
    assert 15 < b["perplexity"] < 40  # a trained 135M model, not random weights
    assert b["perplexity"] < q["perplexity"] < 1.5 * b["perplexity"]
    assert 4.1 < q["bits_per_weight"] < 4.3
    assert q["disk_bytes"] < 120e6
    assert "calibration_set" in result.stdout and "base_model" in result.stdout


def test_demo_model_on_s3(quantmill_home: Path, demo_model: Path, tmp_path: Path,
                          s3_env) -> None:
    """The S3 example recipe on the real model against SeaweedFS: stored, published, listed,
    verified from the bucket, and the published directory loads in transformers unaided."""
    import json

    import boto3
    from botocore.config import Config

    recipe = _example("smollm2-rtn-w4g128-s3.yaml", quantmill_home, demo_model)
    recipe["storage"].update(bucket="quantmill-tests", prefix="demo-store",
                             endpoint_url=s3_env.endpoint)
    recipe["export"]["publish"] = "s3://quantmill-tests/demo-published/smollm2/"
    path = tmp_path / "demo-s3.yaml"
    path.write_text(yaml.safe_dump(recipe))

    runner = CliRunner()
    result = runner.invoke(app, ["run", "--lineage", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.stdout}\n{result.stderr}"
    with Registry.open() as reg:
        [ckpt] = reg.list_artifacts(kind="checkpoint")
        q = {m.name: m.value for m in reg.metrics_for_artifact(ckpt.id)}
        roles = [loc.role for loc in reg.locations(ckpt.id)]
    assert ckpt.uri.startswith("s3://quantmill-tests/demo-store/trees/sha256/")
    assert roles == ["stored", "published"] and 4.1 < q["bits_per_weight"] < 4.3
    shown = runner.invoke(app, ["artifacts", "show", str(ckpt.id)])
    assert [loc["uri"] for loc in json.loads(shown.stdout)["locations"]][1] == \
        "s3://quantmill-tests/demo-published/smollm2/"
    verified = runner.invoke(app, ["registry", "verify", "--files"])
    assert verified.exit_code == 0 and "OK" in verified.stdout, verified.stdout

    client = boto3.client("s3", endpoint_url=s3_env.endpoint, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}))
    download = tmp_path / "published"
    listing = client.list_objects_v2(Bucket="quantmill-tests", Prefix="demo-published/smollm2/")
    for item in listing["Contents"]:
        target = download / item["Key"].removeprefix("demo-published/smollm2/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file("quantmill-tests", item["Key"], str(target))
    config = json.loads((download / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4  # a GPTQ checkpoint, as runtimes read it
    from quantmill.plugins.hashing import sha256_path

    assert sha256_path(download)[0] == ckpt.sha256


def test_demo_gptq_killed_halfway_resumes_with_the_same_checkpoint(
        quantmill_home: Path, demo_model: Path, tmp_path: Path, run_quantmill) -> None:
    """The GPTQ example recipe on SmolLM2-135M, SIGKILLed after block 14 of 30: the rerun
    continues at block 15 and writes the checkpoint an uninterrupted run writes. Calibrated on
    16 x 256 tokens instead of 64 x 512 (three GPTQ runs of the real model; the resume logic
    does not depend on how much text each block sees)."""
    recipe = _example("smollm2-gptq-w4g128.yaml", quantmill_home, demo_model)
    recipe["calibration"].update(num_samples=16, seq_len=256)
    recipe["evaluation"] = [{"evaluator": "size"}]
    path = tmp_path / "gptq.yaml"
    path.write_text(yaml.safe_dump(recipe))
    whole = tmp_path / "uninterrupted"
    (whole / "models").mkdir(parents=True)
    (whole / "models" / demo_model.name).symlink_to(quantmill_home / "models" / demo_model.name)
    assert run_quantmill(path, whole).returncode == 0

    killed = run_quantmill(path, quantmill_home, failpoint="kill-after-block:14")
    assert killed.returncode == -9, killed.stderr[-2000:]
    rerun = run_quantmill(path, quantmill_home)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming at block 15 of 30" in rerun.stderr
    shas = []
    for home in (whole, quantmill_home):
        os.environ["QUANTMILL_HOME"] = str(home)  # restored by the quantmill_home fixture
        with Registry.open() as reg:
            (checkpoint,) = reg.list_artifacts(kind="checkpoint")
            shas.append(checkpoint.sha256)
    assert shas[0] == shas[1]
