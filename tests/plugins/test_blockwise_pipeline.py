"""The block-wise calibration pipeline: staging, compact results, the work area and
block-level resume (bit-identical results after an interruption; damaged or foreign work areas
never used)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantmill.plugins.base import CalibrationSet, QuantizedWeight, QuantPlan
from quantmill.plugins.blockwise import pipeline
from quantmill.plugins.blockwise.pipeline import compact, expand
from quantmill.plugins.blockwise.resume import (
    INDEX,
    DirectoryBlockStore,
    WorkArea,
    block_object,
    decode,
    encode,
    stream_object,
)
from quantmill.plugins.blockwise.stages import find_stages
from quantmill.plugins.hadamard import InputRotation
from quantmill.plugins.models.modules import quantizable_linears


@pytest.fixture(scope="module")
def four_block_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def calibration():
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))
    return CalibrationSet(input_ids=ids, description={"test": True})


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_compacted_codes_round_trip(bits: int) -> None:
    """Finished modules' integers wait packed until the pass ends: exactly recovered, and
    smaller in memory wherever two or more values fit in a byte."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (48, 576), generator=g).to(torch.uint8)
    qw = QuantizedWeight(intweight=codes, scales=torch.ones(5, 48), zeros=torch.zeros(5, 48,
                         dtype=torch.int32), g_idx=torch.arange(576, dtype=torch.int32) // 128,
                         bits=bits, group_size=128, sym=False)
    parked = compact(qw)
    if bits <= 4:
        assert parked is not qw and parked.packed.numel() * (8 // bits) == codes.numel()
        assert parked.weight.intweight.numel() == 0
    else:
        assert parked is qw
    assert torch.equal(expand(parked).intweight, codes)


class _BufferReusingBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        buffer = torch.empty_like(h)
        buffer.copy_(h * 2)
        x = buffer.view(h.shape)
        first = self.a(x) + self.b(x)  # a and b read one tensor: one stage
        buffer.copy_(first.relu())  # the memory now holds another activation
        return self.c(buffer.view(h.shape))


def test_watched_stages_follow_tensor_identity_not_reused_memory() -> None:
    block = _BufferReusingBlock()
    planned = {"a": block.a, "b": block.b, "c": block.c}
    assert find_stages(block, planned, torch.randn(2, 3, 8), {}, "block",
                       "test") == [("a", "b"), ("c",)]


def test_work_area_values_round_trip_bit_for_bit() -> None:
    rotation = InputRotation.for_site(64, 0, "model.layers.0.self_attn.q_proj")
    qw = QuantizedWeight(intweight=torch.randint(0, 16, (8, 64), dtype=torch.uint8),
                         scales=torch.rand(1, 8), zeros=torch.zeros(1, 8, dtype=torch.int32),
                         g_idx=torch.zeros(64, dtype=torch.int32), bits=4, group_size=64,
                         sym=True, input_rotation=rotation)
    value = {"w": qw, "details": {"x": 0.1 + 0.2, "n": 3, "ok": True, "none": None},
             "stream": [torch.randn(2, 3), torch.randn(1, 3).to(torch.bfloat16)],
             "dtype": torch.bfloat16}
    back = decode(encode(value))
    assert isinstance(back["w"], QuantizedWeight)
    for name in ("intweight", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back["w"], name), getattr(qw, name))
    assert torch.equal(back["w"].input_rotation.signs, rotation.signs)
    assert back["details"] == value["details"] and back["dtype"] is torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(back["stream"], value["stream"], strict=True))


def test_work_area_refuses_classes_from_outside_quantmill() -> None:
    """Nothing but quantmill.plugins dataclasses is rebuilt: a work area in shared storage
    cannot make quantmill import or construct anything else."""
    data = encode({"v": 1})
    header = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header])
    meta["__metadata__"]["quantmill"] = json.dumps(
        {"dataclass": "subprocess:Popen", "fields": {}})
    forged = json.dumps(meta).encode()
    forged += b" " * (-len(forged) % 8)
    with pytest.raises(ValueError, match="outside quantmill.plugins"):
        decode(len(forged).to_bytes(8, "little") + forged + data[8 + header:])


def _gptq(model, calibration, work_area=None, **settings):
    from quantmill.plugins.quantizers.gptq.plugin import GPTQQuantizer

    quantizer = GPTQQuantizer.from_options({"bits": 4, "group_size": 32, **settings})
    plan = QuantPlan({n: quantizer.default_spec() for n in quantizable_linears(model)})
    return quantizer.quantize(model, plan, calibration, work_area=work_area)


def _clustering(model, calibration, work_area=None):
    from quantmill.plugins.quantizers.clustering.plugin import ClusteringQuantizer

    quantizer = ClusteringQuantizer.from_options({"bits": 3, "compensate": True,
                                                  "iterations": 4})
    plan = QuantPlan({n: quantizer.default_spec() for n in quantizable_linears(model)})
    return quantizer.quantize(model, plan, calibration, work_area=work_area)


