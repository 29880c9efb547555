"""The bitshift trellis code of QTIP (Tseng et al. 2024): pure tensor functions.

Why a trellis: a scalar grid spends its bits weight by weight; a trellis code spends them on a
whole sequence, and gets much closer to the Gaussian rate-distortion bound. On incoherent
(rotated, ``plugins/hadamard.py``) weights, which are close to Gaussian, that is worth most of a
bit at 2-4 bits per weight: measured with ``bench/experiments/trellis_experiment.py`` on
SmolLM2-135M (H100,
bench/results/trellis-cuda-experiments.json), a 3-bit trellis (3.05 bits per weight) gives
perplexity 28.55 where GPTQ 3-bit g128 (3.21) gives 33.72, and mixed precision at 3.5 bits per
weight 27.21 to 27.36 (L = 16 to 10), below uniform 4-bit GPTQ's 27.59.

The code:

* An L-bit state; each weight of a sequence shifts k new bits in,
  ``s_t = ((s_{t-1} << k) | b_t) & (2^L - 1)``, and is reconstructed as ``table[s_t]``. The
  table holds the 2^L standard-Gaussian quantiles (fp16) in a seeded random order: exactly
  Gaussian marginals, no structure for the encoder to trip over. A checkpoint stores the table
  itself (2^L fp16 values), so no reader depends on a random generator's stream.
* Tail-biting: a sequence of T weights stores exactly T*k bits, read as a circular stream: state
  t is the last L bits of the stream up to step t, wrapping around (``decode_states``). This
  needs ``T * k >= L``.
* Encoding is least squares by Viterbi over all 2^(T*k) bit strings, vectorised over many
  sequences: the predecessors of state s are the 2^k states ``(j << (L-k)) | (s >> k)``, so a
  step is one min over a [sequences, 2^k, 2^(L-k)] view of the costs. Tail-biting uses QTIP's
  two-pass approximation: Viterbi on the sequence rolled by T/2, take the L-k bits its path has
  at the wrap point, then an exact Viterbi on the sequence constrained to start and end with
  them (measured at L=8, k=2, T=64 on Gaussian data: MSE 0.0868 against 0.0867 for the exact
  tail-biting optimum).

Work: ``T * 2^L`` state updates per sequence; for SmolLM2-135M (1.1e8 quantized weights, two
passes) about 2.3e11 at L = 10, 9.3e11 at L = 12 and 1.5e13 at L = 16.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from quantmill.plugins.formats.packing import pack_cols, unpack_cols

log = logging.getLogger(__name__)

#: Largest state width (2^L table entries and costs per sequence).
MAX_STATE_BITS = 16


@dataclass(frozen=True)
class Trellis:
    """A bitshift trellis: ``L``-bit state, ``k`` bits per step, ``table`` float32 [2^L]."""

    L: int
    k: int
    table: torch.Tensor

    def __post_init__(self) -> None:
        if not 1 <= self.k < self.L <= MAX_STATE_BITS:
            raise ValueError(f"a bitshift trellis needs 1 <= k < L <= {MAX_STATE_BITS}, "
                             f"got k={self.k}, L={self.L}")
        if tuple(self.table.shape) != (1 << self.L,):
            raise ValueError(f"a trellis with L={self.L} needs a table of {1 << self.L} values, "
                             f"got shape {tuple(self.table.shape)}")

    @property
    def fanin(self) -> int:
        """2^k: the predecessors (and successors) of a state."""
        return 1 << self.k

    @property
    def prefixes(self) -> int:
        """2^(L-k): what a state keeps of its predecessor."""
        return 1 << (self.L - self.k)

    def to(self, device: torch.device | str) -> Trellis:
        return Trellis(self.L, self.k, self.table.to(device))


def gaussian_table(L: int, seed: int) -> torch.Tensor:
    """The 2^L standard-Gaussian quantiles ``ndtri((i + 0.5) / 2^L)``, rounded to fp16 (what a
    checkpoint stores), in a seeded random order; float32 [2^L] on the CPU."""
    n = 1 << L
    quantiles = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return quantiles[order].to(torch.float16).to(torch.float32)


def make_trellis(L: int, k: int, seed: int = 0) -> Trellis:
    return Trellis(L, k, gaussian_table(L, seed))


def can_tailbite(trellis: Trellis, steps: int) -> bool:
    """Whether T*k bits fill a state (else the circular stream would not define one)."""
    return steps * trellis.k >= trellis.L


def _viterbi_chunk(tr: Trellis, x: torch.Tensor, weights: list[float] | None,
                   overlap: torch.Tensor | None) -> torch.Tensor:
    """Least-squares state paths [B, T] (int64) for targets ``x`` [B, T]; ``overlap`` [B]: the
    L-k low bits that the state before step 0 and the last state must both have."""
    rows, steps = x.shape
    fanin, prefixes, n = tr.fanin, tr.prefixes, 1 << tr.L
    dev = x.device
    table = tr.table.to(dev, torch.float32)
    w = weights or [1.0] * steps
    xw = x if weights is None else x * torch.tensor(w, device=dev, dtype=x.dtype)
    c2 = (table * table).view(prefixes, fanin)
    cneg2 = (-2.0 * table).view(prefixes, fanin)
    # costs drop each step's constant w x^2: only differences between states matter
    m = torch.zeros(rows, prefixes, device=dev)
    if overlap is not None:
        allowed = torch.arange(prefixes, device=dev)[None, :] == overlap[:, None]
        m = torch.where(allowed, m, torch.full_like(m, math.inf))
    cost = torch.empty(rows, n, device=dev)
    back = torch.empty(max(steps - 1, 0), rows, prefixes, dtype=torch.int64, device=dev)
    grid = cost.view(rows, prefixes, fanin)  # s = (u << k) | b: u what it keeps, b its new bits
    preds = cost.view(rows, fanin, prefixes)  # s = (j << (L-k)) | u: j the bits it drops
    for t in range(steps):
        if t > 0:
            torch.min(preds, dim=1, out=(m, back[t - 1]))
        torch.add(m.unsqueeze(-1), c2, alpha=w[t], out=grid)
        grid.addcmul_(xw[:, t].view(rows, 1, 1), cneg2)
    if overlap is not None:
        ends = torch.arange(n, device=dev)[None, :] & (prefixes - 1)
        cost.masked_fill_(ends != overlap[:, None], math.inf)
    state = cost.argmin(dim=1)
    states = [state]
    for t in range(steps - 1, 0, -1):
        u = state >> tr.k
        state = torch.add(u, back[t - 1].gather(1, u[:, None]).squeeze(1), alpha=prefixes)
        states.append(state)
    return torch.stack(states[::-1], dim=1)


def viterbi(tr: Trellis, x: torch.Tensor, weights: list[float] | None = None,
            overlap: torch.Tensor | None = None, chunk_elems: int = 1 << 24,
            backend: str = "auto") -> torch.Tensor:
    """Least-squares state paths [B, T] for ``x`` [B, T] (``sum_t w_t (x_t - table[s_t])^2``).

    ``backend``: ``"torch"`` runs whole-array steps on ``x``'s device, in chunks of sequences
    holding at most ``chunk_elems`` cost entries (the back-pointers take 2 * T / 2^k times as
    many bytes); ``"cpu"`` the compiled CPU kernel (``viterbi_cpu.py``, several times faster);
    ``"auto"`` the compiled kernel for CPU tensors when numba is installed, else torch."""
    if x.dim() != 2:
        raise ValueError(f"viterbi expects [sequences, steps], got shape {tuple(x.shape)}")
    if backend not in ("auto", "torch", "cpu"):
        raise ValueError(f"unknown viterbi backend '{backend}' (auto, torch or cpu)")
    x = x.to(torch.float32)
    if backend == "cpu" or (backend == "auto" and x.device.type == "cpu"
                            and _cpu_kernel() is not None):
        return _viterbi_cpu(tr, x, weights, overlap)
    rows = max(1, chunk_elems >> tr.L)
    parts = [_viterbi_chunk(tr, x[r : r + rows], weights,
                            None if overlap is None else overlap[r : r + rows])
             for r in range(0, x.shape[0], rows)]
    return torch.cat(parts) if parts else torch.empty(0, x.shape[1], dtype=torch.int64)


@functools.cache
def _cpu_kernel() -> Callable[..., None] | None:
    """The compiled kernel, or None without numba (then the torch path runs, slower)."""
    try:
        from quantmill.plugins.quantizers.trellis.viterbi_cpu import viterbi_paths
    except ImportError as exc:  # numba is a dependency; a broken install still works, slowly
        log.warning("numba unavailable (%s): trellis Viterbi runs in eager torch on the CPU", exc)
        return None
    return viterbi_paths


def _viterbi_cpu(tr: Trellis, x: torch.Tensor, weights: list[float] | None,
                 overlap: torch.Tensor | None) -> torch.Tensor:
    kernel = _cpu_kernel()
    if kernel is None:
        raise RuntimeError("the compiled CPU Viterbi kernel needs numba (pip install numba)")
    import numba

    rows, steps = x.shape
    xs = x.detach().cpu().contiguous().numpy()
    w = np.ones(steps, np.float32) if weights is None else np.asarray(weights, np.float32)
    ov = (np.full(rows, -1, np.int64) if overlap is None
          else overlap.detach().cpu().to(torch.int64).contiguous().numpy())
    out = np.empty((rows, steps), np.int64)
    if rows:
        numba.set_num_threads(max(1, min(torch.get_num_threads(),
                                         numba.config.NUMBA_NUM_THREADS)))
        kernel(xs, w, tr.table.detach().cpu().to(torch.float32).contiguous().numpy(),
               tr.L, tr.k, ov, out)
    return torch.from_numpy(out).to(x.device)


def encode(tr: Trellis, x: torch.Tensor, weights: list[float] | None = None,
           chunk_elems: int = 1 << 24, backend: str = "auto") -> torch.Tensor:
    """Tail-biting state paths [B, T] for ``x`` [B, T] (QTIP's two-pass approximation;
    ``backend`` as for ``viterbi``)."""
    steps = x.shape[1]
    if not can_tailbite(tr, steps):
        raise ValueError(f"a tail-biting sequence of {steps} steps at k={tr.k} holds "
                         f"{steps * tr.k} bits, fewer than the state's L={tr.L}")
    half = steps // 2
    rolled_w = None if weights is None else weights[half:] + weights[:half]
    rolled = viterbi(tr, torch.roll(x, -half, dims=1), rolled_w, None, chunk_elems, backend)
    overlap = rolled[:, steps - 1 - half] & (tr.prefixes - 1)  # original step T-1's low bits
    return viterbi(tr, x, weights, overlap, chunk_elems, backend)


def symbols(tr: Trellis, states: torch.Tensor) -> torch.Tensor:
    """The k bits each step shifted in (what is stored), int64 [B, T]."""
    return states & (tr.fanin - 1)


def decode_states(tr: Trellis, stored: torch.Tensor) -> torch.Tensor:
    """States [B, T] from the stored symbols [B, T] of tail-biting sequences: state t is the
    last L bits of the circular stream up to step t (``symbols`` inverted, exactly, for every
    path ``encode`` returns)."""
    stored = stored.to(torch.int64)
    steps = stored.shape[1]
    if not can_tailbite(tr, steps):
        raise ValueError(f"{steps} steps of {tr.k} bits cannot hold an L={tr.L} state")
    state = torch.zeros_like(stored)
    for j in range(-(-tr.L // tr.k)):  # symbols reaching into the state, newest first
        state |= torch.roll(stored, j, dims=1) << (tr.k * j)
    return state & ((1 << tr.L) - 1)


def pack_symbols(tr: Trellis, stored: torch.Tensor) -> torch.Tensor:
    """Symbols [B, T] -> int32 [B, T*k/32]: each sequence a little-endian bit stream."""
    return pack_cols(stored.to(torch.int64), tr.k)


def unpack_symbols(tr: Trellis, packed: torch.Tensor, steps: int) -> torch.Tensor:
    """Inverse of ``pack_symbols``: int32 [B, T*k/32] -> int64 [B, T]."""
    return unpack_cols(packed, tr.k, steps).to(torch.int64)


def reconstruct(tr: Trellis, states: torch.Tensor) -> torch.Tensor:
    """The values the states stand for (float32, the table's device)."""
    return tr.table[states.to(tr.table.device)]
