"""Deferred weights: decoder-block linears and the embeddings stay on the meta device until GPTQ
needs them; the result and the checkpoint are exactly those of a fully loaded model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from quantmill.plugins.base import CalibrationSet, QuantPlan
from quantmill.plugins.formats.gptq import write_gptq_checkpoint
from quantmill.plugins.models import deferred
from quantmill.plugins.models.modules import quantizable_linears
from quantmill.plugins.models.sources import HFDirectorySource
from quantmill.plugins.quantizers.gptq.plugin import GPTQQuantizer

CPU = torch.device("cpu")


def test_deferred_load_leaves_block_linears_and_embeddings_on_meta(tiny_model_dir: Path) -> None:
    loaded = HFDirectorySource().load_deferred(tiny_model_dir, CPU)
    meta = {n for n, p in loaded.model.named_parameters(remove_duplicate=False) if p.is_meta}
    linears = set(quantizable_linears(loaded.model))
    embeddings = {"model.embed_tokens.weight", "lm_head.weight"}
    assert meta == {f"{n}.weight" for n in linears} | embeddings
    assert deferred.fetcher_of(loaded.model) is not None
    assert not loaded.model.model.norm.weight.is_meta  # small tensors are loaded
    full = HFDirectorySource().load(tiny_model_dir, CPU).model.state_dict()
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # still tied
    stored = meta - {"lm_head.weight"}  # the file holds the tied embedding once
    fetched = deferred.fetcher_of(loaded.model).fetch(sorted(stored))
    assert all(torch.equal(fetched[k], full[k]) for k in stored)


def test_gptq_on_deferred_model_equals_full_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    ids = torch.randint(0, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    q = GPTQQuantizer.from_options({"bits": 4, "group_size": 32, "batch_size": 4})
    results, checkpoints = [], []
    for how in ("load", "load_deferred"):
        loaded = getattr(HFDirectorySource(), how)(tiny_model_dir, CPU)
        names = quantizable_linears(loaded.model, q.skip_patterns())
        # leave one block linear unquantized: the writer must fetch its deferred weight
        plan = QuantPlan({n: q.default_spec() for n in names if not n.endswith("1.mlp.up_proj")})
        result = q.quantize(loaded.model, plan, CalibrationSet(ids, {}))
        if how == "load_deferred":  # the embedding was only borrowed for the capture pass
            assert loaded.model.model.embed_tokens.weight.is_meta
            assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
        results.append(result)
        out = tmp_path / how
        write_gptq_checkpoint(loaded, result, out)
        checkpoints.append(load_file(str(out / "model.safetensors")))
    full, lazy = results
    assert set(full.weights) == set(lazy.weights) and len(full.weights) == 13
    for name in full.weights:
        assert torch.equal(full.weights[name].intweight, lazy.weights[name].intweight)
        assert torch.equal(full.weights[name].scales, lazy.weights[name].scales)
    assert set(checkpoints[0]) == set(checkpoints[1])
    assert all(torch.equal(checkpoints[0][k], checkpoints[1][k]) for k in checkpoints[0])
    assert "model.layers.1.mlp.up_proj.weight" in checkpoints[1]
