"""The bitshift trellis code (plugins/quantizers/trellis/code.py) on tiny CPU tensors: Viterbi is
exact, tail-biting paths decode from their stored bits alone, and the code beats the best scalar
quantizer of the same rate on Gaussian data."""

from __future__ import annotations

import itertools

import pytest
import torch

from quantmill.plugins.quantizers.trellis.code import (
    Trellis,
    decode_states,
    encode,
    gaussian_table,
    make_trellis,
    pack_symbols,
    reconstruct,
    symbols,
    unpack_symbols,
    viterbi,
)

#: MSE of the optimal (Lloyd-Max) scalar quantizer of a standard Gaussian at 2 and 3 bits
LLOYD_MAX_MSE = {2: 0.1175, 3: 0.03454}


def _path_error(tr: Trellis, x: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    return ((x - reconstruct(tr, path)) ** 2).sum(dim=1)


def _consistent(tr: Trellis, path: torch.Tensor) -> bool:
    """Every step shifts k bits into the previous state."""
    mask = (1 << tr.L) - 1
    prev, cur = path[:, :-1], path[:, 1:]
    return bool((((prev << tr.k) & mask) == (cur & ~(tr.fanin - 1) & mask)).all())


def _brute_force_free(tr: Trellis, x: torch.Tensor, w: torch.Tensor | None = None) -> float:
    """Least (weighted) error over every path with a free first state (all enumerated)."""
    best = float("inf")
    mask = (1 << tr.L) - 1
    w = torch.ones_like(x) if w is None else w
    for first in range(1 << tr.L):
        for bits in itertools.product(range(tr.fanin), repeat=x.numel() - 1):
            states = [first]
            for b in bits:
                states.append(((states[-1] << tr.k) | b) & mask)
            err = float((((x - tr.table[torch.tensor(states)]) ** 2) * w).sum())
            best = min(best, err)
    return best


def _brute_force_tailbiting(tr: Trellis, x: torch.Tensor) -> float:
    """Least error over every circular stream of T*k bits."""
    best = float("inf")
    for stream in itertools.product(range(tr.fanin), repeat=x.numel()):
        states = decode_states(tr, torch.tensor([stream]))
        best = min(best, float(_path_error(tr, x[None], states)))
    return best


def test_table_is_fp16_gaussian_quantiles_in_a_seeded_order() -> None:
    table = gaussian_table(8, seed=3)
    assert torch.equal(table, table.half().float())
    assert torch.equal(table, gaussian_table(8, seed=3))
    assert not torch.equal(table, gaussian_table(8, seed=4))
    expected = torch.special.ndtri((torch.arange(256, dtype=torch.float64) + 0.5) / 256)
    assert torch.equal(table.sort().values, expected.half().float())


BACKENDS = ["torch", "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("L", "k", "steps"), [(4, 2, 3), (5, 2, 3), (4, 1, 5), (6, 3, 2)])
def test_viterbi_finds_the_least_squares_path(L: int, k: int, steps: int, backend: str) -> None:
    tr = make_trellis(L, k, seed=1)
    x = torch.randn(6, steps, generator=torch.Generator().manual_seed(L * 10 + k))
    paths = viterbi(tr, x, backend=backend)
    assert _consistent(tr, paths)
    errors = _path_error(tr, x, paths)
    for row in range(x.shape[0]):
        assert float(errors[row]) == pytest.approx(_brute_force_free(tr, x[row]), rel=1e-5,
                                                   abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_viterbi_minimises_the_weighted_error(backend: str) -> None:
    tr = make_trellis(4, 2, seed=0)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(9))
    weights = [4.0, 0.25, 1.0]
    paths = viterbi(tr, x, weights, backend=backend)
    w = torch.tensor(weights)
    got = ((x - reconstruct(tr, paths)) ** 2 * w).sum(dim=1)
    plain = ((x - reconstruct(tr, viterbi(tr, x, backend=backend))) ** 2 * w).sum(dim=1)
    assert bool((got < plain - 1e-6).any())  # the weights changed some choice
    assert bool((got <= plain + 1e-6).all())
    for row in range(x.shape[0]):
        best = _brute_force_free(tr, x[row], w)
        assert float(got[row]) == pytest.approx(best, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("L", "k"), [(8, 2), (10, 3), (9, 4), (12, 10)])
def test_compiled_cpu_kernel_matches_the_torch_path(L: int, k: int) -> None:
    """Equally good paths, free and with a forced overlap, weighted or not; the same paths but
    for near-ties (float32 rounding differs slightly: torch may fuse a multiply-add)."""
    tr = make_trellis(L, k, seed=2)
    gen = torch.Generator().manual_seed(L + k)
    x = torch.randn(37, 32, generator=gen) * 1.3
    weights = (torch.rand(32, generator=gen) + 0.5).tolist()
    overlap = torch.randint(0, tr.prefixes, (37,), generator=gen)
    for w, ov in [(None, None), (weights, None), (None, overlap), (weights, overlap)]:
        fast = viterbi(tr, x, w, ov, backend="cpu")
        slow = viterbi(tr, x, w, ov, backend="torch")
        assert _consistent(tr, fast)
        scale = torch.ones(32) if w is None else torch.tensor(w)
        fast_err = (((x - reconstruct(tr, fast)) ** 2) * scale).sum(dim=1)
        slow_err = (((x - reconstruct(tr, slow)) ** 2) * scale).sum(dim=1)
        torch.testing.assert_close(fast_err, slow_err, rtol=1e-5, atol=1e-5)
        assert float((fast == slow).all(dim=1).float().mean()) >= 0.75
        if ov is not None:
            assert torch.equal(fast[:, -1] & (tr.prefixes - 1), ov)
            assert torch.equal(fast[:, 0] >> tr.k, (fast[:, -1] & (tr.prefixes - 1)))


def test_auto_backend_runs_the_compiled_kernel_on_cpu_tensors(monkeypatch) -> None:
    """The quantizer calls ``encode`` with the default backend: on the CPU that must be the
    compiled kernel (the torch path is several times slower), never the torch steps."""
    from quantmill.plugins.quantizers.trellis import code

    def torch_path(*_args, **_kwargs):
        raise AssertionError("the eager torch path ran on a CPU tensor")

    monkeypatch.setattr(code, "_viterbi_chunk", torch_path)
    tr = make_trellis(8, 2, seed=0)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    paths = encode(tr, x)
    assert torch.equal(decode_states(tr, symbols(tr, paths)), paths)


def test_viterbi_refuses_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown viterbi backend 'gpu'"):
        viterbi(make_trellis(4, 2), torch.zeros(2, 3), backend="gpu")


def test_tail_biting_paths_decode_from_their_stored_bits_alone() -> None:
    tr = make_trellis(8, 2, seed=0)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    paths = encode(tr, x)
    stored = symbols(tr, paths)
    assert int(stored.max()) < tr.fanin
    assert torch.equal(decode_states(tr, stored), paths)
    packed = pack_symbols(tr, stored)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (40, 64 * 2 // 32)
    assert torch.equal(unpack_symbols(tr, packed, 64), stored)


def test_tail_biting_is_close_to_its_exact_optimum() -> None:
    tr = make_trellis(4, 2, seed=5)
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(3))
    paths = encode(tr, x)
    assert torch.equal(decode_states(tr, symbols(tr, paths)), paths)
    got = _path_error(tr, x, paths)
    exact = torch.tensor([_brute_force_tailbiting(tr, row) for row in x])
    assert bool((got >= exact - 1e-5).all())  # a circular stream cannot beat the optimum
    assert float(got.sum() / exact.sum()) < 1.15


@pytest.mark.parametrize("k", [2, 3])
def test_trellis_beats_the_best_scalar_quantizer_on_gaussian_data(k: int) -> None:
    tr = make_trellis(8, k, seed=0)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(k))
    mse = float(((x - reconstruct(tr, encode(tr, x))) ** 2).mean())
    assert mse < 0.85 * LLOYD_MAX_MSE[k]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="1 <= k < L"):
        make_trellis(4, 4)
    with pytest.raises(ValueError, match="1 <= k < L"):
        make_trellis(17, 2)
    with pytest.raises(ValueError, match="table of 16 values"):
        Trellis(4, 2, torch.zeros(8))
    tr = make_trellis(8, 2)
    with pytest.raises(ValueError, match="fewer than the state's L=8"):
        encode(tr, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="cannot hold an L=8 state"):
        decode_states(tr, torch.zeros(3, 3, dtype=torch.int64))
