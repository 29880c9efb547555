"""The stand-in tokenizer of deferred loads: built once, on first use, and used transparently."""

from __future__ import annotations

from pathlib import Path

import torch

from quantmill.plugins.models.lazy_tokenizer import LazyTokenizer
from quantmill.plugins.models.sources import HFDirectorySource


class CountingLoader:
    def __init__(self, tokenizer):
        self.calls = 0
        self.tokenizer = tokenizer

    def __call__(self):
        self.calls += 1
        return self.tokenizer


def test_built_once_on_first_use(tiny_model_dir: Path) -> None:
    real = HFDirectorySource().load_tokenizer(tiny_model_dir)
    loader = CountingLoader(real)
    lazy = LazyTokenizer(loader)
    assert loader.calls == 0 and not lazy.loaded
    ids = lazy("hello world", add_special_tokens=False)["input_ids"]
    assert ids == real("hello world", add_special_tokens=False)["input_ids"]
    assert lazy.eos_token == real.eos_token and len(lazy) == len(real)
    assert loader.calls == 1 and lazy.loaded


def test_deferred_load_does_not_build_the_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = HFDirectorySource().load_deferred(tiny_model_dir, torch.device("cpu"))
    assert isinstance(loaded.tokenizer, LazyTokenizer) and not loaded.tokenizer.loaded
    loaded.tokenizer.save_pretrained(str(tmp_path))  # what the checkpoint writer does
    assert loaded.tokenizer.loaded and (tmp_path / "tokenizer.json").is_file()
