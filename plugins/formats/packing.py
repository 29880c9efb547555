"""Bit packing for the GPTQ checkpoint layout: pure tensor functions, no plugin wiring.

The GPTQ layout stores b-bit integers in int32 words as one little-endian bit stream: along the
packed dimension, value ``j`` starts at bit ``j * b`` of the stream, and word ``w`` holds stream
bits ``32 * w .. 32 * w + 31``. For 2, 4 and 8 bits no value crosses a word boundary, which is
AutoGPTQ's simple loop; for 3 bits every 32 values fill exactly 3 words and values 10 and 21
straddle two words, which is AutoGPTQ's special 3-bit loop. Writing the rule once as a bit stream
gives both, and extends unchanged to 5, 6 and 7 bits (quantmill extensions that other runtimes
do not read).

Why the arithmetic runs in int64: shifting a value into bit 31 of an int32 overflows, and relying
on wrap-around is undefined in spirit and fragile across backends. We accumulate the unsigned
32-bit word in int64 and then map it to int32 with an explicit two's-complement step.
"""

from __future__ import annotations

import math

import torch

MIN_BITS = 2
MAX_BITS = 8
WORD_BITS = 32
_WORD_MASK = (1 << WORD_BITS) - 1


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _block(bits: int) -> tuple[int, int]:
    """The smallest run of values that fills whole words: (values per block, words per block).

    4 bits: 8 values in 1 word; 3 bits: 32 values in 3 words; 6 bits: 16 values in 3 words. The
    values-per-block count is at most 32, which bounds the Python loops below.
    """
    g = math.gcd(bits, WORD_BITS)
    return WORD_BITS // g, bits // g


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> int32 with the same bit pattern.

    Values >= 2**31 become negative (two's complement), done explicitly rather than by an
    overflowing cast.
    """
    signed = torch.where(words >= (1 << 31), words - (1 << WORD_BITS), words)
    return signed.to(torch.int32)


def packed_length(length: int, bits: int) -> int:
    """How many int32 words hold ``length`` values of ``bits`` bits (must divide exactly)."""
    _check_bits(bits)
    if (length * bits) % WORD_BITS:
        raise ValueError(
            f"cannot pack {length} values of {bits} bits into whole int32 words "
            f"({length} * {bits} is not a multiple of 32)"
        )
    return length * bits // WORD_BITS


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers along dim 0: int [K, N] in [0, 2**bits) -> int32 [K * bits / 32, N].

    This is the qweight layout, with K = in_features and N = out_features. Requires
    ``K * bits % 32 == 0`` (K a multiple of 32 always suffices).
    """
    _check_bits(bits)
    if values.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor, got shape {tuple(values.shape)}")
    k, n = values.shape
    if (k * bits) % WORD_BITS:
        raise ValueError(
            f"cannot pack a tensor of shape {tuple(values.shape)} along dim 0 at {bits} bits: "
            f"{k} * {bits} is not a multiple of 32"
        )
    if values.is_floating_point() or values.is_complex():
        raise ValueError(f"pack_rows expects integer values, got {values.dtype}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(
            f"values to pack at {bits} bits must lie in [0, {(1 << bits) - 1}], "
            f"got [{int(v.min())}, {int(v.max())}]"
        )
    per_block, words_per_block = _block(bits)
    blocks = k // per_block
    v = v.reshape(blocks, per_block, n)  # [B, values per block, N]
    out = torch.zeros(blocks, words_per_block, n, dtype=torch.int64, device=v.device)
    for j in range(per_block):
        offset = j * bits
        word, shift = divmod(offset, WORD_BITS)
        out[:, word] |= (v[:, j] << shift) & _WORD_MASK
        if shift + bits > WORD_BITS:  # the value straddles into the next word
            out[:, word + 1] |= v[:, j] >> (WORD_BITS - shift)
    return _to_int32(out.reshape(blocks * words_per_block, n))  # [K * bits / 32, N]


def unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [K * bits / 32, N] -> int32 [K, N] in [0, 2**bits)."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D tensor, got shape {tuple(packed.shape)}")
    rows = packed_length(k, bits)
    if packed.shape[0] != rows:
        raise ValueError(
            f"a packed tensor of {k} values at {bits} bits has {rows} rows, "
            f"got shape {tuple(packed.shape)}"
        )
    n = packed.shape[1]
    per_block, words_per_block = _block(bits)
    blocks = k // per_block
    words = (packed.to(torch.int64) & _WORD_MASK).reshape(blocks, words_per_block, n)  # [B, W, N]
    mask = (1 << bits) - 1
    out = torch.empty(blocks, per_block, n, dtype=torch.int64, device=packed.device)
    for j in range(per_block):
        word, shift = divmod(j * bits, WORD_BITS)
        value = words[:, word] >> shift
        if shift + bits > WORD_BITS:  # the high bits come from the next word
            value = value | (words[:, word + 1] << (WORD_BITS - shift))
        out[:, j] = value & mask
    return out.reshape(k, n).to(torch.int32)  # [K, N]


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers along dim 1: int [M, N] -> int32 [M, N * bits / 32] (the qzeros layout)."""
    if values.dim() != 2:
        raise ValueError(f"pack_cols expects a 2-D tensor, got shape {tuple(values.shape)}")
    if (values.shape[1] * bits) % WORD_BITS and MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"cannot pack a tensor of shape {tuple(values.shape)} along dim 1 at {bits} bits: "
            f"{values.shape[1]} * {bits} is not a multiple of 32"
        )
    # [M, N] -> [N, M] -> packed [N * bits / 32, M] -> [M, N * bits / 32]
    return pack_rows(values.T, bits).T.contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: int32 [M, N * bits / 32] -> int32 [M, N]."""
    if packed.dim() != 2:
        raise ValueError(f"unpack_cols expects a 2-D tensor, got shape {tuple(packed.shape)}")
    # [M, N * bits / 32] -> [N * bits / 32, M] -> [N, M] -> [M, N]
    return unpack_rows(packed.T, bits, n).T.contiguous()
