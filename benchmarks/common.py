"""What every stage benchmark shares: the built-in model, one set of calibration windows, the dense reference on
the evaluation windows, a stage runner (fresh copy of the dense model, timed, peak memory), the measurements, and
results written to JSON after every row so `--resume` can skip rows already measured."""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from slimlm.calibration import Calibration
from slimlm.data import calibration_windows, load_text
from slimlm.evaluate.footprint import PeakMemory, footprint_records
from slimlm.evaluate.machine import machine_info
from slimlm.evaluate.perplexity import ReferenceLogits, perplexity_records
from slimlm.evaluate.speed import measure_speed
from slimlm.models import load_model, save_model
from slimlm.recipe import CalibrationConfig
from slimlm.registry import StageContext, get_stage
from slimlm.report import atomic_write

RESULTS = Path(__file__).parent / "results"


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str, calib_samples: int = 16) -> None:
    parser.add_argument(
        "--calib-samples",
        type=int,
        default=calib_samples,
        help=f"calibration windows of c4 (papers: 128; default {calib_samples} to fit 2 CPU cores)",
    )
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=8, help="WikiText-2 test windows of 2048 (all: 148)")
    parser.add_argument("--speed-runs", type=int, default=3, help="0 skips the speed columns")
    parser.add_argument("--speed-rows", default=".", help="regex: rows whose speed is measured (default all)")
    parser.add_argument("--only", help="regex on row labels")
    parser.add_argument("--resume", action="store_true", help="keep rows already in --out and skip them")
    parser.add_argument("--out", type=Path, default=RESULTS / default_out)


class StageBench:
    """Runs rows of stages on copies of the built-in model and measures each the same way."""

    def __init__(self, args):
        self.args = args
        loaded = load_model("smollm2-135m")
        self.dense, self.tokenizer, self.description = loaded.model, loaded.tokenizer, loaded.source.description
        self.calibration = CalibrationConfig(data="c4", samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0)
        self.windows = calibration_windows(self.tokenizer, load_text("c4"), args.calib_samples, args.calib_seq_len, 0)
        self.wikitext = load_text("wikitext2")
        self.reference = ReferenceLogits(self.dense, keep=True)
        self.results = json.loads(args.out.read_text())["rows"] if args.resume and args.out.exists() else {}

    def wanted(self, label: str) -> bool:
        if label in self.results:
            print(f"skip {label}: already in {self.args.out}", file=sys.stderr)
            return False
        return self.args.only is None or re.search(self.args.only, label) is not None

    def context(self, output_dir: Path) -> StageContext:
        calibration = Calibration(self.calibration, self.tokenizer, windows=self.windows)
        return StageContext(self.tokenizer, calibration, output_dir, load_original=lambda: self.dense)

    def run_stages(self, label: str, stages: list[tuple[str, dict]], save: bool = False, speed_kernel=None) -> None:
        """Apply the stages in order to a copy of the dense model; with `save`, size on disk comes from the saved
        folder (so packed formats count what they write)."""
        model = copy.deepcopy(self.dense)
        notes: list[str] = []
        with tempfile.TemporaryDirectory() as scratch:
            context = self.context(Path(scratch))
            with PeakMemory() as peak:
                start, cpu_start = time.perf_counter(), time.process_time()
                for name, options in stages:
                    spec = get_stage(name)
                    model = spec.apply(model, spec.options_model(options).model_validate(options), context)
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            notes += context.notes
            folder = None
            if save:
                folder = Path(scratch) / "model"
                save_model(model, self.tokenizer, folder)
            extra = {"stages": stages, "notes": notes, "cpu_seconds": cpu_seconds}
            self.measure(label, model, seconds, peak, extra, folder, speed_kernel)

    def measure(
        self,
        label: str,
        model,
        seconds: float | None,
        peak: PeakMemory | None,
        extra: dict,
        model_path: Path | None = None,
        speed_kernel=None,
    ) -> None:
        records = perplexity_records(
            model, self.tokenizer, self.wikitext, "wikitext2", 2048, self.args.eval_windows, reference=self.reference
        )
        records += footprint_records(model, model_path)
        if self.args.speed_runs and re.search(self.args.speed_rows, label):
            kernel = speed_kernel(model) if speed_kernel else "dense"
            records += measure_speed(model, self.tokenizer, runs=self.args.speed_runs, kernel=kernel)
        row = {r.metric: r.value for r in records}
        row.update(
            seconds=seconds,
            load_average=os.getloadavg()[0],
            peak_rss_bytes=None if peak is None else peak.peak_bytes,
            peak_extra_rss_bytes=None if peak is None else peak.peak_bytes - peak.start_bytes,
            protocols={r.metric: r.protocol for r in records},
            **extra,
        )
        self.results[label] = row
        self.save()
        print(
            f"{label}: ppl {row['perplexity']:.2f}  KL {row.get('kl_divergence', 0):.4f}  "
            f"{0 if seconds is None else seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    def save(self) -> None:
        args = self.args
        payload = {
            "model": "smollm2-135m",
            "description": self.description,
            "machine": machine_info(),
            "calibration": {"data": "c4", "samples": args.calib_samples, "seq_len": args.calib_seq_len, "seed": 0},
            "evaluation": {"data": "wikitext2 test", "seq_len": 2048, "windows": args.eval_windows},
            "rows": self.results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, json.dumps(payload, indent=2, default=str).encode())


def mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


if __name__ == "__main__":
    sys.exit("a library for the benchmark scripts; run pruning.py or quantization.py")
