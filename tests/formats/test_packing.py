"""Bit packing: exact round trips, and agreement with AutoGPTQ's own packing loops."""

from __future__ import annotations

import pytest
import torch

from quantmill.plugins.formats.packing import pack_cols, pack_rows, unpack_cols, unpack_rows

ALL_BITS = [2, 3, 4, 5, 6, 7, 8]


def _random_ints(shape: tuple[int, int], bits: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + bits)
    values = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64)
    values[0, 0] = 2**bits - 1  # make sure the top bit (and word straddling) is exercised
    values[-1, -1] = 2**bits - 1
    return values


def _autogptq_pack_rows(intweight: list[list[int]], bits: int) -> list[list[int]]:
    """AutoGPTQ's QuantLinear.pack loop, ported to plain Python (unsigned 32-bit words).

    ``intweight`` is [K][N] (in_features x out_features); returns [K * bits / 32][N].
    """
    k, n = len(intweight), len(intweight[0])
    rows = k // 32 * bits
    qweight = [[0] * n for _ in range(rows)]

    def put(row: int, col: int, value: int) -> None:
        qweight[row][col] = (qweight[row][col] | value) & 0xFFFFFFFF

    for col in range(n):
        i = 0
        row = 0
        while row < rows:
            if bits in (2, 4, 8):
                for j in range(i, i + 32 // bits):
                    put(row, col, intweight[j][col] << (bits * (j - i)))
                i += 32 // bits
                row += 1
            elif bits == 3:
                for j in range(i, i + 10):
                    put(row, col, intweight[j][col] << (3 * (j - i)))
                i += 10
                put(row, col, intweight[i][col] << 30)
                row += 1
                put(row, col, (intweight[i][col] >> 2) & 1)
                i += 1
                for j in range(i, i + 10):
                    put(row, col, intweight[j][col] << (3 * (j - i) + 1))
                i += 10
                put(row, col, intweight[i][col] << 31)
                row += 1
                put(row, col, (intweight[i][col] >> 1) & 0x3)
                i += 1
                for j in range(i, i + 10):
                    put(row, col, intweight[j][col] << (3 * (j - i) + 2))
                i += 10
                row += 1
            else:  # pragma: no cover - the reference only knows AutoGPTQ's widths
                raise NotImplementedError(bits)
    return qweight


def _unsigned(packed: torch.Tensor) -> list[list[int]]:
    return (packed.to(torch.int64) & 0xFFFFFFFF).tolist()


@pytest.mark.parametrize("bits", ALL_BITS)
def test_rows_round_trip(bits: int) -> None:
    values = _random_ints((64, 5), bits)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (64 * bits // 32, 5)  # [K * b / 32, N]
    assert torch.equal(unpack_rows(packed, bits, 64).to(torch.int64), values)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_cols_round_trip(bits: int) -> None:
    values = _random_ints((3, 96), bits, seed=7)
    packed = pack_cols(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, 96 * bits // 32)  # [M, N * b / 32]
    assert torch.equal(unpack_cols(packed, bits, 96).to(torch.int64), values)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_autogptq_loop(bits: int) -> None:
    values = _random_ints((64, 3), bits, seed=3)
    expected = _autogptq_pack_rows(values.tolist(), bits)
    assert _unsigned(pack_rows(values, bits)) == expected
    # qzeros use the same loop along the output dimension
    zeros = values[:, :2].T.contiguous()  # [2, 64]
    by_rows = _autogptq_pack_rows(zeros.T.tolist(), bits)  # [64 * b / 32][2]
    expected_cols = [list(r) for r in zip(*by_rows, strict=True)]  # [2][64 * b / 32]
    assert _unsigned(pack_cols(zeros, bits)) == expected_cols


def test_three_bit_straddling_values_land_in_two_words() -> None:
    values = torch.zeros(32, 1, dtype=torch.int64)
    values[10, 0] = 0b101  # bits 30, 31 of word 0 and bit 0 of word 1
    values[21, 0] = 0b110  # bit 31 of word 1 and bits 0, 1 of word 2
    words = _unsigned(pack_rows(values, 3))
    assert words == [[0b01 << 30], [1 | (0 << 31)], [0b11]]


def test_two_complement_wrap() -> None:
    packed = pack_rows(torch.full((8, 2), 15), 4)  # every bit set
    assert packed.tolist() == [[-1, -1]]
    packed = pack_rows(torch.tensor([[0]] * 7 + [[8]]), 4)  # only bit 31 set
    assert packed.tolist() == [[-(2**31)]]


def test_small_runs_that_fill_whole_words() -> None:
    values = torch.tensor([[1], [2], [3], [0], [1], [2], [3], [0]])  # 8 x 4 bits = 1 word
    assert pack_rows(values, 4).shape == (1, 1)
    assert torch.equal(unpack_rows(pack_rows(values, 4), 4, 8).to(torch.int64), values)


def test_refuses_lengths_that_do_not_fill_words() -> None:
    with pytest.raises(ValueError, match=r"\(48, 4\)"):
        pack_rows(torch.zeros(48, 4, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"\(4, 20\)"):
        pack_cols(torch.zeros(4, 20, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="rows"):
        unpack_rows(torch.zeros(5, 4, dtype=torch.int32), 4, 32)


def test_refuses_out_of_range_values_and_bits() -> None:
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.full((32, 1), 16), 4)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.full((32, 1), -1), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_rows(torch.zeros(32, 1, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match="integer"):
        pack_rows(torch.zeros(32, 1), 4)
