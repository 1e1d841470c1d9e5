"""Which prompt protocol lets a downstream task tell SmolLM2-135M-Instruct from a broken copy of it (issue 14).

Each task runs under several lm-eval protocols (plain text or the model's chat template, zero- or few-shot) on the
built-in model and on the same model 50 % magnitude-pruned (slimlm's prune stage), on the first N documents of each
task. A protocol separates the two when the original is not at chance and beats the broken model by more than two
standard errors of the difference. Prints the table and writes benchmarks/results/task_protocols.json (after every
row, so `--resume` keeps rows already measured). Runs on one thread by default: on a shared 2-core machine two
OpenMP threads that wait on each other made generation ~30x slower than one.

    python benchmarks/task_protocols.py [--triviaqa-limit N] [--task-limit N] [--only REGEX] [--resume]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from slimlm.calibration import Calibration
from slimlm.evaluate.machine import machine_info
from slimlm.evaluate.records import Record, at_chance
from slimlm.evaluate.tasks import DEFAULT_PROTOCOLS, TaskProtocol, run_tasks
from slimlm.models import load_model
from slimlm.registry import StageContext, get_stage
from slimlm.report import atomic_write

PLAIN = TaskProtocol()
# (task, label) -> protocol; TriviaQA and SST-2 in every setting issue 14 asks for, SST-2 also few-shot and with the
# "Review: ... Sentiment:" template (lm-eval's scores at chance in every setting), the other tasks as they run now.
SETTINGS: dict[tuple[str, str], TaskProtocol] = {
    ("triviaqa", "plain 0-shot"): PLAIN,
    ("triviaqa", "plain 5-shot"): TaskProtocol(num_fewshot=5),
    ("triviaqa", "chat 0-shot"): TaskProtocol(chat_template=True),
    ("triviaqa", "chat 5-shot multiturn"): TaskProtocol(chat_template=True, num_fewshot=5, fewshot_as_multiturn=True),
    ("sst2", "plain 0-shot"): PLAIN,
    ("sst2", "chat 0-shot"): TaskProtocol(chat_template=True),
    ("sst2", "plain 5-shot"): TaskProtocol(num_fewshot=5),
    ("sst2", "chat 5-shot multiturn"): TaskProtocol(chat_template=True, num_fewshot=5, fewshot_as_multiturn=True),
    ("sst2", "review 0-shot"): TaskProtocol(prompt="review"),
    ("sst2", "review 5-shot"): TaskProtocol(prompt="review", num_fewshot=5),
    ("sst2", "review chat 0-shot"): TaskProtocol(prompt="review", chat_template=True),
    **{(task, "plain 0-shot"): PLAIN for task in ("piqa", "arc_easy", "boolq", "hellaswag")},
}
BROKEN = {"method": "magnitude", "sparsity": 0.5}
SEPARATION_STDERRS = 2.0


def broken_copy(model):
    """The model 50 % magnitude-pruned by slimlm's prune stage (magnitude needs no calibration data)."""
    spec = get_stage("prune")
    options = spec.options_model(BROKEN).model_validate(BROKEN)
    return spec.apply(copy.deepcopy(model), options, StageContext(None, Calibration(None), None))


def measure(models: dict, tokenizer, task: str, protocol: TaskProtocol, limit: int) -> dict:
    row = {"protocol": asdict(protocol), "limit": limit, "load_avg_before": _load_average()}
    for label, model in models.items():
        started = time.perf_counter()
        records = run_tasks(model, tokenizer, [task], limit=limit, protocols={task: protocol})
        row[label] = [record.to_dict() for record in records]
        print(f"{task} {asdict(protocol)} {label}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return row


def separation(original: Record, broken: Record) -> dict:
    """Margin of the original over the broken model, in standard errors of the difference (None where lm-eval gave
    no stderr: SST-2's macro-F1 aggregation has none)."""
    errors = [record.protocol.get("stderr") for record in (original, broken)]
    stderr = math.hypot(*errors) if None not in errors else None
    margin = original.value - broken.value
    z = None if stderr is None else margin / stderr if stderr else math.copysign(math.inf, margin) if margin else 0.0
    separates = z is not None and z > SEPARATION_STDERRS and not at_chance(original)
    return {"margin": margin, "z": z, "original_at_chance": at_chance(original), "separates": separates}


def table_rows(results: dict) -> list[dict]:
    rows = []
    order = [f"{task} | {label}" for task, label in SETTINGS]
    for key, row in sorted(results.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)):
        task, label = key.split(" | ")
        brokens = {record["metric"]: Record.from_dict(record) for record in row["broken"]}
        for record in map(Record.from_dict, row["original"]):
            broken = brokens[record.metric]
            rows.append(
                {
                    "task": task,
                    "setting": label,
                    "metric": record.metric,
                    "original": record.value,
                    "broken": broken.value,
                    "docs": record.protocol["docs"],
                    "default": TaskProtocol(**row["protocol"]) == DEFAULT_PROTOCOLS.get(task),
                    **separation(record, broken),
                }
            )
    return rows


def print_table(rows: list[dict], caption: str) -> None:
    table = Table(title="Task protocols: original SmolLM2-135M-Instruct vs 50 % magnitude-pruned", caption=caption)
    for column in ("task", "protocol", "metric", "docs", "original", "broken", "margin", "z", "verdict"):
        table.add_column(column, justify="right" if column in ("docs", "original", "broken", "margin", "z") else "left")
    for row in rows:
        verdict = (
            "separates"
            if row["separates"]
            else "original at chance"
            if row["original_at_chance"]
            else "no stderr"
            if row["z"] is None
            else "no"
        )
        table.add_row(
            row["task"],
            row["setting"] + (" (default)" if row["default"] else ""),
            row["metric"],
            str(row["docs"]),
            f"{row['original']:.3f}",
            f"{row['broken']:.3f}",
            f"{row['margin']:+.3f}",
            "n/a" if row["z"] is None else f"{row['z']:.1f}",
            verdict,
        )
    Console(width=160).print(table)


def _load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triviaqa-limit", type=int, default=200, help="TriviaQA questions per run")
    parser.add_argument("--task-limit", type=int, default=200, help="documents per run of every other task")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--only", help="regex on row labels 'task | protocol'")
    parser.add_argument("--resume", action="store_true", help="keep rows already in --out and skip them")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "task_protocols.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m")
    models = {"original": loaded.model, "broken": broken_copy(loaded.model)}
    results = json.loads(args.out.read_text())["rows"] if args.resume and args.out.exists() else {}
    for (task, label), protocol in SETTINGS.items():
        key = f"{task} | {label}"
        if key in results or (args.only and not re.search(args.only, key)):
            continue
        limit = args.triviaqa_limit if task == "triviaqa" else args.task_limit
        results[key] = measure(models, loaded.tokenizer, task, protocol, limit)
        write(args, loaded.source.description, results)
    write(args, loaded.source.description, results)  # the defaults and verdicts as the code now has them
    print_table(table_rows(results), f"{loaded.source.description} — threads={args.threads}")
    print(f"wrote {args.out}", file=sys.stderr)


def write(args, description: str, results: dict) -> None:
    payload = {
        "model": "smollm2-135m",
        "description": description,
        "broken": f"prune stage {BROKEN}",
        "code_path": "lm-eval HFLM on the dense float32 PyTorch model (CPU)",
        "threads": args.threads,
        "machine": machine_info(),
        "defaults": {task: asdict(protocol) for task, protocol in DEFAULT_PROTOCOLS.items()},
        "separation": table_rows(results),
        "rows": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(payload, indent=2).encode())


if __name__ == "__main__":
    main()
