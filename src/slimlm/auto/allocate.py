"""From measured costs to candidate solutions: formats per item and decoder layers removed, under a byte budget.

The formats are a multiple-choice knapsack (knapsack.py). Removing decoder layers couples with it (a removed
layer's Linears take no bytes whatever their format), so it is an outer loop: for r = 0, 1, ... `max_removed`,
the r layers whose removal costs least (measured one by one, summed as if additive) go, the knapsack allocates the
rest of the budget over the remaining items, and the solution's proxy cost is the removal cost plus the formats'.
The best `count` solutions over every r (each at a few budgets just under the limit) are the candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from slimlm.auto import knapsack
from slimlm.auto.sensitivity import Costs


@dataclass
class Solution:
    formats: dict[str, str]  # item name -> option name
    removed: tuple[int, ...]  # decoder layers removed
    proxy: float  # Σ costs: the predicted KL
    bytes: int  # the predicted size of the output


def allocate(
    costs: Costs,
    budget: int,
    fixed_bytes: Callable[[frozenset[int]], int],
    max_removed: int = 0,
    count: int = 4,
) -> list[Solution]:
    """The `count` solutions of least proxy cost that fit `budget` bytes; fixed_bytes(removed) is what the output
    takes besides the items (header, norms) with those layers removed."""
    order = sorted(costs.removal, key=costs.removal.get)
    found: list[Solution] = []
    for r in range(min(max_removed, len(order)) + 1):
        removed = frozenset(order[:r])
        kept = [i for i, item in enumerate(costs.items) if item.layer not in removed]
        item_costs = [costs.costs[i] for i in kept]
        sizes = [costs.items[i].sizes for i in kept]
        room = budget - fixed_bytes(removed)
        removal_cost = sum(costs.removal[layer] for layer in removed)
        for choice in knapsack.candidates(item_costs, sizes, room, count=count):
            formats = {costs.items[i].name: costs.items[i].options[j].name for i, j in zip(kept, choice, strict=True)}
            used = knapsack.total(sizes, choice) + fixed_bytes(removed)
            proxy = removal_cost + knapsack.total(item_costs, choice)
            found.append(Solution(formats, tuple(sorted(removed)), proxy, int(used)))
    found.sort(key=lambda s: s.proxy)
    return found[:count]


def uniform_solution(costs: Costs, option: str, fixed: int) -> Solution | None:
    """Every item at `option` (None if some item lacks it): the uniform recipe's proxy, for comparison."""
    formats, proxy, size = {}, 0.0, fixed
    for item, row in zip(costs.items, costs.costs, strict=True):
        names = [o.name for o in item.options]
        if option not in names:
            return None
        j = names.index(option)
        formats[item.name], proxy, size = option, proxy + row[j], size + item.options[j].bytes
    return Solution(formats, (), proxy, size)
