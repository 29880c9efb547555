"""Multiple-choice knapsack: pick one option per item, minimising the summed damage under a cost
budget. Pure: integer costs and float damages in, choices out.

Why a dynamic programme over cost, and how it stays exact and small:

* Only the cost *above the cheapest option* of each item matters: the all-cheapest plan is the
  base, and the budget left over it (often a third of the total) is what the programme spans.
* Costs are divided by the greatest common divisor of those extra costs. When the remaining
  budget then fits in ``max_states`` cells, the programme is exact: it returns an optimal plan.
* Otherwise costs are rounded *up* to a coarser unit (at most ``max_states`` cells). Rounding up
  can only overestimate a plan's cost, so the result never exceeds the true budget; it may leave
  up to one unit per item unspent, which a greedy pass with exact costs then spends on the best
  damage reductions that still fit. With 2**18 cells the unit is a few thousand bits for a 135M
  model, so the loss is a fraction of a percent of the budget (``Solution.exact`` says which case
  ran).
* Ties in damage go to the costlier option (options are tried most expensive first and only a
  strictly smaller damage replaces a choice), so spare budget buys precision, never nothing.

Memory is one float64 row of ``states`` cells plus one uint8 back-pointer row per item.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_STATES = 1 << 18


@dataclass(frozen=True)
class Solution:
    """The chosen option index per item, its total cost and damage, and how it was solved."""

    choice: list[int]
    cost: int
    damage: float
    exact: bool
    unit: int  # cost units of one programme cell (1 cell = ``unit`` cost)


class InfeasibleBudget(ValueError):
    """Even the cheapest option of every item costs more than the budget."""

    def __init__(self, minimum: int, budget: int):
        super().__init__(f"budget {budget} is below the minimum achievable cost {minimum}")
        self.minimum = minimum
        self.budget = budget


def _check(costs: Sequence[Sequence[int]], damages: Sequence[Sequence[float]]) -> None:
    if len(costs) != len(damages):
        raise ValueError(f"{len(costs)} cost rows but {len(damages)} damage rows")
    for i, (c, d) in enumerate(zip(costs, damages, strict=True)):
        if not c or len(c) != len(d):
            raise ValueError(f"item {i}: needs one or more options with a cost and a damage each")
        if any(int(x) != x or x < 0 for x in c):
            raise ValueError(f"item {i}: costs must be non-negative integers, got {list(c)}")
        if any(not math.isfinite(x) for x in d):
            raise ValueError(f"item {i}: damages must be finite, got {list(d)}")
    if len(costs) and max(len(c) for c in costs) > 255:
        raise ValueError("at most 255 options per item")


def minimum_cost(costs: Sequence[Sequence[int]]) -> int:
    """The cost of the all-cheapest choice."""
    return sum(min(int(x) for x in c) for c in costs)


def solve(
    costs: Sequence[Sequence[int]],
    damages: Sequence[Sequence[float]],
    budget: int,
    max_states: int = DEFAULT_MAX_STATES,
) -> Solution:
    """One option per item with total cost <= ``budget`` and the smallest total damage."""
    _check(costs, damages)
    if max_states < 1:
        raise ValueError(f"max_states must be positive, got {max_states}")
    base = minimum_cost(costs)
    if base > budget:
        raise InfeasibleBudget(base, budget)
    spare = budget - base
    extra = [[int(x) - min(int(y) for y in c) for x in c] for c in costs]
    divisor = 0
    for row in extra:
        for x in row:
            if x <= spare:
                divisor = math.gcd(divisor, x)
    divisor = max(divisor, 1)
    exact = spare // divisor <= max_states
    unit = divisor if exact else -(-spare // max_states)
    states = spare // unit  # cells 0..states; a cell holds the best damage at extra cost <= it

    best = np.zeros(states + 1, dtype=np.float64)  # no items yet: zero damage at any cost
    back: list[np.ndarray] = []
    for row_extra, row_damage in zip(extra, damages, strict=True):
        nxt = np.full(states + 1, np.inf)
        pick = np.zeros(states + 1, dtype=np.uint8)
        # costliest first, strict improvement: equal damage keeps the costlier option
        order = sorted(range(len(row_extra)), key=lambda k: -row_extra[k])
        for k in order:
            cells = -(-row_extra[k] // unit)  # rounded up: never under-counts a cost
            if cells > states:
                continue
            candidate = best[: states + 1 - cells] + float(row_damage[k])
            target = nxt[cells:]
            better = candidate < target
            target[better] = candidate[better]
            pick[cells:][better] = k
        back.append(pick)
        best = nxt

    choice = [0] * len(extra)
    cell = states
    for i in range(len(extra) - 1, -1, -1):
        k = int(back[i][cell])
        choice[i] = k
        cell -= -(-extra[i][k] // unit)
    if not exact:
        choice = _spend_slack(costs, damages, budget, choice)
    cost = sum(int(costs[i][k]) for i, k in enumerate(choice))
    damage = float(sum(float(damages[i][k]) for i, k in enumerate(choice)))
    return Solution(choice=choice, cost=cost, damage=damage, exact=exact, unit=unit)


def _spend_slack(costs: Sequence[Sequence[int]], damages: Sequence[Sequence[float]],
                 budget: int, choice: list[int]) -> list[int]:
    """Greedy repair with exact costs: while some single switch lowers damage and still fits,
    take the one with the largest damage reduction per extra cost unit (zero-cost ones first)."""
    choice = list(choice)
    slack = budget - sum(int(costs[i][k]) for i, k in enumerate(choice))
    while True:
        best_key: tuple[float, float] | None = None
        best_move: tuple[int, int] | None = None
        for i, k0 in enumerate(choice):
            for k, (c, d) in enumerate(zip(costs[i], damages[i], strict=True)):
                delta_cost = int(c) - int(costs[i][k0])
                gain = float(damages[i][k0]) - float(d)
                if gain <= 0 or delta_cost > slack:
                    continue
                key = (math.inf if delta_cost <= 0 else gain / delta_cost, gain)
                if best_key is None or key > best_key:
                    best_key, best_move = key, (i, k)
        if best_move is None:
            return choice
        i, k = best_move
        slack -= int(costs[i][k]) - int(costs[i][choice[i]])
        choice[i] = k
