"""Calibration from plain text and JSONL files.

Protocol (documented because it decides what a calibration set *is*): the file is tokenized as one
stream with the model's tokenizer (no special tokens added), then ``num_samples`` windows of
``seq_len`` tokens are drawn at start positions chosen uniformly at random by a
``torch.Generator`` seeded with ``seed``. Same file + tokenizer + settings = same token ids =
same content hash, on any machine.

Sample recipe sections::

    calibration:
      source: text
      path: data/wikitext-2/valid.txt
      num_samples: 128
      seq_len: 512
      seed: 0

    calibration:
      source: jsonl
      path: prompts.jsonl
      field: text        # documents are joined with a blank line between them
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from quantmill.plugins.base import CalibrationSet, CalibrationSource, PluginConfig
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hookspecs import hookimpl


class TextCalibrationConfig(PluginConfig):
    path: Path
    num_samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(512, ge=8, le=131_072)
    seed: int = 0


class JSONLCalibrationConfig(TextCalibrationConfig):
    field: str = "text"


def tokenize_stream(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one int64 token stream, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random starts: int64 [N, L]."""
    if stream.numel() < seq_len:
        raise QuantmillError(
            f"calibration text has {stream.numel()} tokens, fewer than seq_len={seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=generator)
    offsets = torch.arange(seq_len)
    return stream[starts[:, None] + offsets[None, :]]  # [N, L]


class TextCalibrationSource(CalibrationSource):
    name = "text"
    Config = TextCalibrationConfig

    def check(self) -> None:
        path = self.config.path
        if not path.is_file():
            raise QuantmillError(f"calibration file not found: {path}")
        try:
            text = self.read_text()
        except UnicodeDecodeError as exc:
            raise QuantmillError(f"calibration file is not UTF-8 text: {path} ({exc.reason} "
                                 f"at byte {exc.start})") from None
        if not text.strip():
            raise QuantmillError(f"calibration file is empty: {path}")
        if len(text.encode()) < self.config.seq_len:  # every token covers at least one byte
            raise QuantmillError(f"calibration file {path} is shorter than one window of "
                                 f"seq_len={self.config.seq_len} tokens")

    def data_files(self) -> list[Path]:
        return [self.config.path]

    def read_text(self) -> str:
        return self.config.path.read_text(encoding="utf-8")

    def build(self, tokenizer: Any) -> CalibrationSet:
        self.check()
        c = self.config
        ids = sample_windows(tokenize_stream(tokenizer, self.read_text()), c.num_samples,
                             c.seq_len, c.seed)
        description = {"source": self.name, "file": c.path.name, "num_samples": c.num_samples,
                       "seq_len": c.seq_len, "seed": c.seed}
        return CalibrationSet(input_ids=ids, description=description)


class JSONLCalibrationSource(TextCalibrationSource):
    name = "jsonl"
    Config = JSONLCalibrationConfig

    def read_text(self) -> str:
        docs = []
        for number, line in enumerate(self.config.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QuantmillError(
                    f"{self.config.path}:{number}: not valid JSON ({exc.msg})"
                ) from None
            value = record.get(self.config.field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise QuantmillError(
                    f"{self.config.path}:{number}: no string field '{self.config.field}'"
                )
            docs.append(value)
        return "\n\n".join(docs)


@hookimpl
def register_calibration_sources() -> list[type[CalibrationSource]]:
    return [TextCalibrationSource, JSONLCalibrationSource]
