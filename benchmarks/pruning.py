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

    python benchmarks/pruning.py [--calib-samples 16] [--eval-windows 8] [--only REGEX] [--resume]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from slimlm.data import calibration_windows, load_text
from slimlm.evaluate.footprint import PeakMemory, footprint_records
from slimlm.evaluate.machine import machine_info
from slimlm.evaluate.perplexity import ReferenceLogits, perplexity_records
from slimlm.evaluate.speed import measure_speed
from slimlm.models import load_model
from slimlm.prune.depth import RANKINGS, choose_layers
from slimlm.recipe import CalibrationConfig
from slimlm.registry import StageContext, get_stage
from slimlm.report import atomic_write
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
    return [(f"depth -{n} {short}", criterion, n)
            for criterion, short in (("block_influence", "BI"), ("perplexity", "ppl")) for n in DEPTH_COUNTS]


class Bench:
    def __init__(self, args):
        self.args = args
        loaded = load_model("smollm2-135m")
        self.dense, self.tokenizer, self.description = loaded.model, loaded.tokenizer, loaded.source.description
        self.calibration = CalibrationConfig(data="c4", samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0)
        self.windows = calibration_windows(self.tokenizer, load_text("c4"), args.calib_samples, args.calib_seq_len, 0)
        self.wikitext = load_text("wikitext2")
        self.reference = ReferenceLogits(self.dense, keep=True)
        self.results = _load_results(args.out) if args.resume else {}
        self.rankings: dict[str, tuple] = {}

    def wanted(self, label: str) -> bool:
        if label in self.results:
            print(f"skip {label}: already in {self.args.out}", file=sys.stderr)
            return False
        return self.args.only is None or re.search(self.args.only, label) is not None

    def context(self, output_dir: Path) -> StageContext:
        return StageContext(self.tokenizer, self.calibration, output_dir, load_original=lambda: self.dense,
                            _windows=self.windows)

    def run_stage(self, label: str, stage: str, options: dict) -> None:
        spec = get_stage(stage)
        model = copy.deepcopy(self.dense)
        with tempfile.TemporaryDirectory() as scratch:
            context = self.context(Path(scratch))
            with PeakMemory() as peak:
                start = time.perf_counter()
                model = spec.apply(model, spec.options(**options), context)
                seconds = time.perf_counter() - start
        self.measure(label, model, seconds, peak, {"stage": stage, "options": options, "notes": context.notes})

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
        notes = [f"{criterion} ranking on {used} calibration windows, computed once and shared by the "
                 f"{'/'.join(map(str, DEPTH_COUNTS))} rows; removed layers {removed}"]
        self.measure(label, model, seconds, peak, {"stage": "prune_depth", "options": {"remove": count,
                                                   "criterion": criterion}, "notes": notes})

    def measure(self, label: str, model, prune_seconds: float | None, peak: PeakMemory | None, extra: dict) -> None:
        records = perplexity_records(model, self.tokenizer, self.wikitext, "wikitext2", 2048, self.args.eval_windows,
                                     reference=self.reference)
        records += footprint_records(model)
        if self.args.speed_runs:
            records += measure_speed(model, self.tokenizer, runs=self.args.speed_runs)
        row = {r.metric: r.value for r in records}
        row.update(
            prune_seconds=prune_seconds,
            peak_rss_bytes=None if peak is None else peak.peak_bytes,
            peak_extra_rss_bytes=None if peak is None else peak.peak_bytes - peak.start_bytes,
            protocols={r.metric: r.protocol for r in records},
            **extra,
        )
        self.results[label] = row
        self.save()
        print(f"{label}: ppl {row['perplexity']:.2f}  KL {row.get('kl_divergence', 0):.4f}  "
              f"prune {0 if prune_seconds is None else prune_seconds:.0f} s", file=sys.stderr, flush=True)

    def save(self) -> None:
        payload = {
            "model": "smollm2-135m",
            "description": self.description,
            "machine": machine_info(),
            "calibration": {"data": "c4", "samples": self.args.calib_samples, "seq_len": self.args.calib_seq_len,
                            "seed": 0},
            "evaluation": {"data": "wikitext2 test", "seq_len": 2048, "windows": self.args.eval_windows},
            "rows": self.results,
        }
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.args.out, json.dumps(payload, indent=2, default=str).encode())


def _load_results(path: Path) -> dict:
    return json.loads(path.read_text())["rows"] if path.exists() else {}


def _mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(results: dict, description: str) -> None:
    table = Table(title="slimlm pruning benchmark — SmolLM2-135M, WikiText-2 test @2048", caption=description)
    columns = ("row", "ppl", "KL", "top-1", "params (M)", "bf16 dense MiB", "bf16 sparse MiB", "decode tok/s",
               "prefill ms", "prune s", "peak extra MiB")
    for column in columns:
        table.add_column(column, overflow="fold")
    for label, row in results.items():
        sparse = row.get("sparse_2of4_bf16_bytes") or row.get("sparse_bitmask_bf16_bytes")
        table.add_row(
            label, _fmt(row["perplexity"], ".2f"), _fmt(row.get("kl_divergence"), ".4f"),
            _fmt(row.get("top1_agreement"), ".3f"), _fmt(row["params_nonzero"] / 1e6, ".1f"),
            _mib(row["dense_bf16_bytes"]), _mib(sparse), _fmt(row.get("decode_tokens_per_s"), ".1f"),
            _fmt(row.get("prefill_ms"), ".0f"), _fmt(row.get("prune_seconds"), ".0f"),
            _mib(row.get("peak_extra_rss_bytes")),
        )
    Console(width=220).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows of c4 (paper: 128)")
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=8, help="WikiText-2 test windows (None: all 148)")
    parser.add_argument("--ppl-criterion-windows", type=int, default=4)
    parser.add_argument("--speed-runs", type=int, default=3, help="0 skips the speed columns")
    parser.add_argument("--only", help="regex on row labels")
    parser.add_argument("--resume", action="store_true", help="keep rows already in --out and skip them")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pruning.json")
    args = parser.parse_args()

    bench = Bench(args)
    if bench.wanted("dense"):
        bench.measure("dense", bench.dense, None, None, {"stage": None, "options": {}, "notes": []})
    for label, stage, options in stage_rows():
        if bench.wanted(label):
            bench.run_stage(label, stage, options)
    for label, criterion, count in ranked_depth_rows():
        if bench.wanted(label):
            bench.run_ranked_depth(label, criterion, count)
    print_table(bench.results, bench.description)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
