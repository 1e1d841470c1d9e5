"""Task scores of the `slimlm auto` benchmark's GGUF files (issue 15 §2: "also TriviaQA/task scores").

For each size budget of results/auto.json: the searched recipe (its best candidate), the best uniform mix that fits
the budget and llama.cpp's own type of that name (also with its importance matrix, where auto.py --imatrix ran),
plus the f32 export (the reference) and a broken reference (the f32 model with 50 % of every decoder Linear's
weights magnitude-pruned), so that a task which cannot tell the
original from a broken model is visible as such.

Each GGUF is loaded by slimlm (transformers' GGUF reader, gguf-py's dequantization: the exact weights llama.cpp
reads, in float32) and scored by slimlm's default task protocols: TriviaQA 5-shot greedy exact match and SST-2
(Review template, 0-shot) accuracy, on the first `--limit` / `--sst2-limit` documents. The same file is scored
once even when several budgets list it. Written after every file (results/auto_tasks.json), so a killed run
continues with `--resume`.

    python benchmarks/auto_tasks.py [--limit 200] [--sst2-limit 436] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common import RESULTS
from slimlm.evaluate.machine import machine_info
from slimlm.evaluate.tasks import DEFAULT_PROTOCOLS, run_tasks
from slimlm.models import load_model
from slimlm.report import atomic_write

SIZE_BUDGETS = ("Q4_K_M", "Q4_0", "Q2_K", "70MB")
BROKEN = "broken reference (f32, 50 % magnitude-pruned)"


def chosen_rows(budget: dict) -> list[dict]:
    """The best candidate (least KL), the best uniform mix within the budget, llama.cpp's type of the budget's name."""
    rows = budget["rows"]
    candidates = [r for r in rows if r["label"].startswith("candidate")]
    fitting = [r for r in rows if r["label"].startswith("uniform") and r["bytes"] <= budget["budget_bytes"]]
    chosen = [min(candidates, key=lambda r: r["kld"])]
    if fitting:
        chosen.append(min(fitting, key=lambda r: r["kld"]))
    chosen += [r for r in rows if r["label"] == f"llama.cpp {budget['name']}"]
    return chosen


def broken_model(model):
    from slimlm.modules import named_decoder_linears

    with torch.no_grad():
        for _, linear in named_decoder_linears(model):
            weight = linear.weight
            threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
            weight[weight.abs() <= threshold] = 0
    return model


def score(path: str, broken: bool, args) -> dict:
    loaded = load_model(path)
    model = broken_model(loaded.model) if broken else loaded.model
    started, cpu = time.perf_counter(), time.process_time()
    records = run_tasks(model, loaded.tokenizer, ["triviaqa"], limit=args.limit)
    records += run_tasks(model, loaded.tokenizer, ["sst2"], limit=args.sst2_limit)
    return {
        "metrics": {f"{r.task}:{r.metric}": r.value for r in records},
        "records": [r.to_dict() for r in records],
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
        "loadavg_1min": os.getloadavg()[0],
    }


def plan(auto: dict, f32: str) -> list[tuple[str, str, bool, list[str]]]:
    """(key, gguf path, broken, the rows it stands for) per distinct file."""
    files: dict[tuple[str, bool], list[str]] = {(f32, False): ["f32 export (reference)"], (f32, True): [BROKEN]}
    for name in SIZE_BUDGETS:
        budget = auto["budgets"].get(name)
        if budget is None:
            continue
        imatrix = [r for r in auto.get("imatrix_rows", []) if r["label"] == f"llama.cpp {name} + imatrix"]
        for row in chosen_rows({**budget, "name": name}) + [r for r in imatrix if r.get("path")]:
            files.setdefault((row["path"], False), []).append(f"{name}: {row['label']}")
    return [(f"{Path(p).name}{' broken' if b else ''}", p, b, labels) for (p, b), labels in files.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--auto", type=Path, default=RESULTS / "auto.json")
    parser.add_argument("--f32", default="/tmp/slimlm-auto-bench/shared/f32.gguf", help="the search's f32 GGUF")
    parser.add_argument("--limit", type=int, default=200, help="TriviaQA questions")
    parser.add_argument("--sst2-limit", type=int, default=436, help="SST-2 sentences")
    parser.add_argument("--out", type=Path, default=RESULTS / "auto_tasks.json")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    auto = json.loads(args.auto.read_text())
    done = json.loads(args.out.read_text())["files"] if args.resume and args.out.is_file() else {}
    result = {
        "machine": machine_info(),
        "protocols": {task: str(DEFAULT_PROTOCOLS[task]) for task in ("triviaqa", "sst2")},
        "limits": {"triviaqa": args.limit, "sst2": args.sst2_limit},
        "files": done,
    }
    for key, path, broken, labels in plan(auto, args.f32):
        if key not in done:
            result["files"][key] = {"path": path, "rows": labels, **score(path, broken, args)}
            atomic_write(args.out, json.dumps(result, indent=2).encode())
        print(key, result["files"][key]["metrics"], flush=True)
    table = Table(title=f"auto benchmark files: TriviaQA 5-shot EM (first {args.limit}), SST-2 acc")
    for column in ("rows", "TriviaQA EM", "SST-2 acc", "load"):
        table.add_column(column)
    for entry in result["files"].values():
        m = entry["metrics"]
        table.add_row(
            "; ".join(entry["rows"]),
            f"{m['triviaqa:exact_match']:.3f}",
            f"{m['sst2:acc']:.3f}",
            f"{entry['loadavg_1min']:.1f}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
