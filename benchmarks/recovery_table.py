"""The recovery benchmark's table: every finished (row, seed) run aggregated into mean ± sample standard deviation
over seeds, the share of the pruning's log-perplexity gap each row closes, and pairwise differences set against the
seed spread and the tasks' document-sampling error. Called by `recovery.py --table`."""

from __future__ import annotations

import json
import math
import statistics
import sys

from rich.console import Console
from rich.table import Table

from recovery_rows import ADAPTIVE_ROWS, PRUNE, REFERENCE_ROWS, row_specs
from slimlm.evaluate.machine import machine_info
from slimlm.evaluate.tasks import DEFAULT_PROTOCOLS
from slimlm.recover.teacher_text import HELD_APART
from slimlm.report import atomic_write

COLUMNS = (
    ("perplexity", "ppl", ".2f"),
    ("kl_divergence", "KL", ".3f"),
    ("top1_agreement", "top-1", ".3f"),
    ("sst2:acc", "SST-2 acc", ".3f"),
    ("triviaqa:exact_match", "TriviaQA EM", ".3f"),
)


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values), "values": values}


def aggregate(runs: list[dict]) -> dict:
    rows: dict[str, dict] = {}
    for run in sorted(runs, key=lambda r: (r["row"], r["seed"])):
        rows.setdefault(run["row"], {"label": run["label"], "runs": []})["runs"].append(run)
    for row in rows.values():
        runs_ = row.pop("runs")
        row["seeds"] = [r["seed"] for r in runs_]
        row["train_tokens"] = runs_[0].get("train_tokens")
        row["metrics"] = {m: _stats([r["metrics"].get(m) for r in runs_]) for m, _, _ in COLUMNS}
        row["train_wall_s"] = _stats([r.get("train_wall_s") for r in runs_])
        row["train_cpu_s"] = _stats([r.get("train_cpu_s") for r in runs_])
        row["eval_cpu_s"] = _stats([r.get("eval_cpu_s") for r in runs_])
        row["load_average"] = [r["load_average_before"][0] for r in runs_]
        row["eval_stderr"] = {m: _mean_stderr(runs_, m) for m, _, _ in COLUMNS}
    _loss_recovered(rows)
    return rows


def _mean_stderr(runs: list[dict], metric: str) -> float | None:
    """lm-eval's standard error of a task metric (sampling of the evaluated documents), mean over the runs."""
    task, _, name = metric.partition(":")
    found = [
        r["protocol"]["stderr"]
        for run in runs
        for r in run.get("records", [])
        if r["task"] == task and r["metric"] == name and "stderr" in r["protocol"]
    ]
    return statistics.fmean(found) if found else None


def _loss_recovered(rows: dict) -> None:
    """Share of the WikiText-2 loss gap (log ppl) between the pruned student and the teacher that a row closes."""
    try:
        student = math.log(rows["no-recovery"]["metrics"]["perplexity"]["mean"])
        teacher = math.log(rows["teacher"]["metrics"]["perplexity"]["mean"])
    except (KeyError, TypeError):
        return
    for row in rows.values():
        values = row["metrics"]["perplexity"].get("values", [])
        row["loss_recovered"] = _stats([(student - math.log(v)) / (student - teacher) for v in values])


def compare(rows: dict, a: str, b: str, metric: str) -> dict | None:
    """Difference of means b − a and whether it exceeds twice its standard error from the seed spread."""
    if a not in rows or b not in rows:
        return None
    x, y = rows[a]["metrics"][metric], rows[b]["metrics"][metric]
    if not x["n"] or not y["n"]:
        return None
    se = math.sqrt(x["sd"] ** 2 / x["n"] + y["sd"] ** 2 / y["n"])
    # a trained row at one seed has an unknown spread, not none (the reference rows are deterministic)
    spread_known = all(rows[k]["metrics"][metric]["n"] > 1 or k in REFERENCE_ROWS for k in (a, b))
    diff = y["mean"] - x["mean"]
    errors = [rows[a]["eval_stderr"].get(metric), rows[b]["eval_stderr"].get(metric)]
    eval_se = math.hypot(*errors) if None not in errors else None
    return {
        "a": a,
        "b": b,
        "metric": metric,
        "diff": diff,
        "seed_se": se,
        "exceeds_2_seed_se": abs(diff) > 2 * se if spread_known else None,  # None: a row at one seed
        "eval_se": eval_se,  # the tasks' document-sampling error, unpaired (conservative: the rows share documents)
        "exceeds_2_eval_se": None if eval_se is None else abs(diff) > 2 * eval_se,
    }


