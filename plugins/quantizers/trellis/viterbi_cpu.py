"""The trellis Viterbi search as one compiled CPU loop (numba), for ``code.viterbi`` on the CPU.

Why a compiled kernel: eager PyTorch runs a Viterbi step as three whole-array operations (a min
over the predecessors, an add, a multiply-add), each a pass over the 2^L costs of every sequence,
with int64 back-pointers: memory-bound on a CPU, 1.6-4.2 ns per state update on 2 cores. This
kernel keeps one sequence's costs in cache, fuses the three steps and stores 16-bit
back-pointers: 0.5-1.7 ns per state update, 2-6x faster, more so at larger L
(``bench/trellis_viterbi_bench.py`` side by side, bench/results/trellis-viterbi-cpu.md). The
paths are equally good (same float32 operations in the same order; torch may fuse a
multiply-add, so near-ties can go the other way; the first minimum wins ties, as ``torch.min``).

The sequences are independent: ``prange`` spreads them over the cores (numba's thread pool,
sized to torch's thread count by the caller).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, boundscheck=False)
def viterbi_paths(x: np.ndarray, weights: np.ndarray, table: np.ndarray, L: int, k: int,
                  overlap: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Least-squares state paths of ``x`` float32 [B, T] into ``out`` int64 [B, T].

    ``weights`` float32 [T] (the cost of step t is ``w_t (x_t - table[s_t])^2``); ``overlap``
    int64 [B]: the L-k low bits that the state before step 0 and the last state must both have,
    or -1 for a free start and end. Costs drop the constant ``w_t x_t^2``, as ``code.py`` does.
    """
    rows, steps = x.shape
    n = 1 << L
    fanin = 1 << k
    prefixes = 1 << (L - k)
    squares = table * table
    minus_two = np.float32(-2.0) * table
    for r in prange(rows):
        prev = np.empty(n, np.float32)
        cur = np.empty(n, np.float32)
        best = np.empty(prefixes, np.float32)
        arg = np.empty(prefixes, np.uint16)
        back = np.empty((max(steps - 1, 1), prefixes), np.uint16)
        ov = overlap[r]
        for u in range(prefixes):
            best[u] = 0.0 if (ov < 0 or u == ov) else np.inf
        for t in range(steps):
            if t > 0:
                # state s = (j << (L-k)) | u keeps u; its successors' best predecessor is the j
                # with the least cost (the first one on ties)
                for u in range(prefixes):
                    best[u] = prev[u]
                    arg[u] = 0
                for j in range(1, fanin):
                    base = j * prefixes
                    for u in range(prefixes):
                        v = prev[base + u]
                        better = v < best[u]
                        best[u] = v if better else best[u]
                        arg[u] = j if better else arg[u]
                for u in range(prefixes):
                    back[t - 1, u] = arg[u]
            wt = weights[t]
            xt = x[r, t] * wt
            for u in range(prefixes):
                bu = best[u]
                for b in range(fanin):
                    s = u * fanin + b  # s = (u << k) | b: u what it keeps, b its new bits
                    cur[s] = (bu + wt * squares[s]) + xt * minus_two[s]
            prev, cur = cur, prev
        state = -1
        least = np.inf
        for s in range(n):
            if ov >= 0 and (s & (prefixes - 1)) != ov:
                continue
            if prev[s] < least:
                least = prev[s]
                state = s
        if state < 0:  # every cost infinite (non-finite input): any consistent path
            state = 0 if ov < 0 else ov
        out[r, steps - 1] = state
        for t in range(steps - 1, 0, -1):
            u = state >> k
            state = np.int64(back[t - 1, u]) * prefixes + u
            out[r, t - 1] = state
