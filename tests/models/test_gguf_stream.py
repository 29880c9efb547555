"""Slow: the streaming GGUF reader gives exactly transformers' tensors for the demo model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_streamed_tensors_equal_transformers_loader() -> None:
    from transformers import AutoModelForCausalLM

    from quantmill.plugins.models.demo import DEMO_FILENAME, fetch_demo_model
    from quantmill.plugins.models.sources import GGUFSource

    cached = Path.home() / ".quantmill" / "models" / DEMO_FILENAME
    path = cached if cached.is_file() else fetch_demo_model()
    ours = GGUFSource().load(path, torch.device("cpu")).model.state_dict()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=torch.float32).state_dict()
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
