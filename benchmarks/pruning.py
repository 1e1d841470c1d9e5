"""Pruning benchmark on the built-in SmolLM2-135M (dequantized Q4_1 original): quality, size, speed, time, memory.

Rows: dense; magnitude / Wanda / SparseGPT at 50 % unstructured and 2:4; Wanda uniform vs OWL at 50 % and 60 %;
depth pruning removing 2, 4, 6, 8 of 30 layers with each criterion; width pruning keeping 75 % and 50 % of MLP
channels and 6 of 9 heads. Every stage runs through the stage registry on a fresh copy of the dense model, with the
same calibration windows (c4, seeded). Evaluation: WikiText-2 test, seq_len 2048, the first `--eval-windows`
windows, KL / top-1 agreement against the dense model on the same windows.

Depth rankings do not depend on how many layers go (block influence, perplexity) so each criterion ranks once and
the 2/4/6/8 rows reuse it: their prune time is the ranking time plus the surgery. Angular distance depends on the
block length and ranks per row. The perplexity criterion scores 30 candidates with one calibration pass each; it
uses the first `--ppl-criterion-windows` calibration windows (said in the row's note).

Results go to JSON after every row (atomically), so `--resume` skips rows already measured.

    python benchmarks/pruning.py [--calib-samples 4] [--eval-windows 8] [--only REGEX] [--resume]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from common import StageBench, add_common_arguments, fmt, mib
from slimlm.evaluate.footprint import PeakMemory
from slimlm.prune.depth import RANKINGS, choose_layers
from slimlm.surgery import remove_decoder_layers

DEPTH_COUNTS = (2, 4, 6, 8)


def stage_rows() -> list[tuple[str, str, dict]]:
    """(label, stage, options) for every row that runs a stage as a recipe would."""
    rows = []
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            label = f"{method} {'50%' if pattern == 'unstructured' else pattern}"
            rows.append((label, "prune", {"method": method, "sparsity": 0.5, "pattern": pattern}))
    rows += [
        ("wanda 50% owl", "prune", {"method": "wanda", "sparsity": 0.5, "allocation": "owl"}),
        ("wanda 60%", "prune", {"method": "wanda", "sparsity": 0.6}),
        ("wanda 60% owl", "prune", {"method": "wanda", "sparsity": 0.6, "allocation": "owl"}),
        ("width mlp 75%", "prune_width", {"mlp_keep": 0.75}),
        ("width mlp 50%", "prune_width", {"mlp_keep": 0.5}),
        ("width heads 6/9", "prune_width", {"heads_keep": 6}),
    ]
    rows += [(f"depth -{n} angular", "prune_depth", {"remove": n, "criterion": "angular"}) for n in DEPTH_COUNTS]
    return rows


def ranked_depth_rows() -> list[tuple[str, str, int]]:
    """(label, criterion, layers removed) for the rows that share one ranking per criterion."""
    return [
        (f"depth -{n} {short}", criterion, n)
        for criterion, short in (("block_influence", "BI"), ("perplexity", "ppl"))
        for n in DEPTH_COUNTS
    ]


class DepthBench(StageBench):
    """Adds the depth rows that share one ranking per criterion."""

    def __init__(self, args):
        super().__init__(args)
        self.rankings: dict[str, tuple] = {}

    def run_ranked_depth(self, label: str, criterion: str, count: int) -> None:
        if criterion not in self.rankings:
            windows = self.windows[: self.args.ppl_criterion_windows] if criterion == "perplexity" else self.windows
            with PeakMemory() as peak:
                start = time.perf_counter()
                ranking = RANKINGS[criterion](self.dense, windows, 1, False)
                self.rankings[criterion] = (ranking, time.perf_counter() - start, peak, windows.shape[0])
        ranking, rank_seconds, peak, used = self.rankings[criterion]
        model = copy.deepcopy(self.dense)
        start = time.perf_counter()
        removed = choose_layers(ranking, count, contiguous=False)
        remove_decoder_layers(model, removed)
        seconds = rank_seconds + time.perf_counter() - start
        notes = [
            f"{criterion} ranking on {used} calibration windows, computed once and shared by the "
            f"{'/'.join(map(str, DEPTH_COUNTS))} rows; removed layers {removed}"
        ]
        self.measure(
            label,
            model,
            seconds,
            peak,
            {"stages": [("prune_depth", {"remove": count, "criterion": criterion})], "notes": notes},
        )


def _speed(row: dict, metric: str, spec: str) -> str:
    if metric in row:
        return fmt(row[metric], spec)
    return "= dense" if row.get("sparse_bitmask_bf16_bytes") else "—"


def print_table(results: dict, description: str) -> None:
    table = Table(title="slimlm pruning benchmark — SmolLM2-135M, WikiText-2 test @2048", caption=description)
    columns = (
        "row",
        "ppl",
        "KL",
        "top-1",
        "params (M)",
        "bf16 dense MiB",
        "bf16 sparse MiB",
        "decode tok/s",
        "prefill ms",
        "prune s",
        "peak extra MiB",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for label, row in results.items():
        sparse = row.get("sparse_2of4_bf16_bytes") or row.get("sparse_bitmask_bf16_bytes")
        table.add_row(
            label,
            fmt(row["perplexity"], ".2f"),
            fmt(row.get("kl_divergence"), ".4f"),
            fmt(row.get("top1_agreement"), ".3f"),
            fmt(row["params_nonzero"] / 1e6, ".1f"),
            mib(row["dense_bf16_bytes"]),
            mib(sparse),
            _speed(row, "decode_tokens_per_s", ".1f"),
            _speed(row, "prefill_ms", ".0f"),
            fmt(row.get("seconds", row.get("prune_seconds")), ".0f"),
            mib(row.get("peak_extra_rss_bytes")),
        )
    Console(width=220).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "pruning.json", calib_samples=4)
    parser.add_argument("--ppl-criterion-windows", type=int, default=2)
    args = parser.parse_args()
    if args.speed_rows == ".":
        # Unstructured and 2:4 rows keep the dense shapes and run the same dense kernels: their speed is the dense
        # row's by construction, so only the rows that change shapes are timed (the table says so).
        args.speed_rows = "^dense$|depth|width"

    bench = DepthBench(args)
    if bench.wanted("dense"):
        bench.measure("dense", bench.dense, None, None, {"stages": [], "notes": []})
    for label, stage, options in stage_rows():
        if bench.wanted(label):
            bench.run_stages(label, [(stage, options)])
    for label, criterion, count in ranked_depth_rows():
        if bench.wanted(label):
            bench.run_ranked_depth(label, criterion, count)
    print_table(bench.results, bench.description)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
