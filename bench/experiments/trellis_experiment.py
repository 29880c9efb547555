"""Frozen at commit 1963e47: run it from a checkout of that commit (it imports the block
walker of the time, since replaced by ``plugins/blockwise``); results in
bench/results/trellis-cuda-experiments.json. The trellis quantizer it led to is
``plugins/quantizers/trellis``.

Experiment (not a product feature): does a QTIP-style trellis-coded quantizer on rotated
weights bring SmolLM2-135M at 3.5 average bits to uniform 4-bit GPTQ's perplexity?

Why it exists: issue #4 asks mixed precision at 3.5 bits per weight to match uniform 4-bit GPTQ
g128 (27.59 on WikiText-2; fp32 25.61). Scalar formats do not get there: randomized Hadamard
rotations + GPTQ + the Fisher-weighted knapsack reach ~28.9 (28.25 with block tuning, see
``plugins/allocation/mixed_precision.py``). A trellis code (Tseng et al. 2024, "QTIP:
Quantization with Trellises and Incoherence Processing", the "bitshift trellis") spends its bits
on whole sequences of weights and gets much closer to the Gaussian rate-distortion bound than any
scalar grid. This script measures what it buys before anyone builds it as a format.

The quantizer (pure tensor functions below):

* Bitshift trellis: an L-bit state; each of a sequence's T weights shifts k new bits in,
  ``s_t = ((s_{t-1} << k) | b_t) & (2^L - 1)``, and is reconstructed as ``table[s_t]``. The
  table is fixed and generated from a seed (nothing stored): the 2^L standard-Gaussian quantiles
  ``ndtri((i + 0.5) / 2^L)``, rounded to fp16, in a seeded random order (a "random permuted"
  code: exactly Gaussian marginals, no structure).
* Sequences are tiles, as in QTIP: a sequence of T weights covers ``block`` consecutive input
  columns of T / block consecutive rows, row after row (default T = 64, block = 8: 8 x 8 tiles;
  ``"block": 64`` makes each sequence 64 consecutive weights of one row). Why tiles: the error
  feedback below works between column blocks, and inside a block the trellis minimises the
  plain squared error, blind to the Hessian; narrow blocks leave less to that blindness. Measured
  (rotated SmolLM2, blocks 0/5/20, L=8, k=3, relative proxy loss): block 64 -> 16 -> 8 -> 4 lowers
  it by 10-40 % (o_proj most: 9.5e-3 -> 5.2e-3 in block 5; GPTQ w3g128 7.2e-3), 8 -> 4 by
  another 1-5 % for twice the Viterbi calls.
* Viterbi: exact least squares over all 2^(Tk) bit strings, vectorised over all sequences of a
  column block. The predecessors of state s' are the 2^k states ``(j << (L-k)) | (s' >> k)``,
  so a step is one min over a ``[seqs, 2^k, 2^(L-k)]`` view of the costs (its indices, int64,
  written straight into the back-pointers ``[T-1, seqs, 2^(L-k)]``), then the step's error added
  on a ``[seqs, 2^(L-k), 2^k]`` view (``add`` + ``addcmul``: ``m + w c^2 - 2 w x c``; the
  state-independent ``w x^2`` is dropped). Sequences are chunked so a cost buffer holds at most
  ``chunk_elems`` floats.
* Start state: tail-biting (default). A sequence stores exactly T*k bits, read as a circular
  buffer: the decoder runs the shift register over the T*k bits once to get its initial state
  and decodes on the second pass. The encoder is QTIP's two-pass approximation: Viterbi on the
  sequence rotated by T/2, read the L-k "overlap" bits at the wrap point from that path, then an
  exact Viterbi on the original sequence constrained to start and end with them (2 passes;
  measured at L=8, k=2, T=64: MSE 0.0868 against the exact tail-biting optimum's 0.0867).
  ``"tailbite": false`` stores a free start instead (L-k extra bits per sequence, 1 pass).
* Scales: per module an fp16 scale per input column (the RMS of the column once each row is
  divided by its RMS; ``"col_scale": false`` drops it: o_proj's input, rotated per head only,
  has per-head column magnitudes 0.07 to 0.19), and per output row an fp16 scale
  ``mult * rms(row)``, ``mult`` from ``scale_candidates`` values in 0.9..1.3 chosen per matrix
  on a sample of 256 rows (first 64 columns, least squared error). After quantization each row's
  scale is refitted by least squares in the Hessian norm (kept where it lowers the proxy loss).
  ``"rounds": 2`` quantizes again with the refitted scales (the feedback changes the magnitudes
  of later columns) and keeps the better round (block 0, k=2, rows as sequences: proxy loss
  -1 % to -12 %; twice the time).
* Error feedback (block LDLQ): columns in blocks of ``block``, all rows at once. With ``U`` the
  upper Cholesky factor of ``(H + damp)^-1`` (GPTQ's, from ``prepare_hessian``; natural column
  order) and ``D`` a block's error (weights as updated so far minus their reconstruction), the
  not-yet-quantized columns R get ``W_R -= (D U_BB^-1) U_BR``. Derivation: the inverse Hessian
  of the columns still free is ``G = U_SS^T U_SS`` (a trailing block of an upper factor), so the
  optimal compensation of a fixed error D on B, ``D G_BB^-1 G_BR``, is ``D U_BB^-1 U_BR``; with
  one column per block it is GPTQ's update. The proxy loss then splits exactly,
  ``tr(dW (H + damp) dW^T) = sum_b |D_b U_BB^-1|^2`` (both checked by ``--self-test``).
  ``"weighting": "diag"`` weights each column's squared error in the trellis by
  ``diag((U_BB^T U_BB)^-1)``.
* Layer by layer like ``plugins/quantizers/gptq/layerwise.py``: capture block 0's inputs, then
  per decoder block, per stage (q/k/v, o, gate/up, down) the input Hessian of the stage's linears
  under the already-quantized earlier stages (a forward hook, the rest of the forward skipped),
  quantize them (stacked: rows are independent), and the block's output with quantized weights
  feeds the next block.

Bits (``bits_per_weight``, counted like ``plugins/allocation/cost.py``): T*k per sequence (+ L-k
without tail-biting), 16 per row and 16 per input column of each module; 8-bit modules of a
mixed plan stay scalar GPTQ, counted by ``cost.weight_bits``; the table is generated from a
seed (0 bits). Uniform k = 2 / 3 / 4: 2.046 / 3.046 / 4.046 bits per weight (GPTQ g128: 2.20 /
3.21 / 4.21).

Modes (``--config NAME=JSON``, each run appended to ``--out`` as it finishes, an existing file
kept and extended):

* ``{"bits": 3}``: every linear a k = 3 trellis;
* ``{"allocator": "mixed_precision", "allocator_options": {"avg_bits": 3.5}}``: quantmill's
  allocator plans on the rotated model with GPTQ as the executing quantizer (its costs are GPTQ
  g128's, ~0.2 bits of overheads, and its damages RTN's), then 2/3/4-bit modules get a trellis
  with k = their bits and 5-8-bit ones scalar GPTQ. Such a plan costs less as a trellis
  (``planned_bits_per_weight``, e.g. 3.34 for the allocator's 3.50). ``"target_bits": 3.5``
  instead bisects the allocator's budget for the largest plan whose trellis bits are at most 3.5
  (allocator budget ~3.65; the sensitivity is measured once and reused).

Other keys: ``L`` (16), ``T`` (64), ``block`` (8), ``tailbite`` (true), ``weighting`` ("none"),
``feedback`` (true), ``refit`` (true), ``rounds`` (1), ``col_scale`` (true),
``scale_candidates`` (5), ``damp`` (0.01), ``rotate`` (true), ``rotation`` ("hadamard"),
``seed`` (rotation, 0), ``table_seed`` (0), ``quantizer`` (GPTQ options the allocator plans with
and 8-bit modules use; default the recommended act-order/static-groups/mse-clip/damp 0.001).

    python -u bench/experiments/trellis_experiment.py --self-test            # CPU checks, ~5 s
    python -u bench/experiments/trellis_experiment.py --device cuda --out /tmp/trellis.json \\
        --config 'k3={"bits": 3, "L": 16, "T": 64}' \\
        --config 'm35={"allocator": "mixed_precision", "allocator_options": {"avg_bits": 3.5},
                       "L": 16}'
    # CPU smoke (1 thread, ~5 min): --device cpu --calibration-samples 8 --windows 2
    #   --config 'k3={"bits": 3, "L": 6}'    (or --max-blocks 1 with L=8)

Cost: a Viterbi pass is seqs x T x 2^L state updates, ~20 bytes of memory traffic each in eager
PyTorch (min: 4 + 12/2^k, add: 4 + 4/2^k, addcmul: 8), two passes per sequence; a uniform
config at L=16 is ~1.5e13 state updates (~3e14 bytes). CPU, 1 thread: ~5 ns per state update.
Output: ``viterbi_s`` / ``viterbi_ns_per_state`` (host time; on CUDA it trails the device).

Smoke on the CPU (1 thread; 8 calibration samples, 2 test windows; rotated fp32: 20.46): k=3
at L=6 (a weak trellis: Gaussian MSE 0.031) 24.79, in 289 s; GPTQ w3g128 (recommended
settings, rotated, same data) 23.76.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gptq_bench import calibration_file, demo_gguf  # noqa: E402
from rotation_experiment import perplexity, rotate  # noqa: E402

from quantmill.plugins.quantizers.blockwise import stage_hessian  # noqa: E402
from quantmill.plugins.quantizers.trellis import code  # noqa: E402
from quantmill.plugins.quantizers.trellis.algorithm import (  # noqa: E402
    column_scales,
    fp16_scales,
    from_sequences,
    multiplier_grid,
    refit_row_scales,
    to_sequences,
)
from quantmill.plugins.quantizers.trellis.algorithm import (  # noqa: E402
    hessian_error as proxy_loss,
)
from quantmill.plugins.quantizers.trellis.code import Trellis, can_tailbite  # noqa: E402

SCALE_BITS = 16
STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
DEFAULT_QUANTIZER = {"method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
                     "static_groups": True, "mse_clip": True, "damp_percent": 0.001}


# ---------------------------------------------------------------------------------------------
# The trellis
# ---------------------------------------------------------------------------------------------


@dataclass
class Counters:
    """Viterbi work done so far: seconds and state updates (for the device's rate)."""

    seconds: float = 0.0
    states: int = 0


COUNTERS = Counters()


def make_trellis(L: int, k: int, seed: int, device: torch.device | str = "cpu") -> Trellis:
    return code.make_trellis(L, k, seed).to(device)


def viterbi(tr: Trellis, x: torch.Tensor, weights: list[float] | None = None,
            overlap: torch.Tensor | None = None, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """``code.viterbi``, counted in ``COUNTERS``. No device synchronisation: on CUDA the
    seconds are the host's time in here, which follows the device's once its launch queue is
    full (launches overlap the work)."""
    t0 = time.perf_counter()
    out = code.viterbi(tr, x, weights, overlap, chunk_elems)
    COUNTERS.seconds += time.perf_counter() - t0
    COUNTERS.states += x.shape[0] * x.shape[1] << tr.L
    return out


def encode(tr: Trellis, x: torch.Tensor, weights: list[float] | None = None,
           tailbite: bool = True, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """State paths [B, T] for ``x`` [B, T]: tail-biting (``code.encode``, two passes) when
    asked and possible, else a free start."""
    if not (tailbite and can_tailbite(tr, x.shape[1])):
        return viterbi(tr, x, weights, None, chunk_elems)
    t0 = time.perf_counter()
    out = code.encode(tr, x, weights, chunk_elems)
    COUNTERS.seconds += time.perf_counter() - t0
    COUNTERS.states += 2 * (x.shape[0] * x.shape[1] << tr.L)
    return out


def sequence_bits(tr: Trellis, steps: int, tailbite: bool) -> int:
    """Bits one encoded sequence of ``steps`` weights stores."""
    extra = 0 if tailbite and can_tailbite(tr, steps) else tr.L - tr.k
    return steps * tr.k + extra


def stored_bits(tr: Trellis, path: torch.Tensor, tailbite: bool) -> list[list[int]]:
    """What a file would hold per sequence: the free start's L-k bits (if any) then the k bits of
    every step (tail-biting: only those)."""
    out = []
    for row in path.tolist():
        start = [] if tailbite else [row[0] >> tr.k]
        out.append(start + [s & (tr.fanin - 1) for s in row])
    return out


def decode(tr: Trellis, stored: list[int], tailbite: bool) -> list[int]:
    """States from stored bits alone (the decoder's side of ``stored_bits``)."""
    mask = (1 << tr.L) - 1
    state, chunks = 0, stored
    if tailbite:
        for b in stored:  # first pass over the circular stream: its last L bits
            state = ((state << tr.k) | b) & mask
    else:
        state, chunks = stored[0], stored[1:]
    out = []
    for b in chunks:
        state = ((state << tr.k) | b) & mask
        out.append(state)
    return out


# ---------------------------------------------------------------------------------------------
# One linear: scales, trellis blocks, error feedback
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrellisSettings:
    L: int = 16
    T: int = 64
    #: feedback block width (0: T): a sequence covers ``block`` columns of T / block
    #: consecutive rows
    block: int = 0
    tailbite: bool = True
    weighting: str = "none"  # "none" or "diag"
    feedback: bool = True
    refit: bool = True
    scale_candidates: int = 5
    rounds: int = 1
    col_scale: bool = True
    chunk_elems: int = 1 << 24

    @property
    def width(self) -> int:
        """Columns per feedback block."""
        return self.block or self.T


def feedback_update(delta: torch.Tensor, hinv: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """``E = D U_BB^-1`` for a block's error ``D`` [rows, c1-c0]: the block's share of the proxy
    loss is ``|E|^2`` and the later columns get ``W[:, c1:] -= E @ U[c0:c1, c1:]``."""
    return torch.linalg.solve_triangular(hinv[c0:c1, c0:c1], delta, upper=True, left=False)


def block_weights(hinv: torch.Tensor, c0: int, c1: int, kind: str) -> list[float] | None:
    """Per-column weights of a block's in-block objective: None (plain squared error) or the
    diagonal of ``(U_BB^T U_BB)^-1``, normalised to mean 1."""
    if kind == "none":
        return None
    u = hinv[c0:c1, c0:c1].double()
    inv = torch.linalg.solve_triangular(u, torch.eye(c1 - c0, dtype=u.dtype, device=u.device),
                                        upper=True)
    d = (inv * inv).sum(dim=1)  # diag(U^-1 U^-T)
    return (d / d.mean()).tolist()


def choose_multiplier(tr: Trellis, normalized: torch.Tensor, s: TrellisSettings,
                      sample_rows: int = 256) -> float:
    """The grid multiplier with the least squared error on the first block of a row sample of
    the ``normalized`` weights (unit RMS per row)."""
    grid = multiplier_grid(s.scale_candidates)
    if len(grid) == 1:
        return grid[0]
    rows = normalized.shape[0]
    idx = torch.linspace(0, rows - 1, min(sample_rows, rows)).long().to(normalized.device)
    block = normalized[idx, : s.T]
    errors = []
    for mult in grid:
        path = encode(tr, block / mult, None, s.tailbite, s.chunk_elems)
        errors.append(float((block - mult * tr.table[path]).square().sum()))
    return grid[min(range(len(grid)), key=errors.__getitem__)]


@dataclass
class LinearResult:
    dequantized: torch.Tensor  # [rows, cols], float32
    bits: int
    multiplier: float
    proxy_loss: float  # tr((W - Q) H (W - Q)^T), undamped H
    proxy_loss_before_refit: float
    refit_scale_ratio: float  # mean over rows of refitted / first scale
    ldl_loss: float  # sum over blocks of |D U_BB^-1|^2 (= the loss with the damped H)
    unit_mse: float  # mean squared error in units of each row's scale, before the refit


@dataclass
class _Pass:
    codes: torch.Tensor  # unit-scale reconstructions table[state], [rows, cols]
    bits: int
    ldl_loss: float
    unit_mse: float


def tile_rows(s: TrellisSettings) -> int:
    """Rows one sequence covers (T / block)."""
    if s.T % s.width:
        raise ValueError(f"T ({s.T}) must be a multiple of block ({s.width})")
    return s.T // s.width


def _feedback_pass(original: torch.Tensor, scale: torch.Tensor, unit: torch.Tensor,
                   hinv: torch.Tensor, tr: Trellis, s: TrellisSettings) -> _Pass:
    """One left-to-right pass over the column blocks with fixed row scales; the weight
    ``[r, c]`` is coded as ``scale[r] * unit[r, c] * table[state]``."""
    w = original.clone()
    rows, cols = w.shape
    per = tile_rows(s)
    codes = torch.empty_like(w)  # unit[r, c] * table[state]
    bits = 0
    ldl = torch.zeros((), dtype=torch.float64, device=w.device)  # no host syncs in the loop
    unit_sq = torch.zeros((), device=w.device)
    for c0 in range(0, cols, s.width):
        c1 = min(c0 + s.width, cols)
        block, grid = w[:, c0:c1], scale[:, None] * unit[:, c0:c1]
        target = to_sequences(block / grid, per)
        weights = block_weights(hinv, c0, c1, s.weighting)
        path = encode(tr, target, None if weights is None else weights * per, s.tailbite,
                      s.chunk_elems)
        bits += path.shape[0] * sequence_bits(tr, path.shape[1], s.tailbite)
        unit_sq += (target - tr.table[path]).square().sum()
        values = from_sequences(tr.table[path], rows, c1 - c0)
        codes[:, c0:c1] = values * unit[:, c0:c1]
        err = feedback_update(block - values * grid, hinv, c0, c1)
        ldl += err.double().square().sum()
        if s.feedback and c1 < cols:
            w[:, c1:] -= err @ hinv[c0:c1, c1:]
    return _Pass(codes, bits, float(ldl), float(unit_sq) / w.numel())


def quantize_linear(weight: torch.Tensor, hessian: torch.Tensor, dead: torch.Tensor,
                    hinv: torch.Tensor, tr: Trellis, s: TrellisSettings,
                    parts: list[int] | None = None) -> LinearResult:
    """Trellis-quantize ``weight`` [rows, cols] (a stack of modules with ``parts`` rows each)
    block by block with LDLQ error feedback. ``hessian``/``dead``/``hinv``: a
    ``PreparedHessian``'s fields (natural column order). With ``rounds`` > 1 the whole pass is
    repeated with the previous round's refitted scales (the feedback changes the later columns'
    magnitudes); the round with the least proxy loss is kept."""
    original = weight.detach().to(torch.float32).clone()
    original[:, dead] = 0.0
    rows, cols = original.shape
    parts = parts or [rows]
    unit = (column_scales(original, parts) if s.col_scale
            else torch.ones_like(original))
    scaled = original / unit
    rms = scaled.square().mean(dim=1).sqrt().clamp_min(1e-8)
    mult = choose_multiplier(tr, scaled / rms[:, None], s)
    first = scale = fp16_scales(mult * rms)
    side_bits = rows * SCALE_BITS + (len(parts) * cols * SCALE_BITS if s.col_scale else 0)
    best: LinearResult | None = None
    for _ in range(max(1, s.rounds)):
        run = _feedback_pass(original, scale, unit, hinv, tr, s)
        before = proxy_loss(original, run.codes * scale[:, None], hessian)
        if s.refit:
            scale = refit_row_scales(original, run.codes, scale, hessian)
        q = run.codes * scale[:, None]
        result = LinearResult(q, run.bits + side_bits, mult, proxy_loss(original, q, hessian),
                              before, float((scale / first).mean()), run.ldl_loss, run.unit_mse)
        if best is None or result.proxy_loss < best.proxy_loss:
            best = result
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------
# The model, layer by layer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModulePlan:
    """``trellis`` with k = bits, or ``scalar`` GPTQ at bits/group_size (5-8 bits)."""

    kind: str
    bits: int
    group_size: int = 128


@dataclass
class RunStats:
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    bits: int = 0
    weights: int = 0


def quantize_group(modules: list[torch.nn.Linear], plan: ModulePlan, hessian: torch.Tensor,
                   trellis: Trellis | None, s: TrellisSettings, damp: float,
                   quantizer_options: dict[str, Any]) -> tuple[list[torch.Tensor], dict]:
    """Quantize the stacked weights of ``modules`` (one input); their dequantized weights."""
    from quantmill.plugins.allocation.cost import Candidate, weight_bits
    from quantmill.plugins.quantizers.gptq.algorithm import (
        GPTQSettings,
        gptq_quantize,
        prepare_hessian,
    )

    stacked = torch.cat([m.weight.detach().float() for m in modules])
    sizes = [m.out_features for m in modules]
    if plan.kind == "trellis":
        assert trellis is not None
        prepared = prepare_hessian(hessian, damp, False)
        res = quantize_linear(stacked, prepared.hessian, prepared.dead, prepared.hinv,
                              trellis, s, sizes)
        info = {"bits": res.bits, "multiplier": res.multiplier, "proxy_loss": res.proxy_loss,
                "proxy_loss_before_refit": res.proxy_loss_before_refit,
                "refit_scale_ratio": res.refit_scale_ratio, "ldl_loss": res.ldl_loss,
                "unit_mse": res.unit_mse, "damp_used": prepared.damp_used}
        q = res.dequantized
    else:
        o = quantizer_options
        settings = GPTQSettings(bits=plan.bits, group_size=plan.group_size,
                                sym=bool(o.get("sym", False)),
                                desc_act=bool(o.get("desc_act", False)),
                                static_groups=bool(o.get("static_groups", False)),
                                damp_percent=float(o.get("damp_percent", damp)),
                                mse_clip=bool(o.get("mse_clip", True)),
                                refit_scales=bool(o.get("refit_scales", True)))
        qw, st = gptq_quantize(stacked, hessian, settings)
        q = qw.dequantize().to(stacked.device, torch.float32)
        bits = sum(weight_bits(Candidate(plan.bits, plan.group_size), n, stacked.shape[1])
                   for n in sizes)
        info = {"bits": bits, "proxy_loss": st.hessian_error, "damp_used": st.damp_used}
    base = float(((stacked.double() @ hessian.double()) * stacked.double()).sum())
    info["relative_proxy_loss"] = info["proxy_loss"] / max(base, 1e-30)
    return list(torch.split(q, sizes)), info


@torch.inference_mode()
def quantize_model(model: torch.nn.Module, plan: dict[str, ModulePlan], input_ids: torch.Tensor,
                   s: TrellisSettings, table_seed: int, damp: float,
                   quantizer_options: dict[str, Any], device: torch.device, batch_size: int = 8,
                   max_blocks: int | None = None) -> RunStats:
    """Quantize every planned linear of the first ``max_blocks`` decoder blocks in place."""
    from quantmill.plugins.models.modules import block_output
    from quantmill.plugins.quantizers.gptq.layerwise import (
        capture_block_inputs,
        find_decoder_layers,
    )

    prefix, layers = find_decoder_layers(model)
    hidden, kwargs = capture_block_inputs(model, layers[0], input_ids, batch_size, device)
    kwargs = [{k: v for k, v in kw.items()
               if k not in ("use_cache", "past_key_values", "past_key_value")} for kw in kwargs]
    trellises: dict[int, Trellis] = {}
    stats = RunStats()
    count = len(layers) if max_blocks is None else min(max_blocks, len(layers))
    t0 = time.perf_counter()
    for i in range(count):
        block = layers[i]
        mods = dict(block.named_modules())
        for stage in STAGES:
            names = [n for n in stage if f"{prefix}.{i}.{n}" in plan]
            if not names:
                continue
            hessian = stage_hessian(block, mods[stage[0]], hidden, kwargs, hidden[0].device)
            groups: dict[ModulePlan, list[str]] = {}
            for n in names:
                groups.setdefault(plan[f"{prefix}.{i}.{n}"], []).append(n)
            for mp, group in groups.items():
                tr = None
                if mp.kind == "trellis":
                    if mp.bits not in trellises:
                        trellises[mp.bits] = make_trellis(s.L, mp.bits, table_seed, device)
                    tr = trellises[mp.bits]
                linears = [mods[n] for n in group]
                parts, info = quantize_group(linears, mp, hessian, tr, s, damp,
                                             quantizer_options)
                for linear, q in zip(linears, parts, strict=True):
                    linear.weight.copy_(q.to(linear.weight.dtype))
                    stats.weights += linear.weight.numel()
                key = f"{prefix}.{i}." + "+".join(group)
                stats.modules[key] = {"kind": mp.kind, "k": mp.bits, **info}
                stats.bits += info["bits"]
        for h, kw in zip(hidden, kwargs, strict=True):
            h.copy_(block_output(block(h, **kw)))
        print(f"  block {i}: {time.perf_counter() - t0:.1f} s, viterbi {COUNTERS.seconds:.1f} s",
              flush=True)
    return stats


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


def trellis_plan(specs: dict[str, Any]) -> dict[str, ModulePlan]:
    """Allocator specs -> 2/3/4 bits: trellis with k = bits; more: scalar GPTQ."""
    return {n: ModulePlan("trellis", sp.bits) if sp.bits <= 4
            else ModulePlan("scalar", sp.bits, sp.group_size) for n, sp in specs.items()}


def plan_bits(plan: dict[str, ModulePlan], shapes: dict[str, tuple[int, int]],
              s: TrellisSettings) -> int:
    """What ``plan`` costs in bits, counted as ``quantize_model`` will count it."""
    from quantmill.plugins.allocation.cost import Candidate, weight_bits

    total = 0
    for n, mp in plan.items():
        rows, cols = shapes[n]
        if mp.kind == "scalar":
            total += weight_bits(Candidate(mp.bits, mp.group_size), rows, cols)
            continue
        tr, per = Trellis(s.L, mp.bits, torch.zeros(1 << s.L)), tile_rows(s)  # only counts bits
        seqs = sum(sequence_bits(tr, per * min(s.width, cols - c0), s.tailbite)
                   for c0 in range(0, cols, s.width))
        total += (-(-rows // per) * seqs + rows * SCALE_BITS
                  + (cols * SCALE_BITS if s.col_scale else 0))
    return total


def allocate(model: torch.nn.Module, names: list[str], config: dict[str, Any],
             calibration: Any, shapes: dict[str, tuple[int, int]], s: TrellisSettings,
             name: str) -> tuple[dict[str, ModulePlan], dict[str, Any]]:
    """The allocator's plan (with ``target_bits``: bisected on its budget so the trellis plan
    costs at most that many bits per weight)."""
    from quantmill.flows.recipe import build_plugin
    from quantmill.plugins.catalog import Catalog
    from quantmill.plugins.manager import get_plugin_manager

    catalog = Catalog(get_plugin_manager(load_entrypoints=False))
    options = dict(config.get("quantizer", DEFAULT_QUANTIZER))
    quantizer = build_plugin(catalog.quantizers, options.pop("method"), options, name, REPO)
    numel = sum(r * c for r, c in shapes.values())

    def plan_at(budget_options: dict[str, Any]) -> tuple[dict[str, ModulePlan], dict]:
        allocator = build_plugin(catalog.bit_allocators, config["allocator"], budget_options,
                                 name, REPO)
        planned = allocator.plan(model, names, quantizer.default_spec(), calibration)
        return trellis_plan(planned.modules), planned.details

    base = dict(config.get("allocator_options", {}))
    target = config.get("target_bits")
    if target is None:
        plan, details = plan_at(base)
    else:
        base.pop("avg_bits", None)
        lo, hi, best = float(target), float(target) + 1.0, None
        for _ in range(10):
            mid = (lo + hi) / 2
            plan, details = plan_at({**base, "avg_bits": mid})
            if plan_bits(plan, shapes, s) <= target * numel:
                lo, best = mid, (plan, details)
            else:
                hi = mid
        if best is None:
            best = plan_at({**base, "avg_bits": float(target)})
        plan, details = best
    summary = {"allocator_avg_bits": details.get("achieved_avg_bits"),
               "allocator_budget": details.get("budget"),
               "formats_chosen": details.get("formats_chosen")}
    return plan, summary


# ---------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------


def settings_from(config: dict[str, Any], chunk_elems: int) -> TrellisSettings:
    T = int(config.get("T", 64))
    return TrellisSettings(L=int(config.get("L", 16)), T=T, block=int(config.get("block", 8)),
                           tailbite=bool(config.get("tailbite", True)),
                           weighting=str(config.get("weighting", "none")),
                           feedback=bool(config.get("feedback", True)),
                           refit=bool(config.get("refit", True)),
                           scale_candidates=int(config.get("scale_candidates", 5)),
                           rounds=int(config.get("rounds", 1)),
                           col_scale=bool(config.get("col_scale", True)),
                           chunk_elems=chunk_elems)


def gaussian_check(s: TrellisSettings, ks: list[int], seed: int, device: torch.device,
                   sequences: int = 1024) -> dict[str, Any]:
    """Per k: the trellis's mean squared error on iid N(0, 1) sequences at each multiplier
    (QTIP reports ~0.069 at L=16, k=2; scalar Lloyd-Max: 0.118 / 0.0345 / 0.0095 at 2/3/4)."""
    x = torch.randn(sequences, s.T, generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    for k in ks:
        tr = make_trellis(s.L, k, seed, device)
        errs = {}
        for mult in multiplier_grid(s.scale_candidates):
            path = encode(tr, x / mult, None, s.tailbite, s.chunk_elems)
            errs[f"{mult:.3f}"] = float((x - mult * tr.table[path]).square().mean())
        out[str(k)] = errs
    return out


def run(name: str, config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from safetensors.torch import load_file

    from quantmill.plugins.base import CalibrationSet
    from quantmill.plugins.models.modules import DEFAULT_SKIP, quantizable_linears
    from quantmill.plugins.models.sources import GGUFSource

    device = torch.device(args.device)
    s = settings_from(config, args.chunk_elems or (1 << (26 if device.type == "cuda" else 22)))
    table_seed = int(config.get("table_seed", 0))
    damp = float(config.get("damp", 0.01))
    started = time.perf_counter()
    COUNTERS.seconds, COUNTERS.states = 0.0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = GGUFSource().load(args.gguf or demo_gguf(), device)
    model = loaded.model.float().eval().requires_grad_(False)
    ids = load_file(str(args.calibration or calibration_file()))["input_ids"]
    ids = ids[: args.calibration_samples]
    exactness = None
    if config.get("rotate", True):
        with torch.no_grad():
            probe = ids[:1, :64].to(device)
            before = model(input_ids=probe).logits
            rotate(model, int(config.get("seed", 0)), str(config.get("rotation", "hadamard")))
            after = model(input_ids=probe).logits
        exactness = float((after - before).abs().max() / before.abs().max())
    options = dict(config.get("quantizer", DEFAULT_QUANTIZER))
    names = quantizable_linears(model, DEFAULT_SKIP)
    shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features)
              for n in names}
    t_plan = time.perf_counter()
    summary: dict[str, Any] = {}
    if "allocator" in config:
        plan, summary = allocate(model, names, config, CalibrationSet(ids, {}), shapes, s, name)
    else:
        plan = {n: ModulePlan("trellis", int(config["bits"])) for n in names}
    plan_s = time.perf_counter() - t_plan
    numel = sum(r * c for r, c in shapes.values())
    full_plan_bits = plan_bits(plan, shapes, s) / numel  # of the whole model, max_blocks or not
    counts: dict[str, int] = {}
    for p in plan.values():
        counts[f"{p.kind}{p.bits}"] = counts.get(f"{p.kind}{p.bits}", 0) + 1
    print(f"{name}: plan {counts}, {full_plan_bits:.4f} bits per weight "
          f"(allocator's GPTQ count: {summary.get('allocator_avg_bits')})", flush=True)
    if args.max_blocks is not None:
        keep = {f"model.layers.{i}." for i in range(args.max_blocks)}
        plan = {n: p for n, p in plan.items() if any(n.startswith(b) for b in keep)}
    ks = sorted({p.bits for p in plan.values() if p.kind == "trellis"})
    gaussian = gaussian_check(s, ks, table_seed, device)
    t_q = time.perf_counter()
    stats = quantize_model(model, plan, ids, s, table_seed, damp, options, device,
                           args.batch_size, args.max_blocks)
    quantize_s = time.perf_counter() - t_q
    t_e = time.perf_counter()
    ppl = perplexity(loaded, args.windows)
    return {
        "name": name, "config": config, "settings": s.__dict__, "damp": damp,
        "rotation_relative_error": exactness, "calibration_samples": int(ids.shape[0]),
        "windows": args.windows, "max_blocks": args.max_blocks,
        "perplexity": ppl,
        "bits_per_weight": stats.bits / max(stats.weights, 1),  # of the modules quantized
        "planned_bits_per_weight": full_plan_bits,
        **summary, "formats": counts,
        "gaussian_mse": gaussian,
        "proxy_loss_total": sum(m["proxy_loss"] for m in stats.modules.values()),
        "plan_s": plan_s, "quantize_s": quantize_s, "eval_s": time.perf_counter() - t_e,
        "total_s": time.perf_counter() - started,
        "viterbi_s": COUNTERS.seconds, "viterbi_state_updates": COUNTERS.states,
        "viterbi_ns_per_state": 1e9 * COUNTERS.seconds / max(COUNTERS.states, 1),
        "cuda_peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                          if device.type == "cuda" else None),
        "modules": stats.modules,
    }


# ---------------------------------------------------------------------------------------------
# Self-tests (CPU, seconds)
# ---------------------------------------------------------------------------------------------


def _brute_force(tr: Trellis, x: torch.Tensor, weights: torch.Tensor,
                 overlap: int | None, tailbite: bool) -> tuple[float, torch.Tensor]:
    """Least weighted squared error over every bit string for one sequence ``x`` [T]:
    free start (``overlap`` None), a fixed start/end overlap, or exact tail-biting."""
    steps, k, L = x.shape[0], tr.k, tr.L
    prefixes = tr.prefixes
    nbits = (L - k) + steps * k
    z = torch.arange(1 << nbits)
    start = z >> (steps * k)
    state = start
    states = []
    for t in range(steps):
        b = (z >> ((steps - 1 - t) * k)) & (tr.fanin - 1)
        state = ((state << k) | b) & ((1 << L) - 1)
        states.append(state)
    path = torch.stack(states, 1)
    err = ((x[None] - tr.table[path]).square() * weights[None]).sum(1)
    valid = torch.ones_like(err, dtype=torch.bool)
    if overlap is not None:
        valid &= (start == overlap) & ((path[:, -1] & (prefixes - 1)) == overlap)
    if tailbite:
        valid &= start == (path[:, -1] & (prefixes - 1))
    err = torch.where(valid, err, torch.full_like(err, math.inf))
    best = int(err.argmin())
    return float(err[best]), path[best]


def _path_error(tr: Trellis, x: torch.Tensor, path: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    return ((x - tr.table[path]).square() * weights).sum(-1)


def test_viterbi_exact() -> str:
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for (L, k), steps in itertools.product([(4, 1), (4, 2), (6, 2), (6, 3), (5, 2)], [3, 4, 5]):
        if (L - k) + steps * k > 17:
            continue
        tr = Trellis(L, k, torch.randn(1 << L, generator=gen))
        x = torch.randn(6, steps, generator=gen) * 1.2
        w = torch.rand(steps, generator=gen) + 0.5
        free = viterbi(tr, x, w.tolist(), None, chunk_elems=64)
        overlap = torch.randint(0, tr.prefixes, (6,), generator=gen)
        fixed = viterbi(tr, x, w.tolist(), overlap, chunk_elems=64)
        for r in range(x.shape[0]):
            best, _ = _brute_force(tr, x[r], w, None, False)
            got = float(_path_error(tr, x[r], free[r], w))
            assert abs(got - best) <= 1e-4 * (1 + best), (L, k, steps, got, best)
            best_o, _ = _brute_force(tr, x[r], w, int(overlap[r]), False)
            got_o = float(_path_error(tr, x[r], fixed[r], w))
            assert abs(got_o - best_o) <= 1e-4 * (1 + best_o), (L, k, steps, got_o, best_o)
            assert int(fixed[r, 0]) >> k == int(overlap[r])
            assert int(fixed[r, -1]) & (tr.prefixes - 1) == int(overlap[r])
            checked += 2
    return f"{checked} sequences: free-start and fixed-overlap Viterbi = brute-force optimum"


def test_decode() -> str:
    gen = torch.Generator().manual_seed(1)
    checked = 0
    for L, k, steps, tailbite in [(8, 2, 16, True), (8, 3, 9, True), (8, 2, 7, False),
                                  (10, 4, 12, True), (6, 1, 8, False), (6, 4, 3, True)]:
        tr = make_trellis(L, k, seed=3)
        x = torch.randn(32, steps, generator=gen)
        path = encode(tr, x, None, tailbite, chunk_elems=1 << 12)
        assert all(int(path[r, t]) >> k == int(path[r, t - 1]) & (tr.prefixes - 1)
                   for r in range(32) for t in range(1, steps)), "not a trellis path"
        recon = tr.table[path]
        stored = stored_bits(tr, path, tailbite)
        assert sequence_bits(tr, steps, tailbite) == steps * k + (0 if tailbite else L - k)
        for r, row in enumerate(stored):
            assert len(row) == steps + (0 if tailbite else 1)
            decoded = decode(tr, row, tailbite)
            assert torch.equal(tr.table[torch.tensor(decoded)], recon[r]), (L, k, steps, r)
            checked += 1
    return f"{checked} sequences: the stored bits alone decode to the reported reconstruction"


def test_tailbite_gap() -> str:
    gen = torch.Generator().manual_seed(2)
    ratios = []
    for L, k, steps in [(4, 1, 10), (4, 2, 8), (6, 2, 6), (6, 3, 5)]:
        tr = make_trellis(L, k, seed=5)
        x = torch.randn(16, steps, generator=gen)
        w = torch.ones(steps)
        path = encode(tr, x, None, True, chunk_elems=1 << 10)
        for r in range(x.shape[0]):
            best, _ = _brute_force(tr, x[r], w, None, True)
            free, _ = _brute_force(tr, x[r], w, None, False)
            got = float(_path_error(tr, x[r], path[r], w))
            assert int(path[r, 0]) >> k == int(path[r, -1]) & (tr.prefixes - 1)
            assert got >= best - 1e-5 and best >= free - 1e-5
            ratios.append(got / max(best, 1e-9))
    tiny = sum(ratios) / len(ratios)
    # at a real length: against the exact tail-biting optimum (best of all 2^(L-k) overlaps)
    tr = make_trellis(8, 2, seed=5)
    x = torch.randn(128, 64, generator=gen)
    tail = (x - tr.table[encode(tr, x, None, True)]).square().sum(1)
    exact = torch.stack([
        (x - tr.table[viterbi(tr, x, None, torch.full((128,), o))]).square().sum(1)
        for o in range(tr.prefixes)]).min(0).values
    free = (x - tr.table[encode(tr, x, None, False)]).square().sum(1)
    assert bool((tail >= exact - 1e-4).all()) and float(tail.sum()) < 1.02 * float(exact.sum())
    return (f"valid circular paths; tiny sequences (T*k <= 12): error / exact tail-biting "
            f"optimum {tiny:.3f} on average; L=8 k=2 T=64 Gaussian MSE: two-pass "
            f"{float(tail.mean()) / 64:.4f}, exact tail-biting {float(exact.mean()) / 64:.4f}, "
            f"free start (+6 bits) {float(free.mean()) / 64:.4f}")


def _correlated_problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + 0.6 * torch.eye(cols)
    mix += 0.5 * torch.randn(1, cols, generator=gen)  # a shared component: strong correlation
    x = torch.randn(4 * cols, cols, generator=gen) @ mix
    return torch.randn(rows, cols, generator=gen), 2 * x.T @ x / x.shape[0]


def test_feedback() -> str:
    from quantmill.plugins.quantizers.gptq.algorithm import prepare_hessian

    weight, hessian = _correlated_problem(24, 40, seed=4)
    prepared = prepare_hessian(hessian, 0.01, False)
    tr = make_trellis(6, 2, seed=0)
    base = TrellisSettings(L=6, T=8, scale_candidates=1, refit=False, chunk_elems=1 << 12)
    losses: dict[str, float] = {}
    for label, s in [("none", TrellisSettings(**{**base.__dict__, "feedback": False})),
                     ("feedback", base),
                     ("feedback+diag", TrellisSettings(**{**base.__dict__, "weighting": "diag"})),
                     ("feedback+refit", TrellisSettings(**{**base.__dict__, "refit": True})),
                     ("feedback+refit, 2 rounds",
                      TrellisSettings(**{**base.__dict__, "refit": True, "rounds": 2})),
                     ("feedback, 4x2 tiles", TrellisSettings(**{**base.__dict__, "block": 2})),
                     ("feedback, 8x1 tiles", TrellisSettings(**{**base.__dict__, "block": 1}))]:
        res = quantize_linear(weight, prepared.hessian, prepared.dead, prepared.hinv, tr, s)
        losses[label] = res.proxy_loss
        assert res.bits == plan_bits({"m": ModulePlan("trellis", 2)}, {"m": (24, 40)}, s)
        if s.feedback and not s.refit:
            damped = prepared.hessian.double() + prepared.damp_used * float(
                prepared.hessian.diagonal().mean()) * torch.eye(40, dtype=torch.float64)
            diff = weight.double() - res.dequantized.double()
            exact = float(((diff @ damped) * diff).sum())
            assert abs(exact - res.ldl_loss) < 1e-4 * exact, (exact, res.ldl_loss)
    assert max(v for k, v in losses.items() if k != "none") < losses["none"], losses
    assert losses["feedback+refit"] <= losses["feedback"] + 1e-6, losses
    assert losses["feedback+refit, 2 rounds"] <= losses["feedback+refit"] + 1e-6, losses
    # the block update is the optimal compensation D G_BB^-1 G_BR, G = (H + damp)^-1
    damped = prepared.hessian.double() + prepared.damp_used * float(
        prepared.hessian.diagonal().mean()) * torch.eye(40, dtype=torch.float64)
    g = torch.linalg.inv(damped)
    delta = torch.randn(24, 8, dtype=torch.float64)
    ours = feedback_update(delta, prepared.hinv.double(), 0, 8) @ prepared.hinv.double()[:8, 8:]
    optimal = delta @ torch.linalg.solve(g[:8, :8], g[:8, 8:])
    assert torch.allclose(ours, optimal, rtol=1e-3, atol=1e-3 * float(optimal.abs().max()))
    text = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
    return ("block feedback = optimal compensation D G_BB^-1 G_BR; loss with damped H = "
            f"sum |D U_BB^-1|^2 (rows x T=8 and tiles); proxy loss tr(dW H dW^T), 24x40, "
            f"correlated inputs, L=6 k=2: {text}")


def test_bits() -> str:
    s = TrellisSettings(L=16, T=64)
    shapes = {"a": (576, 576), "b": (576, 1536)}
    got = plan_bits({"a": ModulePlan("trellis", 2), "b": ModulePlan("trellis", 3)}, shapes, s)
    a_bits, b_bits = 576 * (576 * 2 + 16) + 576 * 16, 576 * (1536 * 3 + 16) + 1536 * 16
    assert got == a_bits + b_bits
    s2 = TrellisSettings(L=16, T=128, tailbite=False, col_scale=False)
    got2 = plan_bits({"a": ModulePlan("trellis", 4)}, {"a": (576, 576)}, s2)
    assert got2 == 576 * (576 * 4 + 5 * 12 + 16)  # 4 x 128 + 64: five sequences
    # and as quantize_linear counts them, for a stack of two modules
    tr = make_trellis(6, 2, 0)
    w, h = torch.randn(12, 20), torch.eye(20)
    res = quantize_linear(w, h, torch.zeros(20, dtype=torch.bool), torch.eye(20), tr,
                          TrellisSettings(L=6, T=8, scale_candidates=1), [8, 4])
    assert res.bits == 12 * (2 * 16 + 4 * 2 + 16) + 2 * 20 * 16, res.bits
    return (f"plan bits as counted by hand (k=2 at 576x576: {a_bits / 576**2:.4f}, "
            f"k=3 at 576x1536: {b_bits / (576 * 1536):.4f} bits per weight)")


def test_scalar_modules() -> str:
    from quantmill.plugins.allocation.cost import Candidate, weight_bits

    torch.manual_seed(0)
    linears = [torch.nn.Linear(256, 32, bias=False), torch.nn.Linear(256, 16, bias=False)]
    weight, hessian = _correlated_problem(1, 256, seed=6)
    parts, info = quantize_group(linears, ModulePlan("scalar", 8, 128), hessian, None,
                                 TrellisSettings(), 0.01, DEFAULT_QUANTIZER)
    assert info["bits"] == sum(weight_bits(Candidate(8, 128), n, 256) for n in (32, 16))
    worst = max(float((p - m.weight.detach()).abs().max() / m.weight.detach().abs().max())
                for p, m in zip(parts, linears, strict=True))
    assert worst < 0.02, worst
    return (f"8-bit modules of a mixed plan: scalar GPTQ g128, bits as cost.weight_bits, "
            f"max relative weight error {worst:.4f}")


def self_test() -> None:
    torch.set_num_threads(1)
    for test in (test_viterbi_exact, test_decode, test_tailbite_gap, test_feedback, test_bits,
                 test_scalar_modules):
        t0 = time.perf_counter()
        print(f"{test.__name__}: {test()} ({time.perf_counter() - t0:.1f} s)", flush=True)
    print("self-test passed", flush=True)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-test", action="store_true", help="run the CPU checks and exit")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the demo GGUF")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="default: the GPTQ benchmark's calibration file (64 x 512)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-blocks", type=int, default=None,
                        help="quantize only the first N decoder blocks (smoke tests)")
    parser.add_argument("--chunk-elems", type=int, default=None,
                        help="cost entries per Viterbi chunk (default 2^26 on cuda: 256 MiB of "
                        "costs, 8 GiB of back-pointers at L=16, k=2, T=64; 2^22 on cpu)")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.self_test:
        self_test()
        return
    if not args.config or args.out is None:
        parser.error("--config and --out are required (or --self-test)")
    results: dict[str, Any] = {
        "device": args.device, "torch": torch.__version__, "runs": [],
        "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads()}
    if args.out.is_file():
        results = json.loads(args.out.read_text())
    for item in args.config:
        name, _, text = item.partition("=")
        results["runs"].append(run(name, json.loads(text), args))
        print(json.dumps({k: v for k, v in results["runs"][-1].items() if k != "modules"}),
              flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # kept if cut short


if __name__ == "__main__":
    main()
