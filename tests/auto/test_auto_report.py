"""Report helpers: rank agreement over the rows that have both figures, the best candidate by measured KL."""

import pytest

from slimlm.auto.report import best_candidate, pareto_png, spearman


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


def test_pareto_plot_is_a_png():
    assert pareto_png(_rows(), budget=90, title="t")[:4] == b"\x89PNG"
