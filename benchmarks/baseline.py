"""Baseline figures of the built-in SmolLM2-135M (the dequantized Q4_1 original): quality, speed, memory.

Prints a table and writes JSON (default: benchmarks/results/baseline.json). Full protocol: WikiText-2 test perplexity
over the whole split at seq_len 2048 and 512, KL of the model against itself (must be 0), TriviaQA on 500 questions,
the multiple-choice sets and SST-2 (`--task-limit` documents each; None = all), prefill and decode speed, peak RSS.

    python benchmarks/baseline.py [--ppl-limit N] [--task-limit N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimlm.data import load_text
from slimlm.evaluate.footprint import PeakMemory, footprint_records, peak_memory_record
from slimlm.evaluate.machine import machine_info
from slimlm.evaluate.perplexity import perplexity_records
from slimlm.evaluate.speed import measure_speed
from slimlm.evaluate.tasks import run_tasks
from slimlm.models import load_model

MULTIPLE_CHOICE = ["piqa", "arc_easy", "boolq", "hellaswag", "sst2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppl-limit", type=int, default=None, help="perplexity windows (default: whole split)")
    parser.add_argument("--task-limit", type=int, default=500, help="documents per downstream task")
    parser.add_argument("--triviaqa-limit", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "baseline.json")
    args = parser.parse_args()

    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    wikitext = load_text("wikitext2")
    rows, timings = [], {}

    def timed(name, fn):
        start = time.perf_counter()
        records = fn()
        timings[name] = time.perf_counter() - start
        rows.extend(records)

    with PeakMemory() as peak:
        timed("ppl_2048", lambda: perplexity_records(model, tok, wikitext, "wikitext2", 2048, args.ppl_limit))
        timed(
            "ppl_512",
            lambda: [
                _renamed(r, "wikitext2@512")
                for r in perplexity_records(
                    model, tok, wikitext, "wikitext2", 512, args.ppl_limit and args.ppl_limit * 4
                )
            ],
        )
        timed(
            "kl_self",
            lambda: [
                _renamed(r, "wikitext2-self-kl")
                for r in perplexity_records(model, tok, wikitext, "wikitext2", 2048, 2, reference=model)
                if r.metric in ("kl_divergence", "top1_agreement")
            ],
        )
        timed("triviaqa", lambda: run_tasks(model, tok, ["triviaqa"], limit=args.triviaqa_limit))
        timed("multiple_choice", lambda: run_tasks(model, tok, MULTIPLE_CHOICE, limit=args.task_limit))
        timed("speed", lambda: measure_speed(model, tok))
    rows += [*footprint_records(model, loaded.source.weights_path), peak_memory_record(peak, "benchmark")]

    _print_table(rows, loaded.source.description)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": "smollm2-135m",
        "description": loaded.source.description,
        "machine": machine_info(),
        "seconds": timings,
        "records": [r.to_dict() for r in rows],
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


def _renamed(record, task):
    record.task = task
    return record


def _print_table(rows, description) -> None:
    table = Table(title="slimlm baseline — built-in SmolLM2-135M", caption=description)
    for column in ("task", "metric", "value", "unit", "protocol"):
        table.add_column(column, overflow="fold")
    for r in rows:
        value = "n/a" if r.value is None else f"{r.value:.5g}"
        table.add_row(r.task, r.metric, value, r.unit, r.protocol_line() + (f" — {r.note}" if r.note else ""))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
