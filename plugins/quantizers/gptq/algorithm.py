"""GPTQ (Frantar et al., 2022) for one linear layer: pure tensor functions.

Given a layer's weight W [out, in] and the Hessian of its reconstruction loss H = 2 X^T X / n
(X: [n, in] calibration inputs), columns are quantized one at a time and the error of each is
spread over the not-yet-quantized columns through the Cholesky factor of H^-1, so the layer's
output on the calibration data changes as little as possible.

What this module implements, and why:

* Hessian accumulation streams over batches and computes only the upper block triangle of
  X^T X (H is symmetric: about 40% less work with 4 blocks).
* Dampening ``damp_percent * mean(diag H)`` on the diagonal; when the Cholesky factorisation
  still fails the damping is multiplied by 10 until it succeeds, and the value used is returned.
* Dead inputs (diag H == 0, never active in calibration) get H_ii = 1 and W[:, i] = 0, as in the
  paper: their weights cannot influence the calibration output.
* Lazy batch updates in blocks of ``block_size`` columns: the rank-``block_size`` update of the
  remaining columns is one matrix product.
* Groups of ``group_size`` columns share a scale and zero point, computed when the group's first
  column comes up (from the weights *after* the updates so far) with the same fp16-rounded
  scales as round-to-nearest, so a checkpoint reproduces the quantized weights exactly. The block
  size is rounded to a multiple of the group size so a group's columns are all up to date when
  its parameters are chosen. A group size that does not divide ``in`` gives a shorter last group.
* ``desc_act`` (act-order) quantizes columns in order of decreasing H_ii; groups are then
  consecutive in that order and ``g_idx`` maps each original column to its group.
  ``static_groups`` instead fixes every group's parameters up front on the original column order
  (trivial ``g_idx``, fast kernels) while still quantizing in act-order.
* ``mse_clip``: instead of the min/max range, each group's range is shrunk to the factor (from a
  grid) that minimises the H_ii-weighted squared rounding error of the group, a cheap search that
  helps most at 3 bits.
* ``refit_scales``: once every column has its integer code, each row's group scales are solved
  for again, jointly, by least squares in the Hessian norm (``refit_scales`` below): with the
  codes and zero points fixed, tr((W - Q) H (W - Q)^T) is quadratic in the scales, so the best
  ones are one small linear system per row. GPTQ chose each group's scale from the weights as
  they stood when the group started; the refit sees the codes that were actually chosen and the
  full H. Kept per row only where it lowers that error, so it can never make a layer worse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from quantmill.plugins.base import QuantizedWeight, num_groups
from quantmill.plugins.quantizers.rtn.algorithm import compute_scales_zeros

# ---------------------------------------------------------------------------------------------
# Hessian
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Quantization grid per group
# ---------------------------------------------------------------------------------------------


def group_params(
    w: torch.Tensor, bits: int, sym: bool, mse_clip: bool, importance: torch.Tensor | None,
    grid: int = 40, max_shrink: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of ``w`` [rows, cols] (float32 [rows] each), optionally clipped.

    With ``mse_clip`` the range is shrunk by factors 1, 1 - 1/grid, ... down to 1 - max_shrink
    and, per row, the factor with the smallest ``importance``-weighted squared error is kept.
    The search runs on one [cols, rows] buffer with in-place operations and the weighting as a
    matrix-vector product: it is called for every group of every layer (900 times for a 135M
    model), so allocations and passes over memory are what it costs.
    """
    scale, zero = compute_scales_zeros(w, bits, sym)
    if not mse_clip:
        return scale, zero
    maxq = 2**bits - 1
    wt = w.T.contiguous()  # [cols, rows]: reductions over a group's columns become a matvec
    weight = (importance if importance is not None
              else torch.ones(wt.shape[0], device=w.device)).to(torch.float32)
    buffer = torch.empty_like(wt)
    best_err = _weighted_err(wt, scale, zero, maxq, weight, buffer)
    wmin = torch.clamp(wt.min(dim=0).values, max=0.0)
    wmax = torch.clamp(wt.max(dim=0).values, min=0.0)
    steps = int(max_shrink * grid)
    for step in range(1, steps + 1):
        p = 1.0 - step / grid
        shrunk = torch.stack([wmin * p, wmax * p], dim=1)  # [rows, 2]: a 2-column proxy range
        s, z = compute_scales_zeros(shrunk, bits, sym)
        err = _weighted_err(wt, s, z, maxq, weight, buffer)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _weighted_err(wt: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                  weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Per row, sum over columns of weight * (w - dequant(quant(w)))^2; ``wt`` is [cols, rows]."""
    # clamp(round(w / s) + z, 0, maxq) - z, as clamp(round(w / s), -z, maxq - z): z is integral
    torch.div(wt, scale, out=buffer)
    buffer.round_().clamp_(min=-zero, max=maxq - zero).mul_(scale).sub_(wt).square_()
    return weight @ buffer


# ---------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class GPTQSettings:
    bits: int = 4
    group_size: int = 128  # -1: one group (per output channel)
    sym: bool = False
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    mse_clip: bool = False
    refit_scales: bool = False


@dataclass
class GPTQStats:
    """What happened while quantizing one layer (recorded in the run's details)."""

    damp_used: float
    dead_inputs: int
    hessian_error: float  # tr((W - Q) H (W - Q)^T): the loss GPTQ minimises


def _inverse_hessian_factor(h: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1, raising damp until H is positive definite.

    float32, as in the reference implementation: the damping keeps it well conditioned, and
    float64 costs twice the time on CPUs for no measurable change in the result.
    """
    diag_mean = float(torch.diag(h).mean())
    damp = damp_percent
    # With J the order-reversing permutation and J H J = L L^T, the upper factor of H^-1 is
    # J L^-1 J: one Cholesky and one triangular inverse instead of Cholesky, inverse, Cholesky.
    # (Damping is added on the diagonal in place: no dense identity while factorising.)
    flipped = torch.flip(h, (0, 1))
    for _ in range(8):
        damped = flipped.clone()
        damped.diagonal().add_(damp * diag_mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            upper = torch.flip(torch.linalg.solve_triangular(lower, eye, upper=False), (0, 1))
            if bool(torch.isfinite(upper).all()):
                return upper, damp
        damp *= 10.0
    raise ValueError("the Hessian is not positive definite even with heavy damping")


@dataclass(frozen=True)
class PreparedHessian:
    """A layer input's Hessian made ready for GPTQ: dead inputs fixed, act-order permutation,
    and the inverse factor. Linears reading the same input (q/k/v, gate/up) share one."""

    hessian: torch.Tensor  # [in, in], dead diagonal entries set to 1
    dead: torch.Tensor  # bool [in]
    perm: torch.Tensor  # quantization order of the columns
    hinv: torch.Tensor  # upper Cholesky factor of (H + damp)^-1, in ``perm`` order
    damp_used: float


def prepare_hessian(hessian: torch.Tensor, damp_percent: float, desc_act: bool) -> PreparedHessian:
    if not 0.0 < damp_percent < 1.0:
        raise ValueError(f"damp_percent must be in (0, 1), got {damp_percent}")
    h = hessian.detach().to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    if desc_act:
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(h.shape[0], device=h.device)
    hinv, damp_used = _inverse_hessian_factor(h[perm][:, perm] if desc_act else h, damp_percent)
    return PreparedHessian(h, dead, perm, hinv, damp_used)


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, settings: GPTQSettings,
    measure_error: bool = True,
) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantize ``weight`` [out, in] with GPTQ given its Hessian [in, in] (or a prepared one,
    which must have been prepared with these settings' damping and act-order)."""
    s = settings
    if not 2 <= s.bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {s.bits}")
    if s.group_size == 0 or s.group_size < -1:
        raise ValueError(f"group_size must be -1 (per channel) or positive, got {s.group_size}")
    prepared = (hessian if isinstance(hessian, PreparedHessian)
                else prepare_hessian(hessian, s.damp_percent, s.desc_act))
    w = weight.detach().to(torch.float32).clone()
    out_features, cols = w.shape
    maxq = 2**s.bits - 1
    gsize = cols if s.group_size == -1 else min(s.group_size, cols)
    n_groups = num_groups(cols, gsize)

    w[:, prepared.dead] = 0.0
    w_orig = w.clone()

    scales = torch.empty(n_groups, out_features, dtype=torch.float32, device=w.device)
    zeros = torch.empty(n_groups, out_features, dtype=torch.float32, device=w.device)
    importance_all = torch.diag(prepared.hessian)
    # per-channel (one group) parameters are fixed up front, as in the reference implementation,
    # which also keeps the lazy block updates instead of one block as wide as the layer
    static = s.static_groups or gsize == cols
    if static:
        for g in range(n_groups):
            c0, c1 = g * gsize, min((g + 1) * gsize, cols)
            scales[g], zeros[g] = group_params(w[:, c0:c1], s.bits, s.sym, s.mse_clip,
                                               importance_all[c0:c1])
    perm, hinv = prepared.perm, prepared.hinv
    w = w[:, perm]
    importance = importance_all[perm]

    # Work on W^T so that a column of W is a contiguous row: the rank-1 updates then stream
    # through memory. The per-column loop is many tiny operations; one thread runs them fastest
    # (OpenMP start-up and, on a busy machine, spinning threads cost more than the work).
    wt = w.T.contiguous()  # [in, out]
    q_int = torch.empty(cols, out_features, dtype=torch.float32, device=w.device)
    # block size: a multiple of the group size so a group's columns are current when it starts
    if static:
        block = s.block_size
    else:
        block = max(gsize, (s.block_size // gsize) * gsize) if gsize <= s.block_size else gsize
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = wt[i1:i2].clone()  # [b, out]
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        neg_diag = -hinv1.diagonal()
        if not static and i1 % gsize == 0:
            # a group starting the block: its range search runs on all threads, before the
            # single-threaded column loop (blocks are multiples of the group size, so this is
            # every group when the group size is at least the block size)
            c1 = min(i1 + gsize, cols) - i1
            scales[i1 // gsize], zeros[i1 // gsize] = group_params(
                w1[:c1].T, s.bits, s.sym, s.mse_clip, importance[i1 : i1 + c1])
        with _single_thread(w.device):
            for i in range(i2 - i1):
                col = i1 + i
                if static:
                    g = int(perm[col]) // gsize
                elif col % gsize == 0 and i > 0:
                    g = col // gsize
                    c1 = min(col + gsize, cols) - i1
                    scales[g], zeros[g] = group_params(w1[i:c1].T, s.bits, s.sym, s.mse_clip,
                                                       importance[col : i1 + c1])
                else:
                    g = col // gsize
                scale, zero = scales[g], zeros[g]
                wrow, q, err = w1[i], q_int[col], err1[i]
                # in place, into preallocated rows: the loop runs once per column of every layer
                torch.div(wrow, scale, out=q).round_().add_(zero).clamp_(0, maxq)
                # err = (w - dequant) / d, written as (dequant - w) / -d (the same floats)
                torch.sub(q, zero, out=err).mul_(scale).sub_(wrow).div_(neg_diag[i])
                w1[i + 1 :].addr_(hinv1[i, i + 1 :], err, alpha=-1)  # rank-1 update (BLAS ger)
        wt[i2:] -= hinv[i1:i2, i2:].T @ err1  # lazy batch update: a real matmul, all threads

    invperm = torch.argsort(perm)
    intweight = q_int[invperm].T.contiguous()  # [out, in], original column order
    if static or not s.desc_act:
        g_idx = torch.arange(cols, device=w.device) // gsize
    else:
        g_idx = invperm // gsize  # original column c sits at position invperm[c]
    if s.refit_scales:
        scales = refit_scales(w_orig, intweight, scales, zeros, g_idx, prepared.hessian)
    qw = QuantizedWeight(
        intweight=intweight.to(torch.uint8).cpu(),
        scales=scales.cpu(),
        zeros=zeros.to(torch.int32).cpu(),
        g_idx=g_idx.to(torch.int32).cpu(),
        bits=s.bits,
        group_size=s.group_size,
        sym=s.sym,
    )
    return qw, GPTQStats(damp_used=prepared.damp_used, dead_inputs=int(prepared.dead.sum()),
                         hessian_error=hessian_error(w_orig, qw, prepared.hessian)
                         if measure_error else float("nan"))


def refit_scales(
    weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    g_idx: torch.Tensor, hessian: torch.Tensor, ridge: float = 1e-4,
) -> torch.Tensor:
    """The scales [groups, out] that minimise tr((W - Q) H (W - Q)^T) for fixed integer
    ``codes`` [out, in] and ``zeros``, with Q = (codes - zeros[g_idx]) * scales[g_idx].

    Per row r, with c = codes_r - zeros_r[g_idx] and E the [in, groups] group indicator,
    Q_r = (c * E) s_r, so the error is quadratic in s_r with normal equations
    (E^T diag(c) H diag(c) E) s_r = E^T diag(c) H w_r. Each is a groups x groups system (5 to 12
    for 128-wide groups); building them costs about two [out, in] x [in, in] products. A small
    ridge towards the current scales keeps groups whose codes all sit on the zero point (c = 0:
    the scale does not matter) well posed. New scales are rounded to fp16, and a row keeps its
    old ones unless the new ones are finite, positive and lower its error.
    """
    w = weight.to(torch.float32)
    h = hessian.to(torch.float32)
    gi = g_idx.long()
    n_groups = scales.shape[0]
    c = codes.to(torch.float32) - zeros.to(torch.float32)[gi].T  # [out, in]
    indicator = torch.nn.functional.one_hot(gi, n_groups).to(torch.float32)  # [in, groups]
    normal = torch.empty(w.shape[0], n_groups, n_groups, dtype=torch.float32, device=w.device)
    for g in range(n_groups):
        cols = torch.nonzero(gi == g).squeeze(1)
        normal[:, :, g] = (c * (c[:, cols] @ h[cols])) @ indicator
    wh = w @ h
    rhs = (wh * c) @ indicator  # [out, groups]
    old = scales.to(torch.float32).T  # [out, groups]
    # a row's error as a function of its scales: w H w^T - 2 s.rhs + s^T A s (float64: the
    # terms are large and nearly cancel), so comparing old and new costs no [out, in] products
    quadratic, linear = normal.to(torch.float64), rhs.to(torch.float64)
    constant = (wh * w).sum(dim=1, dtype=torch.float64)

    def row_error(s: torch.Tensor) -> torch.Tensor:
        s64 = s.to(torch.float64)
        curvature = (s64 * (quadratic @ s64[..., None])[..., 0]).sum(1)
        return constant - 2 * (s64 * linear).sum(1) + curvature

    lam = ridge * normal.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)  # [out]
    normal.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    solved = torch.linalg.solve(normal, (rhs + lam[:, None] * old).unsqueeze(-1)).squeeze(-1)
    new = solved.to(torch.float16).to(torch.float32)
    ok = torch.isfinite(new).all(dim=1) & (new > 0).all(dim=1)
    new = torch.where(ok[:, None], new, old)
    better = ok & (row_error(new) < row_error(old))
    return torch.where(better[:, None], new, old).T.contiguous()


def hessian_error(weight: torch.Tensor, qw: QuantizedWeight, hessian: torch.Tensor,
                  dequantized: torch.Tensor | None = None) -> float:
    """tr((W - Q) H (W - Q)^T): the layer-output error GPTQ minimises (dead inputs count as
    zero weights, as GPTQ sets them). ``dequantized``: Q, when the caller has it already."""
    device = hessian.device
    q = qw.dequantize() if dequantized is None else dequantized
    delta = weight.detach().to(device, torch.float32) - q.to(device, torch.float32)
    return float(((delta @ hessian.to(torch.float32)) * delta).sum())


def split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """Split a quantized stack of weights back into its modules (by output rows)."""
    parts, start = [], 0
    for count in rows:
        end = start + count
        parts.append(QuantizedWeight(
            intweight=qw.intweight[start:end].contiguous(),
            scales=qw.scales[:, start:end].contiguous(),
            zeros=qw.zeros[:, start:end].contiguous(),
            g_idx=qw.g_idx.clone(), bits=qw.bits, group_size=qw.group_size, sym=qw.sym,
            input_rotation=qw.input_rotation,
        ))
        start = end
    return parts
