"""The latency model (rates per llama.cpp type fitted on whole files), its cache, and allocation under a
predicted-latency budget with the same knapsack as under a size budget."""

import pytest

from slimlm.auto import knapsack
from slimlm.auto.allocate import Resource, allocate, size_resource, uniform_solution
from slimlm.auto.latency import LatencyModel, agreement, cached_figures
from slimlm.auto.sensitivity import Costs, Item, Option

RATES = {"F32": 4e-8, "Q8_0": 1.2e-8, "Q4_0": 0.7e-8, "Q2_K": 0.5e-8}


def _ms(composition):
    return sum(RATES[t] * n for t, n in composition.items())


def test_fit_recovers_the_rates_with_a_fallback_type_in_a_uniform_file():
    compositions = {
        "f32": {"F32": 1_000_000},
        "q8": {"Q8_0": 1_000_000},
        "q4": {"Q4_0": 1_000_000},
        # a k-quant's --pure file: its 576-wide rows fall back to Q4_0
        "q2": {"Q2_K": 700_000, "Q4_0": 300_000},
    }
    model = LatencyModel.fit({f: _ms(c) for f, c in compositions.items()}, compositions)
    assert model.rates == pytest.approx(RATES, rel=1e-9)
    mix = {"Q8_0": 200_000, "Q2_K": 500_000, "Q4_0": 100_000}
    assert model.predict(mix) == pytest.approx(_ms(mix))
    assert model.predict({"IQ4_NL": 10}) is None  # never fitted


def test_a_uniform_type_costs_its_files_latency_in_proportion_to_parameters():
    model = LatencyModel.fit({"q4": 3.0}, {"q4": {"Q4_0": 1_200}})
    assert model.item_ms(400, "Q4_0") == pytest.approx(3.0 * 400 / 1_200)


def test_agreement_is_the_relative_error_over_rows_with_both_figures():
    rows = [
        {"predicted_ms_per_token": 2.2, "decode_ms_per_token": 2.0},
        {"predicted_ms_per_token": 1.8, "decode_ms_per_token": 2.0},
        {"decode_ms_per_token": 5.0},
    ]
    found = agreement(rows)
    assert found["rows"] == 2
    assert found["mean_abs_rel_error"] == pytest.approx(0.1)
    assert found["mean_rel_error"] == pytest.approx(0.0, abs=1e-12)
    assert agreement(rows[2:]) is None


def test_figures_are_cached_by_file_and_measured_again_when_it_changes(tmp_path):
    store, path = tmp_path / "latency.json", tmp_path / "model.gguf"
    path.write_bytes(b"one")
    calls = []

    def measure():
        calls.append(1)
        return {"decode_ms_per_token": float(len(calls))}

    assert cached_figures(store, path, "t2", measure)["decode_ms_per_token"] == 1.0
    assert cached_figures(store, path, "t2", measure)["decode_ms_per_token"] == 1.0
    assert cached_figures(store, path, "t1", measure)["decode_ms_per_token"] == 2.0  # other settings
    path.write_bytes(b"changed")
    assert cached_figures(store, path, "t2", measure)["decode_ms_per_token"] == 3.0


def _costs():
    """Three layers of one item each: a slow accurate option and a fast lossy one."""
    items = [Item(f"l{k}", [Option("Q8_0", 10, dict), Option("Q4_0", 6, dict)], layer=k) for k in range(3)]
    return Costs(items, [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]], removal={0: 9.0, 1: 9.0, 2: 0.5})


def test_allocation_under_a_latency_budget_fits_it_and_carries_the_size():
    costs = _costs()
    latency = Resource("ms_per_token", [[0.31, 0.17]] * 3, lambda removed: 0.05, resolution=1e-6)
    sizes = size_resource(costs, lambda removed: 4)
    budget = 0.05 + 0.31 + 0.17 + 0.17 + 0.001  # one item fits at Q8_0: the one whose Q4_0 loses most
    best = allocate(costs, budget, latency, count=2, also=[sizes])[0]
    assert best.formats == {"l0": "Q4_0", "l1": "Q4_0", "l2": "Q8_0"}
    assert best.predicted["ms_per_token"] == pytest.approx(budget - 0.001)
    assert best.bytes == 4 + 6 + 6 + 10
    removing = allocate(costs, budget, latency, max_removed=1, count=1)[0]
    assert removing.removed == (2,) and removing.proxy == pytest.approx(0.5)  # layer 2's removal is cheap
    assert removing.predicted["ms_per_token"] <= budget
    uniform = uniform_solution(costs, "Q4_0", [latency, sizes])
    assert uniform.predicted == pytest.approx({"ms_per_token": 0.05 + 3 * 0.17, "bytes": 22})


@pytest.mark.parametrize("seed", range(6))
def test_fractional_amounts_match_brute_force_at_a_fine_resolution(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    amounts = (rng.integers(1, 30, size=(5, 3)) / 7.0).tolist()  # ms/token-like: not integers
    costs = rng.random((5, 3)).round(4).tolist()
    budget = sum(min(a) for a in amounts) + seed * 0.5
    chosen = knapsack.solve(costs, amounts, budget, resolution=1e-6)
    exact = knapsack.brute_force(costs, amounts, budget)
    assert knapsack.total(amounts, chosen) <= budget + 1e-9
    assert knapsack.total(costs, chosen) == pytest.approx(knapsack.total(costs, exact))
