"""Bad input stops the CLI with one clear line and a non-zero exit, before anything is
registered (validation runs before Prefect or the registry are touched)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantmill.flows.cli import app

runner = CliRunner()


def _run(path: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["run", str(path)])
    return result.exit_code, result.stderr.strip()


def _assert_nothing_registered(home: Path) -> None:
    from quantmill.registry import Registry

    with Registry.open() as reg:
        assert reg.list_artifacts() == []
        assert reg.list_runs() == []


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _pickle_dir(tmp_path: Path) -> Path:
    d = _empty_dir(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    return d


def _binary_calibration(tmp_path: Path) -> Path:
    f = tmp_path / "binary.txt"
    f.write_bytes(b"\xff\xfe\x00\x81" * 400)
    return f


def _empty_calibration(tmp_path: Path) -> Path:
    f = tmp_path / "empty.txt"
    f.write_text("")
    return f


CASES = [
    ("missing model path", lambda t, m: {"model": {"path": str(t / "nope"), "source": "hf"}},
     "model path does not exist"),
    ("no weights", lambda t, m: {"model": {"path": str(_empty_dir(t)), "source": "hf"}},
     "no weights in model directory"),
    ("pickle only", lambda t, m: {"model": {"path": str(_pickle_dir(t)), "source": "hf"}},
     "refuses pickle files"),
    ("unknown quantizer", lambda t, m: {"quantization": {"method": "magic"}},
     "unknown quantizer 'magic'"),
    ("unknown evaluator", lambda t, m: {"evaluation": [{"evaluator": "vibes"}]},
     "unknown evaluator 'vibes'"),
    ("bits too high", lambda t, m: {"quantization": {"bits": 9}}, "quantization.bits"),
    ("bits too low", lambda t, m: {"quantization": {"bits": 1}}, "quantization.bits"),
    ("group size 0", lambda t, m: {"quantization": {"group_size": 0}},
     "group_size must be -1 (per channel) or positive, got 0"),
    ("group size -2", lambda t, m: {"quantization": {"group_size": -2}},
     "group_size must be -1 (per channel) or positive, got -2"),
    ("unknown recipe key", lambda t, m: {"quantisation": {}}, "unknown key 'quantisation'"),
    ("unknown plugin key", lambda t, m: {"quantization": {"bitz": 3}},
     "unknown key 'quantization.bitz'"),
    ("gptq bits 1", lambda t, m: {"quantization": {"method": "gptq", "bits": 1}},
     "quantization.bits"),
    ("gptq group size 0", lambda t, m: {"quantization": {"method": "gptq", "group_size": 0}},
     "group_size must be -1 (per channel) or positive, got 0"),
    ("gptq damp 0", lambda t, m: {"quantization": {"method": "gptq", "damp_percent": 0}},
     "quantization.damp_percent"),
    ("gptq damp 1", lambda t, m: {"quantization": {"method": "gptq", "damp_percent": 1}},
     "quantization.damp_percent"),
    ("gptq without calibration", lambda t, m: {"calibration": None,
                                               "quantization": {"method": "gptq"}},
     "needs a 'calibration' section"),
    ("calibration not UTF-8", lambda t, m: {"calibration": {"path": str(_binary_calibration(t))}},
     "calibration file is not UTF-8 text"),
    ("evaluation not UTF-8", lambda t, m: {"evaluation": [
        {"evaluator": "perplexity", "dataset": str(_binary_calibration(t))}]},
     "evaluation dataset is not UTF-8 text"),
    ("empty calibration", lambda t, m: {"calibration": {"path": str(_empty_calibration(t))}},
     "calibration file is empty"),
]


@pytest.mark.parametrize("label,override,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path: Path, quantmill_home: Path, tiny_model_dir: Path, tiny_recipe,
                   label: str, override, message: str) -> None:
    code, err = _run(tiny_recipe(**override(tmp_path, tiny_model_dir)))
    assert code == 2, err
    assert message in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:")
    _assert_nothing_registered(quantmill_home)


def test_missing_recipe_file(tmp_path: Path, quantmill_home: Path) -> None:
    result = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "recipe file not found" in result.stderr


def test_validate_accepts_good_recipe(tiny_recipe) -> None:
    path = tiny_recipe()
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(quantmill_home: Path, tiny_recipe) -> None:
    code, err = _run(tiny_recipe(device="cuda"))
    assert code == 2 and "device 'cuda' was asked for" in err
    _assert_nothing_registered(quantmill_home)


@pytest.mark.parametrize("url,message", [
    ("foo://bar", "invalid registry database URL: Can't load plugin"),
    ("not a url", "invalid registry database URL: Could not parse"),
])
def test_bad_database_url(url: str, message: str, quantmill_home: Path) -> None:
    result = runner.invoke(app, ["artifacts", "list", "--database-url", url])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["lineage", "999"], "no artifact with id 999"),
    (["artifacts", "show", "zzzzzz"], "no artifact matches 'zzzzzz'"),
])
def test_unknown_artifact(args: list[str], message: str, quantmill_home: Path) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr


def _one_line_refusal(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    err = result.stderr.strip()
    assert result.exit_code == 2, (err, result.exception)
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error:"), err


MALFORMED_RECIPES = [
    ("binary", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not a YAML text file (not UTF-8"),
    ("bad syntax", b"name: [unclosed\nmodel: {", "is not valid YAML"),
    ("deep flow YAML", b"name: x\nmodel: " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ("deep block YAML", b"name: x\nextra:\n" + b"".join(
        b"  " * i + b"k:\n" for i in range(1, 60)) + b"  " * 60 + b"v: 1\n",
     "nested too deeply"),
    ("a list", b"- name: x\n", "a recipe must be a mapping"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("label,content,message", MALFORMED_RECIPES,
                         ids=[c[0] for c in MALFORMED_RECIPES])
def test_malformed_recipe_files_get_one_line(tmp_path: Path, quantmill_home: Path,
                                             command: str, label: str, content: bytes,
                                             message: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(content)
    _one_line_refusal([command, str(recipe)], message)
    _assert_nothing_registered(quantmill_home)


@pytest.mark.parametrize("name,message", [
    ("''", "invalid 'name'"), ("'   '", "the recipe's name is blank"),
    ('"a\\nb"', "control character")])
def test_a_recipe_must_be_named(tiny_recipe, quantmill_home: Path, name: str,
                                message: str) -> None:
    recipe = tiny_recipe()
    text = "\n".join(f"name: {name}" if line.startswith("name:") else line
                     for line in recipe.read_text().splitlines())
    recipe.write_text(text + "\n")
    for command in ("validate", "run"):
        _one_line_refusal([command, str(recipe)], message)
    _assert_nothing_registered(quantmill_home)


def _corrupt_model(tiny_model_dir: Path, tmp_path: Path, how: str) -> Path:
    import shutil
    import struct

    model = tmp_path / f"model-{how}"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "huge header":
        weights.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    elif how == "garbage header":
        (length,) = struct.unpack("<Q", data[:8])
        weights.write_bytes(data[:8] + b"\xff" * length + data[8 + length:])
    return model


@pytest.mark.parametrize("how,message", [
    ("truncated", "is truncated: tensor"),
    ("huge header", "is truncated or not a safetensors file: its header claims"),
    ("garbage header", "has a corrupt safetensors header")])
def test_a_corrupt_safetensors_model_is_refused_at_validation(
        tiny_recipe, tiny_model_dir: Path, tmp_path: Path, quantmill_home: Path, how: str,
        message: str) -> None:
    model = _corrupt_model(tiny_model_dir, tmp_path, how)
    recipe = tiny_recipe(model={"path": str(model), "source": "hf"})
    for command in ("validate", "run"):
        _one_line_refusal([command, str(recipe)], message)
    _assert_nothing_registered(quantmill_home)


def _tiny_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0.5, 0.002])
def test_a_truncated_gguf_is_refused_at_validation(tiny_recipe, tmp_path: Path,
                                                   quantmill_home: Path, keep: float) -> None:
    from quantmill.plugins.models.headers import check_gguf_file

    model = _tiny_gguf(tmp_path / "tiny.gguf")
    check_gguf_file(model)  # whole: accepted
    data = model.read_bytes()
    model.write_bytes(data[: int(len(data) * keep)])
    recipe = tiny_recipe(model={"path": str(model), "source": "gguf"})
    for command in ("validate", "run"):
        _one_line_refusal([command, str(recipe)], "is truncated or not a valid GGUF file")
    _assert_nothing_registered(quantmill_home)
