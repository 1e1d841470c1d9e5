"""Report helpers: rank agreement over the rows that have both figures, the best candidate by measured KL."""

import pytest

from slimlm.auto.report import best_candidate, chosen_row, pareto_png, spearman


def _rows():
    return [
        {"label": "candidate 1", "proxy_kl": 0.10, "kld": 0.20, "ppl": 30.0, "bytes": 90},
        {"label": "candidate 2", "proxy_kl": 0.05, "kld": 0.30, "ppl": 31.0, "bytes": 88},
        {"label": "uniform Q4_0", "proxy_kl": 0.40, "kld": 0.50, "ppl": 35.0, "bytes": 92},
        {"label": "uniform Q8_0", "proxy_kl": 0.01, "kld": 0.01, "ppl": 24.0, "bytes": 140},
        {"label": "llama.cpp Q2_K", "kld": 0.45, "ppl": 33.0, "bytes": 88},
    ]


def test_spearman_uses_rows_with_a_proxy_only():
    # ranks of proxy (3, 2, 4, 1) against kld (2, 3, 4, 1): rho = 1 - 6·2/(4·15) = 0.8
    assert spearman(_rows()) == pytest.approx(0.8)
    assert spearman(_rows()[:2]) is None


def test_best_candidate_is_the_lowest_measured_kl_not_the_lowest_proxy():
    assert best_candidate(_rows())["label"] == "candidate 1"


def test_the_answer_is_a_uniform_row_only_if_it_fits_and_measured_better():
    rows = _rows()
    for row in rows:
        row["predicted_bytes"] = row["bytes"]
    assert chosen_row(rows, {"resource": "bytes", "amount": 100})["label"] == "candidate 1"  # Q4_0 fits, is worse
    assert chosen_row(rows, {"resource": "bytes", "amount": 140})["label"] == "uniform Q8_0"  # fits, is better
    rows[3]["predicted_ms_per_token"] = 2.0
    assert chosen_row(rows, {"resource": "ms_per_token", "amount": 2.5})["label"] == "uniform Q8_0"
    assert chosen_row(rows, {"resource": "ms_per_token", "amount": 1.5})["label"] == "candidate 1"


def test_pareto_plot_is_a_png():
    assert pareto_png(_rows(), budget=90, title="t")[:4] == b"\x89PNG"


def test_timed_rows_get_a_latency_panel_and_their_speed_in_the_table():
    from slimlm.auto.report import _table

    rows = _rows()
    for k, row in enumerate(rows):
        row |= {"decode_tps": 300.0 - 10 * k, "decode_tps_sd": 2.0, "decode_ms_per_token": 1000 / (300 - 10 * k)}
        row |= {"predicted_ms_per_token": 3.5}
    untimed = pareto_png(_rows(), budget=90, title="t")
    timed = pareto_png(rows, budget=None, title="t", latency_budget=3.4)
    width = lambda png: int.from_bytes(png[16:20], "big")  # noqa: E731  (the PNG header's IHDR width)
    assert timed[:4] == b"\x89PNG" and width(timed) > 1.5 * width(untimed)  # a second panel beside the first
    line = next(x for x in _table(rows) if x.startswith("| candidate 1 |"))
    assert "| 300.0 ± 2.0 | 3.33 (3.50) |" in line
    assert "| — | — |" in next(x for x in _table(_rows()) if x.startswith("| candidate 1 |"))
