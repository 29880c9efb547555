"""Weight clustering for one linear layer: pure tensor functions, no plugin wiring.

Each output row (or each run of ``rows_per_codebook`` consecutive rows) gets its own codebook of
2**bits values and every weight becomes the index of one entry. Unlike a uniform grid, the
codebook follows the weights (dense near zero, sparse in the tails), which is where it beats
uniform quantization at 2-3 bits.

Why each piece is there:

* Sensitivity weighting (SqueezeLLM, Kim et al. 2023): an error in input column j moves the
  layer output by about err**2 * E[x_j**2], so k-means minimises sum_j h_j (w_j - c(w_j))**2 with
  h the diagonal of the calibration Hessian (mean x_j**2). Columns fed by large activations pull
  centroids towards their weights.
* 1-D k-means is cheap: with sorted centroids the nearest one is a binary search on the
  midpoints (``searchsorted``, O(m log k)), and with each row sorted once a cluster is a
  contiguous run whose weighted mean is a difference of prefix sums, so a Lloyd iteration costs
  O(k log m) per row. No [rows, in, k] distance tensor is ever built (k = 256 would need GBs).
* Weighted k-means++ seeding (Arthur and Vassilvitskii, 2007) from a seeded generator (up to 16
  entries; 8-bit codebooks start from weighted quantiles, see ``cluster_rows``): the same
  seed gives the same codebooks, and skewed rows get far better starts than from a grid. Lloyd
  also runs from round-to-nearest's uniform grid and each row keeps the better of the two, so
  no row ends up worse than RTN would make it.
* Empty clusters are re-seeded at the worst-represented point, so no entry stays wasted.
* Codebook values are rounded to fp16 before the final assignment, so a checkpoint that stores
  the codebook in fp16 reproduces exactly the weights measured here.
* Optional error compensation (as GPTQ; GPTVQ, van Baalen et al. 2024, does it for codebooks):
  columns are rounded one at a time to their row's nearest entry and the rounding error is spread
  over the columns not yet rounded through the Cholesky factor of the inverse Hessian; then, with
  the assignments fixed, the codebook is refit by least squares on the full Hessian.

Everything is vectorised over rows and runs in chunks of rows to bound memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from quantmill.plugins.base import ClusteredWeight
from quantmill.plugins.quantizers.gptq.algorithm import PreparedHessian
from quantmill.plugins.quantizers.rtn.algorithm import compute_scales_zeros

#: Bit widths a codebook may have: 4, 8, 16 or 256 entries.
CODEBOOK_BITS: frozenset[int] = frozenset({2, 3, 4, 8})
#: Bits of one stored codebook entry (fp16).
ENTRY_BITS = 16
#: Largest codebook seeded by k-means++ (see ``cluster_rows``).
KMEANS_PP_MAX_ENTRIES = 16
#: Default bound on the elements of one chunk's working tensors (16 MB in float32).
CHUNK_ELEMENTS = 1 << 22


def check_settings(bits: int, rows_per_codebook: int = 1, iterations: int = 1) -> None:
    """Raise ValueError naming the bad setting."""
    if bits not in CODEBOOK_BITS:
        allowed = ", ".join(map(str, sorted(CODEBOOK_BITS)))
        raise ValueError(f"codebook bits must be one of {allowed}, got {bits}")
    if rows_per_codebook < 1:
        raise ValueError(f"rows_per_codebook must be at least 1, got {rows_per_codebook}")
    if iterations < 1:
        raise ValueError(f"k-means iterations must be at least 1, got {iterations}")


def codebook_rows(out_features: int, rows_per_codebook: int) -> int:
    """How many codebooks a layer has (a last, shorter run of rows gets its own)."""
    return -(-out_features // rows_per_codebook)


def codebook_bits_per_weight(
    bits: int, out_features: int, in_features: int, rows_per_codebook: int = 1
) -> float:
    """What a clustered weight costs per element: its index plus its share of fp16 codebooks
    (3 bits, 576x576, one codebook per row: 3 + 8 * 16 / 576 = 3.22)."""
    books = codebook_rows(out_features, rows_per_codebook)
    return bits + books * (2**bits) * ENTRY_BITS / (out_features * in_features)


def column_importance(column_weights: torch.Tensor | None, in_features: int,
                      device: torch.device | None = None) -> torch.Tensor:
    """Per-input-column k-means weights, mean 1, strictly positive (float32 [in]).

    None means uniform. Columns that never saw an activation (weight 0) keep a tiny weight so
    that every cluster is still defined; a useless all-zero vector falls back to uniform.
    """
    if column_weights is None:
        return torch.ones(in_features, dtype=torch.float32, device=device)
    h = column_weights.detach().to(device=device, dtype=torch.float32).reshape(-1)
    if h.numel() != in_features:
        raise ValueError(f"column weights have {h.numel()} entries for {in_features} columns")
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("column weights must be finite and non-negative")
    mean = float(h.mean())
    if mean <= 0.0:
        return torch.ones_like(h)
    return (h / mean).clamp_min(1e-6)


# ---------------------------------------------------------------------------------------------
# 1-D k-means, one problem per row of ``x``
# ---------------------------------------------------------------------------------------------


def midpoints(sorted_codebook: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between neighbouring sorted entries: [g, k] -> [g, k - 1]."""
    return ((sorted_codebook[:, 1:] + sorted_codebook[:, :-1]) * 0.5).contiguous()