def _cell(stats: dict, spec: str) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    spread = f" ± {format(stats['sd'], spec)}" if stats["n"] > 1 else ""
    return f"{format(stats['mean'], spec)}{spread}"


def table(args) -> None:
    runs = [json.loads(path.read_text()) for path in sorted(args.runs_dir.glob("*__seed*.json"))]
    rows = aggregate(runs)
    order = list(row_specs(args))
    rows = dict(sorted(rows.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
    adaptive = {k: rows[k] for k in ADAPTIVE_ROWS if k in rows and rows[k]["metrics"]["perplexity"]["n"]}
    best_adaptive = min(adaptive, key=lambda k: adaptive[k]["metrics"]["perplexity"]["mean"]) if adaptive else None
    comparisons = [
        compare(rows, a, b, metric)
        for a, b in [("lm-finetune", "kd-logits"), ("no-recovery", "kd-logits"), ("no-recovery", "lm-finetune")]
        + [("kd-logits", k) for k in ("kd-hidden", "on-policy", "black-box", "lora", *ADAPTIVE_ROWS)]
        + [("kd-logits", "task-sst2"), ("kd-logits", "task-triviaqa")]
        for metric in ("perplexity", "kl_divergence", "sst2:acc", "triviaqa:exact_match")
    ]
    comparisons = [c for c in comparisons if c is not None]
    title = "Recovery of SmolLM2-135M depth-pruned 30 → 22 layers, trained on C4 (mean ± sd over seeds)"
    header = ("row", "n", "train tokens", *(c[1] for c in COLUMNS), "loss recovered", "train cpu s", "eval cpu s")
    cells = [
        (
            row["label"] + (" [best adaptive]" if key == best_adaptive else ""),
            str(row["metrics"]["perplexity"]["n"]),
            f"{row['train_tokens']:,}" if row["train_tokens"] else "0",
            *(_cell(row["metrics"][m], spec) for m, _, spec in COLUMNS),
            _cell(row.get("loss_recovered"), ".2f"),
            _cell(row["train_cpu_s"], ".0f"),
            _cell(row["eval_cpu_s"], ".0f"),
        )
        for key, row in rows.items()
    ]
    console = Console(width=200)
    if args.markdown:
        print("\n".join("| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *cells]))
    else:
        out = Table(title=title)
        for column in header:
            out.add_column(column, overflow="fold")
        for line in cells:
            out.add_row(*line)
        console.print(out)
    for c in comparisons:
        seeds = {True: "beyond 2 SE", False: "within 2 SE", None: "spread unknown (one seed)"}[c["exceeds_2_seed_se"]]
        line = f"{c['b']} − {c['a']} on {c['metric']}: {c['diff']:+.4f}; seeds: SE {c['seed_se']:.4f}, {seeds}"
        if c["eval_se"] is not None:
            line += f"; documents: SE {c['eval_se']:.4f}, {'beyond' if c['exceeds_2_eval_se'] else 'within'} 2 SE"
        console.print(line)
    payload = {
        "model": "smollm2-135m",
        "student": {"prune": PRUNE, "layers": 22},
        "train_data": "c4 (the shared 1,000-document sample); task rows: held-apart task slices",
        "held_apart": {task: f"rows {start}.. of the task file" for task, start in HELD_APART.items()},
        "protocols": {task: str(DEFAULT_PROTOCOLS[task]) for task in ("sst2", "triviaqa")},
        "budget": runs[0]["budget"] if runs else None,
        "best_adaptive": best_adaptive,
        "machine": machine_info(),
        "rows": rows,
        "comparisons": comparisons,
    }
    atomic_write(args.out, json.dumps(payload, indent=2, default=str).encode())
    print(f"wrote {args.out} from {len(runs)} runs", file=sys.stderr)
