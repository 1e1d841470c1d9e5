"""Allocating formats under a budget: the multiple-choice knapsack, solved exactly on a discretised budget.

Every item (a Linear, or a group of Linears that must share a format) takes exactly one of its options; option j
of item i costs c_ij (a proxy for the quality it loses: KL to the original, summed as if the items' errors added
up) and takes s_ij of the budgeted resource (bytes of the output, or predicted ms/token of decoding). `solve`
picks one option per item minimising Σ c subject to Σ s ≤ budget.

How ModelOpt's ``auto_quantize`` allocates (modelopt/torch/quantization/algorithms.py, read through its docs and
source): it scores every (layer group, recipe) pair once — by default Σ (∂L/∂Y)² (ΔY)², the Fisher-weighted output
change of that group alone; with ``method="kl_div"`` the KL divergence of the logits with only that group
quantized — then treats the scores as additive and picks one recipe per group under an ``effective_bits``
constraint, with a linear-programming solver for the gradient scores and a threshold (Lagrange multiplier)
binary search for the KL scores. `solve` is the same problem with the same additivity assumption, solved by
dynamic programming instead: the sizes above each item's smallest option are rounded *up* to units of
(budget − Σ smallest) / `steps`, at least `resolution` (the resource's smallest meaningful amount: one byte), so
every returned choice fits the real budget, and the result is exactly optimal whenever the sizes are multiples of
`resolution` and a unit is one `resolution` (small instances; tests compare with brute force).

`candidates` returns the best choices at a few slightly smaller budgets too: the proxy is only a proxy, so the
caller verifies several neighbours by real evaluation rather than trusting the single optimum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def solve(
    costs: Sequence[Sequence[float]],
    sizes: Sequence[Sequence[float]],
    budget: float,
    steps: int = 20_000,
    resolution: float = 1.0,
) -> list[int] | None:
    """The option index of every item minimising Σ cost with Σ size ≤ budget, or None when even the smallest
    options exceed it. costs[i][j], sizes[i][j]: item i's option j (any number of options per item)."""
    costs = [np.asarray(c, dtype=np.float64) for c in costs]
    sizes = [np.asarray(s, dtype=np.float64) for s in sizes]
    _check_shapes(costs, sizes)
    smallest = [float(s.min()) for s in sizes]
    room = budget - sum(smallest)
    if room < 0:
        return None
    unit = max(resolution, room / steps)
    width = int(room // unit)
    # extra amount above the item's smallest option, in units, rounded up so that any chosen set fits the budget
    weights = [np.ceil((s - low) / unit - 1e-9).astype(np.int64) for s, low in zip(sizes, smallest, strict=True)]
    best = np.zeros(width + 1)  # best[w]: least cost of the items so far using at most w units
    picks = np.zeros((len(costs), width + 1), dtype=np.int32)
    for index, (cost, weight) in enumerate(zip(costs, weights, strict=True)):
        best, picks[index] = _add_item(best, cost, weight)
    return _backtrack(picks, weights, width)


def _add_item(best: np.ndarray, cost: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The table after one more item: new[w] = min_j best[w − weight_j] + cost_j."""
    new = np.full_like(best, np.inf)
    pick = np.zeros(best.shape, dtype=np.int32)
    for option, (c, w) in enumerate(zip(cost, weight, strict=True)):
        if w >= best.size:
            continue
        shifted = np.full_like(best, np.inf)
        shifted[w:] = best[: best.size - w] + c
        better = shifted < new
        new[better], pick[better] = shifted[better], option
    return new, pick


def _backtrack(picks: np.ndarray, weights: list[np.ndarray], width: int) -> list[int]:
    chosen, w = [], width
    for index in range(len(weights) - 1, -1, -1):
        option = int(picks[index, w])
        chosen.append(option)
        w -= int(weights[index][option])
    return chosen[::-1]


def _check_shapes(costs: list[np.ndarray], sizes: list[np.ndarray]) -> None:
    if len(costs) != len(sizes):
        raise ValueError(f"{len(costs)} items have costs but {len(sizes)} have sizes")
    for index, (cost, size) in enumerate(zip(costs, sizes, strict=True)):
        if cost.shape != size.shape or cost.ndim != 1 or cost.size == 0:
            raise ValueError(f"item {index}: costs {cost.shape} and sizes {size.shape} must be the same, non-empty")
        if not np.isfinite(cost).all() or not np.isfinite(size).all():
            raise ValueError(f"item {index}: costs and sizes must be finite")


def total(values: Sequence[Sequence[float]], choice: Sequence[int]) -> float:
    """Σ values[i][choice[i]]: the cost or size of a choice."""
    return float(sum(values[i][j] for i, j in enumerate(choice)))


def candidates(
    costs: Sequence[Sequence[float]],
    sizes: Sequence[Sequence[float]],
    budget: float,
    count: int = 3,
    slack: float = 0.01,
    steps: int = 20_000,
    resolution: float = 1.0,
) -> list[list[int]]:
    """Up to `count` distinct choices: the optimum at the budget, then at budgets `slack`, 2·`slack`, ... smaller
    (each one fits the budget; distinct ones only, at most 2·count + 2 tries)."""
    found: list[list[int]] = []
    for k in range(2 * count + 2):
        if len(found) == count:
            break
        choice = solve(costs, sizes, budget * (1 - k * slack), steps, resolution)
        if choice is None:
            break
        if choice not in found:
            found.append(choice)
    return found


def brute_force(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[float]], budget: float) -> list[int] | None:
    """Every combination tried (tests only: options^items of them)."""
    import itertools

    best, best_cost = None, math.inf
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        if total(sizes, choice) <= budget and total(costs, choice) < best_cost:
            best, best_cost = list(choice), total(costs, choice)
    return best