def nearest(x: torch.Tensor, sorted_codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's sorted codebook: x [g, m] -> int64 [g, m].

    A binary search over the midpoints; exact for fp16-valued codebooks (their midpoints are
    exact in float32).
    """
    return torch.searchsorted(midpoints(sorted_codebook), x.contiguous())


def _sample(prob: torch.Tensor, fallback: torch.Tensor,
            generator: torch.Generator) -> torch.Tensor:
    """One index per row with probability proportional to ``prob`` [g, m] (``fallback`` where a
    row of ``prob`` is all zero) -> int64 [g, 1].

    Inverse-CDF sampling (a cumulative sum and a binary search): several times faster than
    ``torch.multinomial`` on wide rows, and as deterministic for a seeded generator.
    """
    cdf = prob.cumsum(dim=1)
    dead = cdf[:, -1:] <= 0
    if bool(dead.any()):
        cdf = torch.where(dead, fallback.cumsum(dim=1), cdf)
    u = torch.rand(prob.shape[0], 1, generator=generator, device=prob.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(prob.shape[1] - 1)


def kmeans_plus_plus(x: torch.Tensor, weights: torch.Tensor, k: int,
                     generator: torch.Generator) -> torch.Tensor:
    """Weighted k-means++ seeds per row: x, weights [g, m] -> centroids [g, k] (unsorted).

    The first seed is drawn with probability proportional to the weight, each next one
    proportional to weight times the squared distance to the nearest seed so far (a row whose
    points all sit on seeds already draws by weight: a duplicate, re-seeded by Lloyd).
    """
    g = x.shape[0]
    centroids = torch.empty(g, k, dtype=x.dtype, device=x.device)
    centroids[:, 0] = x.gather(1, _sample(weights, weights, generator)).squeeze(1)
    dist = (x - centroids[:, :1]) ** 2  # [g, m]: squared distance to the nearest seed
    for j in range(1, k):
        pick = _sample(weights * dist, weights, generator)
        centroids[:, j] = x.gather(1, pick).squeeze(1)
        torch.minimum(dist, (x - centroids[:, j : j + 1]) ** 2, out=dist)
    return centroids


def _reseed_empty(xs: torch.Tensor, ws: torch.Tensor, updated: torch.Tensor,
                  empty: torch.Tensor) -> None:
    """Move each row's empty entries of ``updated`` (in place) onto its points with the largest
    weighted errors, worst first. xs, ws [g, m] (sorted rows); updated, empty [g, k]."""
    rows = empty.any(dim=1).nonzero().squeeze(1)
    sub_x, sub_e = xs[rows], empty[rows]
    book = updated[rows].sort(dim=1).values
    err = ws[rows] * (sub_x - book.gather(1, nearest(sub_x, book))) ** 2
    count = sub_e.sum(dim=1)  # [r]
    most = min(int(count.max()), sub_x.shape[1])
    worst = sub_x.gather(1, err.topk(most, dim=1).indices)  # [r, most]
    # the empty slots of each row first (a stable sort keeps their order)
    slots = torch.argsort((~sub_e).to(torch.int8), dim=1, stable=True)[:, :most]
    use = torch.arange(most, device=xs.device)[None, :] < count[:, None]
    block = updated[rows]
    block.scatter_(1, slots, torch.where(use, worst, block.gather(1, slots)))
    updated[rows] = block


@dataclass(frozen=True)
class SortedRows:
    """Rows sorted once, with float64 prefix sums of w, w*x and w*x**2 ([g, m + 1] each): a
    cluster of a sorted row is a contiguous run, so its weight, weighted mean and weighted
    squared error are differences of prefix sums, O(1) per cluster whatever its size."""

    xs: torch.Tensor  # [g, m] sorted values
    ws: torch.Tensor  # [g, m] their weights
    cum_w: torch.Tensor
    cum_wx: torch.Tensor
    cum_wxx: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, weights: torch.Tensor) -> SortedRows:
        xs, order = x.sort(dim=1)
        ws = weights.gather(1, order)
        w64, x64 = ws.to(torch.float64), xs.to(torch.float64)
        zero = torch.zeros(x.shape[0], 1, dtype=torch.float64, device=x.device)

        def prefix(values: torch.Tensor) -> torch.Tensor:
            return torch.cat([zero, values.cumsum(dim=1)], dim=1)

        return cls(xs, ws, prefix(w64), prefix(w64 * x64), prefix(w64 * x64 * x64))

    def bounds(self, sorted_codebook: torch.Tensor) -> torch.Tensor:
        """[g, k + 1]: cluster j is sorted points bounds[j] .. bounds[j + 1] - 1, i.e. those with
        mids[j - 1] < x <= mids[j], exactly the assignment of ``nearest``."""
        g, m = self.xs.shape
        ends = torch.searchsorted(self.xs, midpoints(sorted_codebook), right=True)  # [g, k - 1]
        first = torch.zeros(g, 1, dtype=torch.int64, device=ends.device)
        return torch.cat([first, ends, torch.full_like(first, m)], dim=1)

    def sums(self, bounds: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
        return cum.gather(1, bounds[:, 1:]) - cum.gather(1, bounds[:, :-1])  # [g, k]

    def error(self, sorted_codebook: torch.Tensor) -> torch.Tensor:
        """Weighted squared error of each row under nearest assignment (float64 [g])."""
        b = self.bounds(sorted_codebook)
        c = sorted_codebook.to(torch.float64)
        per = (self.sums(b, self.cum_wxx) - 2 * c * self.sums(b, self.cum_wx)
               + c * c * self.sums(b, self.cum_w))
        return per.sum(dim=1)


def lloyd(rows: SortedRows, centroids: torch.Tensor, iterations: int) -> torch.Tensor:
    """Weighted Lloyd iterations; returns the centroids sorted per row ([g, k]).

    An iteration costs O(k log m) per row instead of O(m): the k - 1 midpoints are searched
    in the sorted row and the cluster means come from prefix sums (``SortedRows``). Stops when
    no cluster boundary moves. Empty clusters are moved onto the points with the largest
    weighted errors of their row.
    """
    previous: torch.Tensor | None = None
    for _ in range(iterations):
        centroids = centroids.sort(dim=1).values
        bounds = rows.bounds(centroids)
        mass = rows.sums(bounds, rows.cum_w)  # [g, k]
        total = rows.sums(bounds, rows.cum_wx)
        empty = mass <= 0
        updated = torch.where(empty, centroids,
                              (total / mass.clamp_min(1e-300)).to(centroids.dtype))
        any_empty = bool(empty.any())
        if any_empty:
            _reseed_empty(rows.xs, rows.ws, updated, empty)
        centroids = updated
        if previous is not None and torch.equal(bounds, previous) and not any_empty:
            break
        previous = bounds
    return centroids.sort(dim=1).values


def to_fp16_values(values: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (kept as float32), saturating instead of overflowing."""
    limit = float(torch.finfo(torch.float16).max)
    return values.clamp(-limit, limit).to(torch.float16).to(torch.float32)


def uniform_grid(x: torch.Tensor, k: int) -> torch.Tensor:
    """Round-to-nearest's own grid per row (asymmetric, range [min(x, 0), max(x, 0)], fp16
    scale, as ``rtn.algorithm``): [g, m] -> [g, k] sorted."""
    scale, zero = compute_scales_zeros(x, k.bit_length() - 1, sym=False)
    steps = torch.arange(k, dtype=x.dtype, device=x.device)
    return (steps[None, :] - zero[:, None]) * scale[:, None]


def weighted_quantiles(rows: SortedRows, k: int) -> torch.Tensor:
    """The points at weight fractions (j + 0.5) / k of each sorted row: [g, k] seeds."""
    total = rows.cum_w[:, -1:]  # [g, 1]
    fractions = (torch.arange(k, dtype=torch.float64, device=total.device) + 0.5) / k
    pos = torch.searchsorted(rows.cum_w[:, 1:].contiguous(), (fractions[None, :] * total)
                             .contiguous())
    return rows.xs.gather(1, pos.clamp_max(rows.xs.shape[1] - 1))


def cluster_rows(x: torch.Tensor, weights: torch.Tensor, k: int, iterations: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means per row: returns the sorted fp16-valued codebook [g, k] and indices [g, m].

    Lloyd runs from two starts, k-means++ seeds and round-to-nearest's uniform grid, and each
    row keeps the better result. Lloyd never increases the error, so a row is never worse than
    its RTN quantization (up to the fp16 rounding of the entries); k-means++ usually wins.
    Above ``KMEANS_PP_MAX_ENTRIES`` entries (8 bits) the seeds are weighted quantiles instead:
    k-means++ makes k passes over the layer (about 30x the time of everything else at 256
    entries), and the gain is immaterial there: on a 1536x576 layer the weighted error was 2.7%
    of 8-bit RTN's with k-means++ seeds and 3.9% with quantiles.
    """
    rows = SortedRows.of(x, weights)
    seeds = (kmeans_plus_plus(x, weights, k, generator) if k <= KMEANS_PP_MAX_ENTRIES
             else weighted_quantiles(rows, k))
    best_book: torch.Tensor | None = None
    best_err: torch.Tensor | None = None
    for start in (seeds, uniform_grid(x, k)):
        book = to_fp16_values(lloyd(rows, start, iterations)).sort(dim=1).values
        err = rows.error(book)  # [g]
        if best_book is None or best_err is None:
            best_book, best_err = book, err
        else:
            better = err < best_err
            best_book = torch.where(better[:, None], book, best_book)
            best_err = torch.where(better, err, best_err)
    assert best_book is not None
    return best_book, nearest(x, best_book)


def _grouped(w: torch.Tensor, importance: torch.Tensor,
             rows_per_codebook: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> one k-means problem per codebook: x, weights [books, r * in].

    A shorter last run of rows is padded with zero-weight points, which move no centroid.
    """
    rows, cols = w.shape
    r = rows_per_codebook
    books = codebook_rows(rows, r)
    pad = books * r - rows
    weights = importance.repeat(r)[None, :].expand(books, r * cols)
    if pad:
        w = torch.cat([w, torch.zeros(pad, cols, dtype=w.dtype, device=w.device)])
        weights = weights.clone()
        weights[-1, (r - pad) * cols :] = 0.0
    return w.reshape(books, r * cols), weights.contiguous()


def cluster_weight(
    weight: torch.Tensor,
    bits: int,
    column_weights: torch.Tensor | None = None,
    *,
    rows_per_codebook: int = 1,
    iterations: int = 30,
    seed: int = 0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> ClusteredWeight:
    """Cluster ``weight`` [out, in] into 2**bits fp16 values per codebook.

    ``column_weights`` [in] are the per-input-column k-means weights (the calibration Hessian
    diagonal, or None for plain k-means). The codebook of the result is per row, as
    ``ClusteredWeight`` holds it: rows sharing a codebook carry identical copies.
    """
    check_settings(bits, rows_per_codebook, iterations)
    w = weight.detach().to(torch.float32)
    rows, cols = w.shape
    k = 2**bits
    importance = column_importance(column_weights, cols, w.device)
    x, weights = _grouped(w, importance, rows_per_codebook)  # [books, r * in]
    generator = torch.Generator(device=w.device).manual_seed(seed)
    books = x.shape[0]
    step = max(1, chunk_elements // x.shape[1])
    codebook = torch.empty(books, k, dtype=torch.float32, device=w.device)
    indices = torch.empty(books, x.shape[1], dtype=torch.uint8, device=w.device)
    for start in range(0, books, step):
        part = slice(start, start + step)
        codebook[part], idx = cluster_rows(x[part], weights[part], k, iterations, generator)
        indices[part] = idx.to(torch.uint8)
    r = rows_per_codebook
    return ClusteredWeight(
        indices=indices.reshape(books * r, cols)[:rows].cpu(),
        codebook=codebook.repeat_interleave(r, dim=0)[:rows].cpu(),
        bits=bits,
    )


# ---------------------------------------------------------------------------------------------
# Error compensation and codebook refit (need the full Hessian)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    """The per-column loop is many tiny operations: one CPU thread runs them fastest."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compensated_assign(weight: torch.Tensor, codebook: torch.Tensor, hessian: PreparedHessian,
                       block_size: int = 128) -> torch.Tensor:
    """GPTQ with a codebook instead of a grid: indices int64 [out, in] into ``codebook``.

    Columns are taken in ``hessian.perm`` order; each is rounded to the nearest entry of its
    row's codebook [out, k] and the error is propagated to the remaining columns with the
    upper Cholesky factor of H^-1, in lazy blocks of ``block_size`` columns. Dead inputs are
    zeroed first, as GPTQ does.
    """
    device = hessian.hinv.device
    w = weight.detach().to(device, torch.float32).clone()
    w[:, hessian.dead] = 0.0
    order = codebook.to(device, torch.float32).sort(dim=1)
    book, mids = order.values, midpoints(order.values)  # [out, k], [out, k - 1]
    cols = w.shape[1]
    perm, hinv = hessian.perm, hessian.hinv
    wt = w[:, perm].T.contiguous()  # [in, out]: a column of W is a contiguous row here
    chosen = torch.empty(cols, w.shape[0], dtype=torch.int64, device=device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wt[i1:i2].clone()  # [b, out]
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        with _single_thread(device):
            for i in range(i2 - i1):
                column = w1[i]
                j = torch.searchsorted(mids, column[:, None]).squeeze(1)  # [out]
                q = book.gather(1, j[:, None]).squeeze(1)
                chosen[i1 + i] = j
                err = (column - q) / hinv1[i, i]
                w1[i:] -= hinv1[i, i:, None] * err[None, :]
                err1[i] = err
        wt[i2:] -= hinv[i1:i2, i2:].T @ err1  # lazy batch update: one real matmul
    sorted_idx = chosen[torch.argsort(perm)].T  # [out, in], original column order
    return order.indices.gather(1, sorted_idx)


def refit_codebook(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    indices: torch.Tensor,
    codebook: torch.Tensor,
    rows_per_codebook: int = 1,
    ridge: float = 1e-3,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Least-squares codebook for fixed assignments: per codebook, minimise
    sum_rows (w - c[idx]) H (w - c[idx])^T over c. Returns fp16-valued [out, k] (per row).

    With O the one-hot [k, in] matrix of a row's assignments the optimum solves
    c (sum_rows O H O^T) = sum_rows w H O^T. A ridge of ``ridge`` x the mean diagonal pulls
    towards the old ``codebook`` [out, k]: unused entries keep their value and near-singular
    systems stay stable. The cost is one [k, in] x [in, in] product per row.
    """
    device = hessian.device
    w = weight.detach().to(device, torch.float32)
    h = hessian.to(torch.float32)
    idx = indices.to(device, torch.int64)
    rows, cols = w.shape
    k = codebook.shape[1]
    rhs = torch.zeros(rows, k, dtype=torch.float32, device=device).scatter_add_(1, idx, w @ h)
    gram = torch.empty(rows, k, k, dtype=torch.float32, device=device)
    step = max(1, chunk_elements // (k * cols))
    for start in range(0, rows, step):
        part = idx[start : start + step]  # [c, in]
        onehot = torch.zeros(part.shape[0], k, cols, dtype=torch.float32, device=device)
        onehot.scatter_(1, part[:, None, :], 1.0)  # [c, k, in]
        gram[start : start + step] = (onehot @ h) @ onehot.transpose(1, 2)  # [c, k, k]
    r = rows_per_codebook
    books = codebook_rows(rows, r)
    pad = books * r - rows
    old = codebook.to(device, torch.float32)
    if pad:
        gram = torch.cat([gram, gram.new_zeros(pad, k, k)])
        rhs = torch.cat([rhs, rhs.new_zeros(pad, k)])
    gram = gram.reshape(books, r, k, k).sum(dim=1)  # [books, k, k]
    rhs = rhs.reshape(books, r, k).sum(dim=1)  # [books, k]
    old_books = old[::r]  # [books, k]: rows of one run share their codebook
    lam = ridge * torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)  # [books]
    eye = torch.eye(k, dtype=torch.float32, device=device)
    system = gram + lam[:, None, None] * eye
    new, info = torch.linalg.solve_ex(system, (rhs + lam[:, None] * old_books)[:, :, None])
    new = new.squeeze(2)
    bad = (info != 0) | ~torch.isfinite(new).all(dim=1)
    new = torch.where(bad[:, None], old_books, new)
    return to_fp16_values(new).repeat_interleave(r, dim=0)[:rows]


def compensated_cluster(
    weights: list[torch.Tensor],
    bits: int,
    hessian: PreparedHessian,
    *,
    rows_per_codebook: int = 1,
    iterations: int = 30,
    seed: int = 0,
    rounds: int = 1,
    refit: bool = True,
    block_size: int = 128,
) -> list[ClusteredWeight]:
    """Cluster layers that read the same input (one Hessian): Hessian-diagonal-weighted k-means
    for the codebooks, then ``rounds`` x (compensated assignment, least-squares refit).

    Rows are independent given H, so the layers' rows are stacked for the column loop (it runs
    once for q, k and v, not three times); k-means and refit run per layer, so a codebook never
    spans two layers. The refit is skipped at 8 bits, where its [256, in] products per row cost
    far more than they could gain.
    """
    check_settings(bits, rows_per_codebook, iterations)
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    device = hessian.hinv.device
    importance = torch.diag(hessian.hessian)
    ws = []
    for weight in weights:
        w = weight.detach().to(device, torch.float32).clone()
        w[:, hessian.dead] = 0.0  # as GPTQ: these inputs never reach the output
        ws.append(w)
    books = [cluster_weight(w, bits, importance, rows_per_codebook=rows_per_codebook,
                            iterations=iterations, seed=seed).codebook.to(device) for w in ws]
    rows = [w.shape[0] for w in ws]
    stacked = torch.cat(ws)  # [sum(out), in]
    parts: list[torch.Tensor] = []
    for _ in range(rounds):
        indices = compensated_assign(stacked, torch.cat(books), hessian, block_size)
        parts = list(indices.split(rows))
        if refit and bits <= 4:
            books = [refit_codebook(w, hessian.hessian, idx, book, rows_per_codebook)
                     for w, idx, book in zip(ws, parts, books, strict=True)]
    return [ClusteredWeight(indices=idx.to(torch.uint8).cpu(), codebook=book.cpu(), bits=bits)
            for idx, book in zip(parts, books, strict=True)]


def weighted_error(weight: torch.Tensor, clustered: ClusteredWeight,
                   column_weights: torch.Tensor | None = None) -> float:
    """sum_ij h_j (W_ij - Q_ij)**2: the objective k-means minimises (h = 1 when None)."""
    w = weight.detach().to(torch.float32)
    delta = (w - clustered.dequantize().to(w.device)) ** 2
    if column_weights is not None:
        delta = delta * column_weights.to(w.device, torch.float32)[None, :]
    return float(delta.sum())


def hessian_error(weight: torch.Tensor, clustered: ClusteredWeight,
                  hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer-output error on the calibration data."""
    delta = weight.detach().to(hessian.device, torch.float32) - clustered.dequantize().to(
        hessian.device)
    return float(((delta @ hessian.to(torch.float32)) * delta).sum())
