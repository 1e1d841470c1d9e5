import numpy as np
import pytest

from slimlm.auto import knapsack


def _instance(seed: int, items: int, options: int):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, size=(items, options)).tolist()
    costs = rng.random((items, options)).round(4).tolist()
    return costs, sizes


@pytest.mark.parametrize("seed", range(12))
def test_solve_matches_brute_force_on_small_instances(seed):
    costs, sizes = _instance(seed, items=5, options=3)
    budget = sum(min(s) for s in sizes) + seed * 4
    exact = knapsack.brute_force(costs, sizes, budget)
    chosen = knapsack.solve(costs, sizes, budget)
    assert knapsack.total(sizes, chosen) <= budget
    assert knapsack.total(costs, chosen) == pytest.approx(knapsack.total(costs, exact))


def test_too_small_a_budget_has_no_solution():
    assert knapsack.solve([[1.0, 2.0]], [[5, 3]], budget=2) is None


def test_a_coarse_budget_grid_still_fits_the_budget():
    costs, sizes = _instance(3, items=40, options=4)
    sizes = [[s * 1000 + 7 for s in row] for row in sizes]
    budget = sum(min(s) for s in sizes) + 150_000
    chosen = knapsack.solve(costs, sizes, budget, steps=50)
    assert knapsack.total(sizes, chosen) <= budget
    # the exact optimum costs at most what the coarse one does
    fine = knapsack.solve(costs, sizes, budget, steps=200_000)
    assert knapsack.total(costs, fine) <= knapsack.total(costs, chosen) + 1e-12


def test_candidates_are_distinct_and_all_fit():
    costs, sizes = _instance(5, items=6, options=3)
    budget = sum(min(s) for s in sizes) + 30
    found = knapsack.candidates(costs, sizes, budget, count=3, slack=0.05)
    assert found[0] == knapsack.solve(costs, sizes, budget)
    assert len({tuple(c) for c in found}) == len(found) >= 2
    assert all(knapsack.total(sizes, c) <= budget for c in found)


def test_mismatched_costs_and_sizes_are_refused():
    with pytest.raises(ValueError, match="item 0"):
        knapsack.solve([[1.0, 2.0]], [[1]], budget=5)
