"""Decode latency for `--target gguf`: measured with llama-bench, predicted per (item, option) for the knapsack.

Measured: ``llama-bench -p 0 -n GEN -r REPS -t THREADS`` on a GGUF file (`decode_figures`): llama-bench's mean
tokens/s, and ms/token as the *median* repetition (the machine is shared: one disturbed repetition moves a
mean, not a median), with the 1-minute load average next to it. Figures are kept in ``<work>/latency.json``,
keyed by the file (path, size, mtime) and the llama-bench settings, as scores.json keeps the scores.

Predicted (`LatencyModel`): decoding one token reads every weight matrix once (the tied embedding as the output
head's matrix), so a file's ms/token is modelled as Σ over its matrices of params × rate(type) — a rate per
llama.cpp type in ms per parameter, fitted by least squares on the files the search makes anyway: the f32 file
and one ``--pure`` file per type (uniform/<TYPE>.gguf; a k-quant's 576-wide rows fall back to another type
there, which the fit accounts for). For a uniform file of type T this is the suggested L_T · params_i /
params_all; norms, attention over the cache and per-op overhead are spread over the matrices in proportion to
their size, so removing a layer removes its share. How far off it is on files it was not fitted on (the
candidates, llama.cpp's own mixes) goes into the report.

Why a rate per type rather than per byte: on SmolLM2-135M (llama-bench -t 1, load 2.3) Q4_1 decodes 40 % slower
than Q4_0 for 11 % more bytes, and Q6_K faster than Q8_0. Fitted on the f32 and 11 uniform files, this model
predicted 25 other files (llama.cpp's Q4_K_M/Q4_0/IQ4_NL/Q2_K, 21 searched mixes) within 3.5 % on average (11 %
at most); ms = c + k·bytes fitted on the same files was off by 18.6 % on average (31 % at most).
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimlm.export.llamacpp import run_bench
from slimlm.export.mixed_types import SourceLayout
from slimlm.pipeline import write_json_atomic

GEN_TOKENS = 64
REPETITIONS = 5


def cached_figures(store: Path, path: Path, settings: str, compute) -> dict:
    """compute()'s figures for the file `path`, kept in the JSON file `store` by (path, size, mtime, settings):
    a rewritten file is measured again, a shared work folder measures each file once."""
    stat = path.stat()
    return cached(store, f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{settings}", compute)


def cached(store: Path, key: str, compute) -> dict:
    """compute()'s figures, kept under `key` in the JSON file `store` (computed once)."""
    figures = json.loads(store.read_text()) if store.is_file() else {}
    if key not in figures:
        figures[key] = compute()
        write_json_atomic(store, figures)
    return figures[key]


def decode_figures(path: Path, store: Path, threads: int, gen: int = GEN_TOKENS, reps: int = REPETITIONS) -> dict:
    """llama-bench's decode speed of `path`: decode_tps (mean ± sd), decode_ms_per_token (median repetition)."""

    def measure() -> dict:
        load = os.getloadavg()[0]
        result = run_bench(path, threads=threads, prompt=0, gen=gen, repetitions=reps)
        samples = [ns / gen / 1e6 for row in result["rows"] for ns in row.get("samples_ns", [])]
        return {
            "decode_tps": result["decode_tps"],
            "decode_tps_sd": result["decode_tps_sd"],
            "decode_ms_per_token": statistics.median(samples),
            "decode_ms_samples": samples,
            "decode_loadavg_1min": load,
            "decode_protocol": f"llama-bench -p 0 -n {gen} -r {reps} -t {threads}; ms/token = median repetition",
        }

    return cached_figures(store, path, f"bench|t{threads}|n{gen}|r{reps}", measure)


def matrix_params(path: Path) -> dict[str, int]:
    """A GGUF's weight-matrix parameters per llama.cpp type (1-D tensors, the norms, left out)."""
    counts: dict[str, int] = {}
    for tensor in SourceLayout.read(path).tensors:
        if len(tensor.shape) == 2:
            counts[tensor.type_name] = counts.get(tensor.type_name, 0) + int(np.prod(tensor.shape))
    return counts


@dataclass
class LatencyModel:
    rates: dict[str, float]  # llama.cpp type -> ms per token per weight parameter
    fitted_on: dict[str, float]  # file -> its measured ms/token

    @classmethod
    def fit(cls, measured: dict[str, float], compositions: dict[str, dict[str, int]]) -> LatencyModel:
        """Non-negative least squares of ms/token = Σ_type params × rate over the files (a rate below zero would
        make a tensor faster the bigger it is: on a model where per-step overhead dominates, noise fits that);
        every type must occur in some file."""
        from scipy.optimize import nnls

        types = sorted({t for counts in compositions.values() for t in counts})
        files = sorted(measured)
        a = np.array([[compositions[f].get(t, 0) for t in types] for f in files], dtype=np.float64)
        b = np.array([measured[f] for f in files])
        scale = a.max(axis=0)  # per-type columns of similar magnitude: a well-conditioned solve
        solution, _ = nnls(a / scale, b)
        return cls({t: float(r / s) for t, r, s in zip(types, solution, scale, strict=True)}, measured)

    def item_ms(self, params: int, type_name: str) -> float:
        return params * self.rates[type_name]

    def predict(self, composition: dict[str, int]) -> float | None:
        """Predicted ms/token of a file with these matrices (None if a type was never fitted)."""
        if any(t not in self.rates for t in composition):
            return None
        return sum(self.item_ms(n, t) for t, n in composition.items())


def agreement(rows: list[dict]) -> dict | None:
    """How far predicted ms/token is from measured over the rows having both (not the fitted uniform files)."""
    pairs = [
        (r["predicted_ms_per_token"], r["decode_ms_per_token"])
        for r in rows
        if r.get("predicted_ms_per_token") and r.get("decode_ms_per_token")
    ]
    if not pairs:
        return None
    errors = [p / m - 1 for p, m in pairs]
    return {
        "rows": len(pairs),
        "mean_abs_rel_error": float(np.mean(np.abs(errors))),
        "max_abs_rel_error": float(np.max(np.abs(errors))),
        "mean_rel_error": float(np.mean(errors)),
    }
