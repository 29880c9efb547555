"""Calibration sources: fixed-seed windows, content hash of the token ids, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantmill.plugins.calibration.text import JSONLCalibrationSource, TextCalibrationSource
from quantmill.plugins.errors import QuantmillError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_text_windows_are_seeded_and_hashed(tokenizer, wikitext_dir: Path) -> None:
    opts = {"path": wikitext_dir / "valid.txt", "num_samples": 8, "seq_len": 64, "seed": 0}
    first = TextCalibrationSource.from_options(opts).build(tokenizer)
    again = TextCalibrationSource.from_options(opts).build(tokenizer)
    other = TextCalibrationSource.from_options({**opts, "seed": 1}).build(tokenizer)
    assert first.input_ids.shape == (8, 64) and first.input_ids.dtype == torch.int64
    assert torch.equal(first.input_ids, again.input_ids)
    assert first.sha256 == again.sha256 != other.sha256
    # every window is a contiguous slice of the tokenized stream
    stream = tokenizer(opts["path"].read_text(), add_special_tokens=False)["input_ids"]
    text = " ".join(map(str, stream))
    assert " ".join(map(str, first.input_ids[0].tolist())) in text


def test_jsonl_source(tokenizer, tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"record number {i} says hello to the world"}) for i in range(50)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    calib = JSONLCalibrationSource.from_options({"path": path, "num_samples": 4,
                                                 "seq_len": 16}).build(tokenizer)
    assert calib.input_ids.shape == (4, 16)


def test_jsonl_missing_field(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(QuantmillError, match="no string field 'text'"):
        JSONLCalibrationSource.from_options({"path": path}).build(tokenizer)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    with pytest.raises(QuantmillError, match="calibration file is empty"):
        TextCalibrationSource.from_options({"path": path}).check()


def test_text_shorter_than_window(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("a few words")
    with pytest.raises(QuantmillError, match="shorter than one window of seq_len=512"):
        TextCalibrationSource.from_options({"path": path}).check()  # cheap, before any work
    path.write_text("the same words again " * 40)  # enough bytes, too few tokens
    with pytest.raises(QuantmillError, match="tokens, fewer than seq_len=512"):
        TextCalibrationSource.from_options({"path": path}).build(tokenizer)
