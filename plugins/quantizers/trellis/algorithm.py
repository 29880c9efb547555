"""Trellis quantization of one linear layer (QTIP-style, with LDLQ error feedback): pure tensor
functions (``plugin.py`` runs them layer by layer;
``bench/experiments/trellis_experiment.py`` is the experiment they came from).

The weight ``W`` [rows, cols] (in the rotated basis, ``plugins/hadamard.py``: close to Gaussian)
is coded as ``W[r, c] = row_scale[r] * col_scale[c] * table[state]``:

* Tiles: the input columns are taken in blocks of ``tile_width``; inside a block, each sequence
  of T weights covers T / tile_width consecutive rows, row after row. Each sequence is one
  tail-biting trellis path of T*k bits (``code.py``).
* Scales: an fp16 scale per input column (per module of a stack: the RMS of the column once each
  row is divided by its RMS, normalised to mean square 1; o_proj-like inputs have very uneven
  column magnitudes) and an fp16 scale per row (``multiplier * rms(row)``, the multiplier from a
  small grid chosen on a sample of rows); after coding, each row scale is refitted by least
  squares in the Hessian norm where that lowers the layer's error.
* Error feedback (block LDLQ): with ``U`` the upper Cholesky factor of ``(H + damp)^-1`` (GPTQ's,
  natural column order) and ``D`` a block's coding error, the later columns get
  ``W_R -= (D U_BB^-1) U_BR``: the optimal compensation of a fixed error on the block (with one
  column per block it is GPTQ's update). Narrow blocks matter: inside a block the trellis only
  minimises the plain squared error (measured in the experiment: block 64 -> 8 lowers the layer
  error 10-40 %).

Bits per weight: k, plus 16 per row and 16 per input column of each module (the table is shared
by every module and counted once per checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from quantmill.plugins.hadamard import InputRotation
from quantmill.plugins.quantizers.trellis.code import (
    Trellis,
    decode_states,
    encode,
    pack_symbols,
    reconstruct,
    symbols,
    unpack_symbols,
)

SCALE_BITS = 16


@dataclass(frozen=True)
class TrellisSettings:
    """How a layer is coded (the trellis itself, L and k, is passed separately)."""

    T: int = 64
    tile_width: int = 8
    scale_candidates: int = 5
    refit_scales: bool = True
    chunk_elems: int = 1 << 24

    @property
    def tile_rows(self) -> int:
        """Rows one sequence covers."""
        if self.tile_width < 1 or self.T % self.tile_width:
            raise ValueError(f"T ({self.T}) must be a multiple of tile_width "
                             f"({self.tile_width})")
        return self.T // self.tile_width


@dataclass
class TrellisWeight:
    """One linear weight as trellis paths plus scales.

    ``packed`` int32 [column blocks, sequences per block, T*k/32]: each sequence's stored
    symbols as a bit stream; ``row_scales`` [out] and ``col_scales`` [in], float32 values already
    rounded to fp16. The stored weight is ``row_scales[r] * col_scales[c] * table[state]``; with
    an ``input_rotation`` T the layer stands for ``stored @ T.T`` (``dequantize``).
    """

    WEIGHT_KIND: ClassVar[str] = "trellis"

    packed: torch.Tensor
    row_scales: torch.Tensor
    col_scales: torch.Tensor
    trellis: Trellis
    T: int
    tile_width: int
    in_features: int
    input_rotation: InputRotation | None = None
    bias: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        return self.trellis.k

    @property
    def out_features(self) -> int:
        return int(self.row_scales.shape[0])

    def stored_bits(self) -> int:
        """Bits of the paths and scales (not the rotation, not the shared table)."""
        return (self.packed.numel() * 32
                + SCALE_BITS * (self.out_features + self.in_features))

    def dequantize_stored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight (rotated basis), [out_features, in_features]."""
        rows, cols = self.out_features, self.in_features
        tr = self.trellis.to(self.packed.device)
        blocks, seqs, words = self.packed.shape
        # every column block's paths at once: [blocks * seqs, T] -> [blocks, padded rows, width]
        states = decode_states(tr, unpack_symbols(tr, self.packed.reshape(-1, words), self.T))
        values = reconstruct(tr, states).reshape(blocks, -1, self.tile_width)[:, :rows]
        out = values.permute(1, 0, 2).reshape(rows, cols)
        scaled = out * self.col_scales.to(out.device)[None, :]
        return (scaled * self.row_scales.to(out.device)[:, None]).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with (unrotated), [out_features, in_features]."""
        stored = self.dequantize_stored()
        if self.input_rotation is not None:
            stored = self.input_rotation.apply_transpose(stored)
        return stored.to(dtype)


def fp16_scales(values: torch.Tensor) -> torch.Tensor:
    return values.clamp(1e-4, 6e4).to(torch.float16).to(torch.float32)


def to_sequences(block: torch.Tensor, per: int) -> torch.Tensor:
    """[rows, width] -> [ceil(rows / per), per * width]: each sequence is ``per`` consecutive
    rows of the block, row after row (missing rows padded with zeros)."""
    pad = -block.shape[0] % per
    if pad:
        block = torch.cat([block, block.new_zeros(pad, block.shape[1])])
    return block.reshape(-1, per * block.shape[1])


def from_sequences(seqs: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    return seqs.reshape(-1, width)[:rows]


def multiplier_grid(count: int) -> list[float]:
    """Row-scale multipliers tried (scale = multiplier * row RMS): on Gaussian data the best one
    is 1.0-1.2 depending on k and L."""
    if count <= 1:
        return [1.0]
    return [0.9 + 0.4 * i / (count - 1) for i in range(count)]


def column_scales(w: torch.Tensor, parts: list[int]) -> torch.Tensor:
    """Per module (``parts``: its rows in the stack) the fp16 scale of each input column, as a
    [rows, cols] grid (each row holds its module's scales)."""
    unit_rows = w / w.square().mean(dim=1, keepdim=True).sqrt().clamp_min(1e-8)
    grids = []
    for part in torch.split(unit_rows, parts):
        col = part.square().mean(dim=0).sqrt()
        col = col / col.square().mean().sqrt().clamp_min(1e-8)
        grids.append(fp16_scales(col).expand(part.shape[0], -1))
    return torch.cat(grids)


def choose_multiplier(tr: Trellis, unit: torch.Tensor, settings: TrellisSettings,
                      sample_rows: int = 256) -> float:
    """The grid multiplier with the least squared error on the first T columns of a row sample
    of ``unit`` (weights with unit RMS per row)."""
    grid = multiplier_grid(settings.scale_candidates)
    if len(grid) == 1:
        return grid[0]
    rows = unit.shape[0]
    idx = torch.linspace(0, rows - 1, min(sample_rows, rows)).long().to(unit.device)
    block = unit[idx, : settings.T]
    if block.shape[1] * tr.k < tr.L:
        return 1.0
    errors = [float((block - mult * reconstruct(tr, encode(tr, block / mult,
                                                            chunk_elems=settings.chunk_elems)))
                    .square().sum()) for mult in grid]
    return grid[min(range(len(grid)), key=errors.__getitem__)]


def refit_row_scales(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                     hessian: torch.Tensor) -> torch.Tensor:
    """Per row, the fp16 scale minimising ``(w - s c) H (w - s c)^T`` for fixed codes c, where
    it beats ``scale`` (float64 sums)."""
    h = hessian.double()
    w64, c64 = w.double(), codes.double()
    ch = c64 @ h
    num, den = (ch * w64).sum(1), (ch * c64).sum(1)
    const = ((w64 @ h) * w64).sum(1)
    new = fp16_scales((num / den.clamp_min(1e-30)).float())

    def err(sv: torch.Tensor) -> torch.Tensor:
        sv = sv.double()
        return const - 2 * sv * num + sv * sv * den

    better = torch.isfinite(new) & (new > 0) & (err(new) < err(scale))
    return torch.where(better, new, scale)


def hessian_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) in float64."""
    diff = (w - q).double()
    return float(((diff @ hessian.double()) * diff).sum())


@dataclass
class TrellisStats:
    hessian_error: float  # tr((W - Q) H (W - Q)^T) of the whole stack
    multiplier: float


def quantize_trellis(weight: torch.Tensor, hessian: torch.Tensor, hinv: torch.Tensor,
                     trellis: Trellis, settings: TrellisSettings,
                     parts: list[int] | None = None, feedback: bool = True,
                     ) -> tuple[list[TrellisWeight], TrellisStats]:
    """Trellis-code ``weight`` [rows, cols], a stack of modules with ``parts`` rows each (every
    part a multiple of ``settings.tile_rows``, so no sequence spans two modules), given its
    Hessian and ``hinv``, the upper Cholesky factor of the damped inverse Hessian in natural
    column order (``PreparedHessian`` without act-order). One ``TrellisWeight`` per part."""
    w0 = weight.detach().to(torch.float32)
    rows, cols = w0.shape
    parts = parts or [rows]
    per = settings.tile_rows
    if sum(parts) != rows or any(p % per for p in parts):
        raise ValueError(f"module rows {parts} must add up to {rows} and each be a multiple "
                         f"of T / tile_width = {per}")
    if cols % settings.tile_width:
        raise ValueError(f"{cols} input columns are not a multiple of tile_width "
                         f"{settings.tile_width}")
    if settings.T * trellis.k < trellis.L or settings.T * trellis.k % 32:
        raise ValueError(f"a sequence of T={settings.T} weights at k={trellis.k} must hold an "
                         f"L={trellis.L} state in whole 32-bit words")
    tr = trellis.to(w0.device)
    unit = column_scales(w0, parts)
    scaled = w0 / unit
    rms = scaled.square().mean(dim=1).sqrt().clamp_min(1e-8)
    multiplier = choose_multiplier(tr, scaled / rms[:, None], settings)
    scale = fp16_scales(multiplier * rms)
    w = w0.clone()
    codes = torch.empty_like(w)  # col_scale * table[state], per weight
    packed = []
    for c0 in range(0, cols, settings.tile_width):
        c1 = min(c0 + settings.tile_width, cols)
        grid = scale[:, None] * unit[:, c0:c1]
        target = to_sequences(w[:, c0:c1] / grid, per)
        states = encode(tr, target, chunk_elems=settings.chunk_elems)
        packed.append(pack_symbols(tr, symbols(tr, states)))
        values = from_sequences(reconstruct(tr, states), rows, c1 - c0)
        codes[:, c0:c1] = values * unit[:, c0:c1]
        if feedback and c1 < cols:
            delta = w[:, c0:c1] - values * grid
            err = torch.linalg.solve_triangular(hinv[c0:c1, c0:c1], delta, upper=True,
                                                left=False)
            w[:, c1:] -= err @ hinv[c0:c1, c1:]
    if settings.refit_scales:
        scale = refit_row_scales(w0, codes, scale, hessian)
    error = hessian_error(w0, codes * scale[:, None], hessian)
    blocks = torch.stack(packed)  # [column blocks, sequences, words]
    out, start = [], 0
    for part, module_unit in zip(parts, torch.split(unit, parts), strict=True):
        seq0, seq1 = start // per, (start + part) // per
        out.append(TrellisWeight(blocks[:, seq0:seq1].cpu().contiguous(),
                                 scale[start : start + part].cpu(), module_unit[0].cpu(),
                                 trellis, settings.T, settings.tile_width, cols))
        start += part
    return out, TrellisStats(error, multiplier)
