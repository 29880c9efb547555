"""The multiple-choice knapsack solver: optimal against brute force, never over budget."""

from __future__ import annotations

import itertools
import random

import pytest

from quantmill.plugins.allocation.knapsack import InfeasibleBudget, minimum_cost, solve


def _random_instance(rng: random.Random, items: int, max_cost: int):
    costs, damages = [], []
    for _ in range(items):
        options = rng.randint(1, 4)
        costs.append([rng.randint(0, max_cost) for _ in range(options)])
        damages.append([rng.uniform(0.0, 10.0) for _ in range(options)])
    low = minimum_cost(costs)
    high = sum(max(c) for c in costs)
    return costs, damages, rng.randint(low, high)


def _brute_force(costs, damages, budget):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(costs[i][k] for i, k in enumerate(choice))
        if cost <= budget:
            damage = sum(damages[i][k] for i, k in enumerate(choice))
            best = damage if best is None else min(best, damage)
    return best


def _cost(costs, choice):
    return sum(costs[i][k] for i, k in enumerate(choice))


def test_matches_brute_force_on_small_instances() -> None:
    rng = random.Random(0)
    for _ in range(300):
        costs, damages, budget = _random_instance(rng, rng.randint(1, 6), 30)
        solution = solve(costs, damages, budget)
        assert solution.exact
        assert _cost(costs, solution.choice) == solution.cost <= budget
        assert solution.damage == pytest.approx(_brute_force(costs, damages, budget), abs=1e-9)


def test_coarse_programme_never_exceeds_budget_and_stays_close() -> None:
    """With few cells costs are rounded up: still feasible, never better than the optimum."""
    rng = random.Random(1)
    inexact = 0
    for _ in range(200):
        costs, damages, budget = _random_instance(rng, rng.randint(2, 6), 10_000)
        solution = solve(costs, damages, budget, max_states=16)
        inexact += not solution.exact
        optimum = _brute_force(costs, damages, budget)
        assert _cost(costs, solution.choice) == solution.cost <= budget
        assert solution.damage >= optimum - 1e-9
    assert inexact > 150  # the rounded path really ran


@pytest.mark.parametrize("seed", range(6))
def test_never_exceeds_budget_on_model_sized_instances(seed: int) -> None:
    """Costs like a 135M model's (millions of bits, many items), budgets anywhere between the
    cheapest and the dearest plan: both the exact and the rounded programme stay under."""
    rng = random.Random(seed)
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    costs, damages = [], []
    for _ in range(60):
        out, inp = rng.choice(shapes)
        costs.append([out * inp * b + rng.randint(0, 99_999) for b in (2, 3, 4, 8)])
        damages.append(sorted((rng.uniform(0, 1) for _ in range(4)), reverse=True))
    budget = rng.randint(minimum_cost(costs), sum(max(c) for c in costs))
    bound = _lagrangian_bound(costs, damages, budget)
    for max_states in (1 << 18, 1000):
        solution = solve(costs, damages, budget, max_states=max_states)
        assert _cost(costs, solution.choice) == solution.cost <= budget
        assert solution.damage >= bound - 1e-9
        # the LP optimum has one fractional item, so an optimal plan is within one item's
        # damage spread (< 1 here) of the bound; the rounded programme must be that good too
        assert solution.damage <= bound + 1.0


def _lagrangian_bound(costs, damages, budget) -> float:
    """max over lambda of sum_i min_k (d_ik + lambda c_ik) - lambda B: a lower bound on the
    optimum (any lambda >= 0 gives one; a log grid gets close to the best)."""
    best = float("-inf")
    for exponent in range(-400, 1):
        lam = 10 ** (exponent / 40)
        value = sum(min(d + lam * c for c, d in zip(cr, dr, strict=True))
                    for cr, dr in zip(costs, damages, strict=True)) - lam * budget
        best = max(best, value)
    return max(best, sum(min(d) for d in damages))


def test_budget_that_fits_everything_takes_the_least_damage_everywhere() -> None:
    costs = [[1, 2, 3]] * 5
    damages = [[3.0, 2.0, 1.0]] * 5
    solution = solve(costs, damages, budget=15)
    assert solution.choice == [2] * 5 and solution.cost == 15


def test_equal_damage_takes_the_costlier_option() -> None:
    solution = solve([[1, 4], [1, 4]], [[1.0, 1.0], [2.0, 2.0]], budget=8)
    assert solution.choice == [1, 1]


def test_infeasible_budget_names_the_minimum() -> None:
    with pytest.raises(InfeasibleBudget) as info:
        solve([[5, 9], [3, 4]], [[1.0, 0.0], [1.0, 0.0]], budget=7)
    assert info.value.minimum == 8 and "minimum achievable cost 8" in str(info.value)


@pytest.mark.parametrize(("costs", "damages", "message"), [
    ([[1, 2]], [[1.0]], "one or more options"),
    ([[1, -2]], [[1.0, 0.0]], "non-negative integers"),
    ([[1, 2]], [[1.0, float("nan")]], "finite"),
    ([[1]], [[1.0], [2.0]], "damage rows"),
])
def test_bad_input_is_refused(costs, damages, message) -> None:
    with pytest.raises(ValueError, match=message):
        solve(costs, damages, budget=10)
