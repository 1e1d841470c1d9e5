"""From measured costs to candidate solutions: formats per item and decoder layers removed, under a budget.

The budget limits one `Resource`: the output's bytes, or its predicted decode ms/token (latency.py). Each
resource is an amount per (item, option) plus what the output takes besides the items, given the layers removed.
The formats are a multiple-choice knapsack (knapsack.py) over the limited resource. Removing decoder layers
couples with it (a removed layer's Linears take nothing whatever their format), so it is an outer loop: for
r = 0, 1, ... `max_removed`, the r layers whose removal costs least (measured one by one, summed as if additive)
go, the knapsack allocates the rest of the budget over the remaining items, and the solution's proxy cost is the
removal cost plus the formats'. When recovery follows (`removal_weight` < 1) a removal counts for that part of its
measured cost: the solutions are ranked by what is predicted after recovery. The MLP width (widths.py) is a second
outer choice: under a cut every MLP item's amounts and cost scale with the channels kept, and its measured KL is
added (removals and cut taken as additive, as the items are). The best `count` solutions over every (r, width)
(each at a few budgets just under the limit) are the candidates; every solution carries its predicted amount of
every resource given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from slimlm.auto import knapsack
from slimlm.auto.sensitivity import Costs
from slimlm.auto.widths import width_share


@dataclass
class Resource:
    name: str  # "bytes", "ms_per_token": the key of the solution's prediction
    amounts: list[list[float]]  # amounts[i][j]: what costs.items[i]'s option j takes
    fixed: Callable[[frozenset[int]], float]  # removed layers -> what the output takes besides the items
    resolution: float = 1.0  # the smallest amount worth telling apart (the knapsack's finest unit)


def size_resource(costs: Costs, fixed_bytes: Callable[[frozenset[int]], int]) -> Resource:
    return Resource("bytes", [item.sizes for item in costs.items], fixed_bytes)


@dataclass
class Solution:
    formats: dict[str, str]  # item name -> option name
    removed: tuple[int, ...]  # decoder layers removed
    proxy: float  # Σ costs: the predicted KL (removals weighted by the allocation's removal_weight)
    predicted: dict[str, float] = field(default_factory=dict)  # resource name -> predicted amount
    removal: float = 0.0  # the removed layers' measured (unweighted) cost, part of `proxy` at removal_weight
    removal_weight: float = 1.0
    mlp_channels: int | None = None  # MLP channels every layer keeps (None: all)

    @property
    def raw_proxy(self) -> float:
        """The predicted KL of the output as the search writes it, before any recovery."""
        return self.proxy + (1 - self.removal_weight) * self.removal

    @property
    def bytes(self) -> int:
        return int(self.predicted["bytes"])


def allocate(
    costs: Costs,
    budget: float,
    limit: Resource,
    max_removed: int = 0,
    count: int = 4,
    also: Sequence[Resource] = (),
    removal_weight: float = 1.0,
) -> list[Solution]:
    """The `count` solutions of least proxy cost whose `limit` resource fits `budget`; `also`: other resources
    whose predicted amounts the solutions carry (the size, under a latency budget); `removal_weight`: the part of
    a layer removal's cost that counts (below 1 when recovery follows)."""
    order = sorted(costs.removal, key=costs.removal.get)
    found: list[Solution] = []
    for r in range(max(0, min(max_removed, len(order) - 1)) + 1):  # one layer at least must stay
        removed = frozenset(order[:r])
        for channels in (None, *costs.widths):
            found += _solve(costs, budget, limit, also, removed, channels, removal_weight, count)
    found.sort(key=lambda s: s.proxy)
    return found[:count]


def _solve(costs, budget, limit, also, removed, channels, removal_weight, count) -> list[Solution]:
    """The knapsack's best `count` format choices with `removed` layers gone and the MLP at `channels`."""
    shares = {
        i: kept_share(item, removed) * width_share(item.name, channels, costs.intermediate)
        for i, item in enumerate(costs.items)
    }
    kept = [i for i, share in shares.items() if share > 0]
    item_costs = [[c * shares[i] for c in costs.costs[i]] for i in kept]
    amounts = [[a * shares[i] for a in limit.amounts[i]] for i in kept]
    room = budget - limit.fixed(removed)
    removal_cost = sum(costs.removal[layer] for layer in removed)
    structure = removal_weight * removal_cost + (costs.widths[channels] if channels else 0.0)
    found = []
    for choice in knapsack.candidates(item_costs, amounts, room, count=count, resolution=limit.resolution):
        picked = dict(zip(kept, choice, strict=True))
        formats = {costs.items[i].name: costs.items[i].options[j].name for i, j in picked.items()}
        proxy = structure + knapsack.total(item_costs, choice)
        predicted = _predicted([limit, *also], picked, removed, shares)
        found.append(
            Solution(formats, tuple(sorted(removed)), proxy, predicted, removal_cost, removal_weight, channels)
        )
    return found


def kept_share(item, removed: frozenset[int]) -> float:
    """What is left of an item once `removed` layers are gone: all or nothing for one module, the share of its
    layers kept for a group of modules (every layer's module of a kind has one shape: its bytes and time scale
    with the count; its cost is taken to scale the same way)."""
    if item.layers:
        return sum(layer not in removed for layer in item.layers) / len(item.layers)
    return 0.0 if item.layer in removed else 1.0


def _predicted(
    resources: Sequence[Resource], picked: dict[int, int], removed: frozenset[int], shares: dict[int, float]
) -> dict[str, float]:
    return {r.name: r.fixed(removed) + sum(r.amounts[i][j] * shares[i] for i, j in picked.items()) for r in resources}


def uniform_solution(costs: Costs, option: str, resources: Sequence[Resource]) -> Solution | None:
    """Every item at `option` (None if some item lacks it): the uniform recipe's proxy and amounts, for comparison."""
    picked = {}
    for index, item in enumerate(costs.items):
        names = [o.name for o in item.options]
        if option not in names:
            return None
        picked[index] = names.index(option)
    proxy = sum(costs.costs[i][j] for i, j in picked.items())
    formats = {costs.items[i].name: option for i in picked}
    return Solution(formats, (), proxy, _predicted(resources, picked, frozenset(), dict.fromkeys(picked, 1.0)))
