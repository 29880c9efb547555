"""What a quantized weight costs in bits: the cost model of the mixed-precision allocator.

Why exact integers counted like the checkpoint: a budget of "3.5 bits per weight" is only honest
if it counts everything a module adds to the file, not just its b-bit integers. So a uniform
format is counted exactly as the ``size`` evaluator measures a written GPTQ module
(``plugins/evaluators/size.py``, ``bits_per_weight``): packed int32 ``qweight`` words, packed
``qzeros`` words, fp16 ``scales`` and the int32 ``g_idx``. A codebook format (weight clustering)
costs a b-bit index per weight plus one fp16 table of 2**b entries per output row; a trellis
format (``quantizers/trellis``) b bits per weight plus an fp16 scale per row and per input
column (its table is shared by the whole model and not counted per module). A module
with an input rotation also stores its int8 signs and float32 block. Costs are
whole bits so budgets compare exactly (no float rounding can push a plan over its budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from quantmill.plugins.base import num_groups
from quantmill.plugins.hadamard import split_dimension

WORD_BITS = 32
SCALE_BITS = 16
G_IDX_BITS = 32
CODEBOOK_ENTRY_BITS = 16
TRELLIS_SCALE_BITS = 16

WeightKind = Literal["uniform", "codebook", "trellis"]


@dataclass(frozen=True, order=True)
class Candidate:
    """One format a module may get: ``bits`` per weight and ``group_size`` (-1: per channel).

    For codebook formats the group size does not exist (one table per row) and is ignored.
    """

    bits: int
    group_size: int

    @property
    def label(self) -> str:
        """A short stable name, e.g. ``w4g128`` or ``w8g-1`` (keys of the sensitivity table)."""
        return f"w{self.bits}g{self.group_size}"


def _words(values: int, bits: int) -> int:
    """int32 words holding ``values`` packed ``bits``-bit integers (the writer needs them to fit
    exactly; rounding up keeps the count an upper bound for shapes it would refuse)."""
    return -(-(values * bits) // WORD_BITS)


def rotation_bits(in_features: int) -> int:
    """What a module's input rotation adds (``InputRotation.stored_bits``: int8 signs and a
    float32 block for the odd part of ``in_features``)."""
    m, _ = split_dimension(in_features)
    return 8 * in_features + 32 * m * m


def weight_bits(candidate: Candidate, out_features: int, in_features: int,
                kind: WeightKind = "uniform", rotated: bool = False) -> int:
    """Bits one ``out_features`` x ``in_features`` weight costs in ``candidate``'s format
    (with its input rotation's tensors when ``rotated``)."""
    if rotated:
        return (weight_bits(candidate, out_features, in_features, kind)
                + rotation_bits(in_features))
    b = candidate.bits
    if kind == "trellis":  # tail-biting paths of b bits per weight, fp16 row and column scales
        return b * out_features * in_features + TRELLIS_SCALE_BITS * (out_features + in_features)
    if kind == "codebook":
        return b * out_features * in_features + CODEBOOK_ENTRY_BITS * (2**b) * out_features
    groups = num_groups(in_features, candidate.group_size)
    qweight = _words(in_features, b) * WORD_BITS * out_features
    qzeros = groups * _words(out_features, b) * WORD_BITS
    scales = groups * out_features * SCALE_BITS
    g_idx = in_features * G_IDX_BITS
    return qweight + qzeros + scales + g_idx


def bits_per_weight(candidate: Candidate, out_features: int, in_features: int,
                    kind: WeightKind = "uniform", rotated: bool = False) -> float:
    """``weight_bits`` per weight element (4-bit g128 at 576x576: about 4.21)."""
    return (weight_bits(candidate, out_features, in_features, kind, rotated)
            / (out_features * in_features))