def _trellis(model, calibration, work_area=None):
    from quantmill.plugins.quantizers.trellis.plugin import TrellisQuantizer

    quantizer = TrellisQuantizer.from_options({"bits": 2, "sequence_length": 64,
                                               "tile_width": 16})
    plan = QuantPlan({n: quantizer.default_spec() for n in quantizable_linears(model)})
    return quantizer.quantize(model, plan, calibration, work_area=work_area)


def _tensors(result) -> dict[str, torch.Tensor]:
    out = {}
    for name, weight in result.weights.items():
        for field, value in vars(weight).items():
            if isinstance(value, torch.Tensor):
                out[f"{name}.{field}"] = value
    out.update({f"float.{k}": v for k, v in result.float_overrides.items()})
    return out


class _Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, block_index: int) -> None:
    """Make the pipeline die right after block ``block_index`` is recorded, as a kill would."""
    real = WorkArea.record

    def record(self, index, outcome, stream):
        real(self, index, outcome, stream)
        if index == block_index:
            raise _Interrupted

    monkeypatch.setattr(WorkArea, "record", record)


@pytest.mark.parametrize("method", [_gptq, _clustering, _trellis],
                         ids=["gptq", "clustering", "trellis"])
@pytest.mark.slow
def test_interrupted_run_resumes_at_the_next_block_with_identical_results(
        four_block_llama, calibration, tmp_path: Path, monkeypatch, method) -> None:
    whole = method(four_block_llama, calibration)
    area = WorkArea(DirectoryBlockStore(tmp_path / "work"), key="job-1")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(_Interrupted):
            method(four_block_llama, calibration, area)
    assert json.loads((tmp_path / "work" / INDEX).read_text())["last_block"] == 1
    computed: list[int] = []
    real_working_copy = pipeline._working_copy

    def spy(block, device, name, fetcher):
        computed.append(int(name.rsplit(".", 1)[1]))
        return real_working_copy(block, device, name, fetcher)

    monkeypatch.setattr(pipeline, "_working_copy", spy)
    resumed = method(four_block_llama, calibration,
                     WorkArea(DirectoryBlockStore(tmp_path / "work"), key="job-1"))
    assert resumed.details["resumed_at_block"] == 2
    assert [i for i in computed if i > 0] == [2, 3]  # block 0 is copied only for the check
    expected, got = _tensors(whole), _tensors(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed.details["layers"] == whole.details["layers"]


def test_gptq_with_block_tuning_resumes_its_float_stream(four_block_llama, calibration,
                                                         tmp_path: Path, monkeypatch) -> None:
    tuning = {"block_tuning": {"epochs": 1, "norms": True, "batch_size": 4}}
    whole = _gptq(four_block_llama, calibration, **tuning)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(_Interrupted):
            _gptq(four_block_llama, calibration,
                  WorkArea(DirectoryBlockStore(tmp_path), key="t"), **tuning)
    resumed = _gptq(four_block_llama, calibration,
                    WorkArea(DirectoryBlockStore(tmp_path), key="t"), **tuning)
    assert resumed.details["resumed_at_block"] == 3
    expected, got = _tensors(whole), _tensors(resumed)
    assert expected.keys() == got.keys() and any(k.startswith("float.") for k in got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "other-key"])
def test_a_damaged_or_foreign_work_area_is_never_used(four_block_llama, calibration,
                                                      tmp_path: Path, monkeypatch,
                                                      damage: str) -> None:
    whole = _gptq(four_block_llama, calibration)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(_Interrupted):
            _gptq(four_block_llama, calibration,
                  WorkArea(DirectoryBlockStore(tmp_path), key="job"))
    victim = tmp_path / block_object(1)
    key = "job"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[-1] ^= 1
        victim.write_bytes(bytes(data))
    elif damage == "delete":
        (tmp_path / stream_object(2)).unlink()
    else:
        key = "another job"
    area = WorkArea(DirectoryBlockStore(tmp_path), key=key)
    again = _gptq(four_block_llama, calibration, area)
    assert again.details["resumed_at_block"] == 0 and area.discarded
    expected, got = _tensors(whole), _tensors(again)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_crash_between_the_writes_of_a_block_leaves_a_usable_area(
        four_block_llama, calibration, tmp_path: Path, monkeypatch) -> None:
    """Killed after block 2's files were written but before the index named them: the rerun
    uses the index as it was (blocks 0-1) and finishes with the same result."""
    whole = _gptq(four_block_llama, calibration)
    store = DirectoryBlockStore(tmp_path)
    real_write = DirectoryBlockStore.write

    def write(self, name, data):
        if name == INDEX and json.loads(data)["last_block"] == 2:
            raise _Interrupted
        real_write(self, name, data)

    with monkeypatch.context() as patch:
        patch.setattr(DirectoryBlockStore, "write", write)
        with pytest.raises(_Interrupted):
            _gptq(four_block_llama, calibration, WorkArea(store, key="job"))
    assert (tmp_path / stream_object(2)).exists()
    resumed = _gptq(four_block_llama, calibration, WorkArea(store, key="job"))
    assert resumed.details["resumed_at_block"] == 2
    expected, got = _tensors(whole), _tensors(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
