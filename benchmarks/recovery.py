"""Recovery benchmark (issue 14 §4): a depth-pruned SmolLM2-135M retrained by each recovery method at equal tokens,
three seeds per row, resumable per (row, seed).

Teacher: the built-in SmolLM2-135M (30 layers, the dequantized Q4_1 original). Student: the teacher depth-pruned to
22 layers (`prune_depth {remove: 8, criterion: block_influence}` ranked on 16 seeded c4 calibration windows of
2048), pruned once per process; every run starts from a deep copy of it.

Training text: the C4 sample only (WikiText-2 validation shares the test split's domain and would flatter every
perplexity measured on WikiText-2 test). Task-specific rows train on a held-apart slice of the task's own file
(slimlm.recover.teacher_text.HELD_APART), never the rows evaluated here, which is asserted at start.

Rows (keys for --rows; all at the same `--train-tokens`; `seed` sets the training order, on-policy samples and LoRA
init; teacher-generated text is drawn once with seed 0 and shared by the three seeds):
  teacher, no-recovery        reference rows (deterministic: one run each)
  lm-finetune                 distill, loss {lm: 1} (plain next-token fine-tuning, all weights)
  lora                        lora rank 8 / α 16 on every projection, loss lm, merged
  kd-logits                   distill, forward KL to the teacher (τ = 1)
  kd-hidden                   distill, KL + 0.01 · hidden-state MSE through the kept-layer map
  on-policy                   distill, KL, on_policy 0.5 (GKD)
  black-box                   distill, loss {lm: 1} on text the teacher generated from c4 prompts (no logits)
  kd-temp-schedule            distill, KL with τ 2 → 1 (cosine)            (adaptive)
  kd-loss-mix                 distill, forward KL → reverse KL (linear)     (adaptive)
  kd-teacher-gap              distill, teachers original + 26-layer prune of it, weighted by the student's gap
  task-sst2, task-triviaqa    distill, KL on the task's held-apart prompts (evaluation template) + the teacher's
                              answers (SST-2: its likelier choice; TriviaQA: greedy, cut where evaluation stops)

Evaluation of every run: WikiText-2 test perplexity on `--eval-windows` windows of 2048; KL and top-1 agreement
against the teacher on the first `--kl-windows` of them; SST-2 (Review template, 0-shot) on the first
`--sst2-limit` sentences and TriviaQA (5-shot, greedy) on the first `--triviaqa-limit` questions: the default
protocols of slimlm.evaluate.tasks.

Each finished run is written atomically to results/recovery/<row>__seed<k>.json; a run whose file exists is skipped,
so the benchmark can be stopped and continued by a later session. `--table` aggregates whatever exists (mean ±
sample standard deviation over seeds, n per row), prints the table and writes results/recovery.json.

    python benchmarks/recovery.py --rows no-recovery,lm-finetune,kd-logits --seeds 0,1,2
    python benchmarks/recovery.py --table
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common import RESULTS
from slimlm.calibration import Calibration
from slimlm.data import calibration_windows, load_text
from slimlm.evaluate.machine import machine_info
from slimlm.evaluate.perplexity import ReferenceLogits, perplexity_records
from slimlm.evaluate.tasks import DEFAULT_PROTOCOLS, run_tasks
from slimlm.models import load_model, save_model
from slimlm.modules import decoder_layers
from slimlm.recipe import CalibrationConfig
from slimlm.recover.metrics import read_metrics
from slimlm.recover.teacher_text import HELD_APART
from slimlm.registry import StageContext, get_stage
from slimlm.report import atomic_write

RUNS = RESULTS / "recovery"
PRUNE = ("prune_depth", {"remove": 8, "criterion": "block_influence"})
INTERMEDIATE = ("prune_depth", {"remove": 4, "criterion": "block_influence"})  # 26 layers: the assistant teacher
REFERENCE_ROWS = ("teacher", "no-recovery")
ADAPTIVE_ROWS = ("kd-temp-schedule", "kd-loss-mix", "kd-teacher-gap")


def row_specs(args) -> dict[str, tuple[str, str | None, dict]]:
    """key → (label, recovery stage, its options without the shared training settings)."""
    kd = {"loss": {"kl": 1.0}, "lr": args.lr}
    text = {"seed": 0, "batch_size": 16}  # task rows: one greedy answer per held-apart prompt
    return {
        "teacher": ("teacher (dense, 30 layers)", None, {}),
        "no-recovery": ("no recovery (22 layers)", None, {}),
        "lm-finetune": ("LM fine-tune", "distill", {"loss": {"kl": 0.0, "lm": 1.0}, "lr": args.lr}),
        "lora": ("LoRA r8 (lm)", "lora", {"rank": 8, "alpha": 16.0, "loss": "lm", "lr": args.lora_lr}),
        "kd-logits": ("KD logits", "distill", kd),
        "kd-hidden": ("KD logits + hidden", "distill", {**kd, "loss": {"kl": 1.0, "hidden": 0.01}}),
        "on-policy": ("KD on-policy λ=0.5", "distill", {**kd, "on_policy": 0.5}),
        "black-box": (
            "black-box (teacher text, lm)",
            "distill",
            {
                "loss": {"kl": 0.0, "lm": 1.0},
                "lr": args.lr,
                "teacher_text": {
                    **text,
                    "prompts": "c4",
                    "samples": args.text_samples,
                    "prompt_tokens": 32,
                    "max_new_tokens": 224,
                    "temperature": 1.0,
                    "top_p": 0.95,
                },
            },
        ),
        "kd-temp-schedule": (
            "KD τ 2→1 cosine",
            "distill",
            {**kd, "temperature": {"start": 2.0, "end": 1.0, "schedule": "cosine"}},
        ),
        "kd-loss-mix": (
            "KD forward→reverse KL",
            "distill",
            {**kd, "loss_mix": {"end": {"kl": 0.0, "reverse_kl": 1.0}, "schedule": "linear"}},
        ),
        "kd-teacher-gap": (
            "KD 2 teachers, gap-weighted",
            "distill",
            {**kd, "teacher": ["original", "INTERMEDIATE"], "teacher_weighting": "gap"},
        ),
        "task-sst2": (
            "task KD SST-2",
            "distill",
            {**kd, "teacher_text": {**text, "prompts": "sst2", "temperature": 0.0}},
        ),
        "task-triviaqa": (
            "task KD TriviaQA",
            "distill",
            {**kd, "teacher_text": {**text, "prompts": "triviaqa", "max_new_tokens": 16, "temperature": 0.0}},
        ),
    }


def training_steps(args) -> int:
    return max(1, args.train_tokens // (args.batch_size * args.seq_len))


class RecoveryRunner:
    """The teacher, the pruned student (built on first use), the evaluation, and one run per (row, seed)."""

    def __init__(self, args):
        self.args = args
        loaded = load_model("smollm2-135m")
        self.teacher, self.tokenizer = loaded.model, loaded.tokenizer
        self.calibration = CalibrationConfig(data="c4", samples=16, seq_len=2048, seed=0)
        self.calib_windows = calibration_windows(self.tokenizer, load_text("c4"), 16, 2048, 0)
        self.wikitext = load_text("wikitext2")
        self.reference = ReferenceLogits(self.teacher, keep=True)  # only the --kl-windows are ever scored with it
        self.scratch = Path(tempfile.mkdtemp(prefix="slimlm-recovery-"))
        self._student = None
        self._intermediate = None

    def context(self, folder: Path) -> StageContext:
        calibration = Calibration(self.calibration, self.tokenizer, windows=self.calib_windows)
        return StageContext(self.tokenizer, calibration, folder, load_original=lambda: self.teacher)

    def _pruned(self, stage: tuple[str, dict]):
        spec = get_stage(stage[0])
        with tempfile.TemporaryDirectory(dir=self.scratch) as folder:
            model = spec.apply(
                copy.deepcopy(self.teacher), spec.options_model(stage[1]).model_validate(stage[1]), self.context(folder)
            )
        return model.eval()

    def student(self):
        if self._student is None:
            self._student = self._pruned(PRUNE)
            kept = self._student.config.slimlm_kept_layers
            print(f"student: {len(decoder_layers(self._student))} layers, kept {kept}", file=sys.stderr, flush=True)
        return self._student

    def intermediate_folder(self) -> str:
        """The 26-layer assistant teacher, saved once per process (distill loads a teacher from a folder)."""
        if self._intermediate is None:
            self._intermediate = self.scratch / "intermediate-26"
            save_model(self._pruned(INTERMEDIATE), self.tokenizer, self._intermediate)
        return str(self._intermediate)

    def training_options(self, seed: int) -> dict:
        steps = training_steps(self.args)
        return {
            "steps": steps,
            "batch_size": self.args.batch_size,
            "seq_len": self.args.seq_len,
            "warmup": min(steps // 10, steps - 1),
            "data": "c4",
            "checkpoint_every": 0,
            "seed": seed,
        }

    def train(self, stage: str, options: dict, seed: int) -> tuple[torch.nn.Module, dict]:
        options = {**self.training_options(seed), **options}
        if "teacher" in options:
            options["teacher"] = [self.intermediate_folder() if t == "INTERMEDIATE" else t for t in options["teacher"]]
        spec = get_stage(stage)
        with tempfile.TemporaryDirectory(dir=self.scratch) as folder:
            context = self.context(Path(folder))
            torch.manual_seed(seed)  # LoRA's adapter init draws from the global generator before training seeds it
            with torch.enable_grad():
                wall, cpu = time.perf_counter(), time.process_time()
                model = spec.apply(
                    copy.deepcopy(self.student()), spec.options_model(options).model_validate(options), context
                )
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            records = [r for path in sorted(Path(folder).glob("*/metrics.jsonl")) for r in read_metrics(path)]
        model.eval().requires_grad_(False)
        steps = len(records)
        tokens = steps * options["batch_size"] * options["seq_len"]
        info = {
            "stage": stage,
            "options": options,
            "notes": context.notes,
            "train_steps": steps,
            "train_tokens": tokens,
            "train_wall_s": wall,
            "train_cpu_s": cpu,
            "train_tokens_per_s": records[-1]["tokens_per_s"] if records else None,
            "train_loss_first": records[0]["loss"] if records else None,
            "train_loss_last": records[-1]["loss"] if records else None,
            "train_log": [{k: r[k] for k in r if k != "time"} for r in records[:: max(1, steps // 50)]],
        }
        return model, info

    def evaluate(self, model) -> dict:
        args, started, cpu = self.args, time.perf_counter(), time.process_time()
        records = perplexity_records(model, self.tokenizer, self.wikitext, "wikitext2", 2048, args.eval_windows)
        kl_records = perplexity_records(
            model, self.tokenizer, self.wikitext, "wikitext2", 2048, args.kl_windows, reference=self.reference
        )
        records += [r for r in kl_records if r.metric in ("kl_divergence", "top1_agreement")]
        records += run_tasks(model, self.tokenizer, ["sst2"], limit=args.sst2_limit)
        records += run_tasks(model, self.tokenizer, ["triviaqa"], limit=args.triviaqa_limit)
        metrics = {f"{r.task}:{r.metric}" if r.task != "wikitext2" else r.metric: r.value for r in records}
        return {
            "metrics": metrics,
            "records": [r.to_dict() for r in records],
            "eval_wall_s": time.perf_counter() - started,
            "eval_cpu_s": time.process_time() - cpu,
        }

    def run(self, key: str, seed: int) -> dict:
        label, stage, options = row_specs(self.args)[key]
        load_before = os.getloadavg()
        if key == "teacher":
            model, info = self.teacher, {"train_tokens": 0}
        elif key == "no-recovery":
            model, info = self.student(), {"train_tokens": 0}
        else:
            model, info = self.train(stage, options, seed)
        result = {"row": key, "label": label, "seed": seed, **info, **self.evaluate(model)}
        result.update(
            load_average_before=load_before,
            load_average_after=os.getloadavg(),
            threads=torch.get_num_threads(),
            machine=machine_info(),
            budget=budget(self.args),
        )
        return result


def budget(args) -> dict:
    steps = training_steps(args)
    return {
        "train_tokens": steps * args.batch_size * args.seq_len,
        "steps": steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "lora_lr": args.lora_lr,
        "train_data": "c4",
        "eval_windows": args.eval_windows,
        "kl_windows": args.kl_windows,
        "sst2_limit": args.sst2_limit,
        "triviaqa_limit": args.triviaqa_limit,
    }


def run_path(folder: Path, key: str, seed: int) -> Path:
    return folder / f"{key}__seed{seed}.json"


# --- the table ------------------------------------------------------------------------------------------------

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
    diff = y["mean"] - x["mean"]
    errors = [rows[a]["eval_stderr"].get(metric), rows[b]["eval_stderr"].get(metric)]
    eval_se = math.hypot(*errors) if None not in errors else None
    return {
        "a": a,
        "b": b,
        "metric": metric,
        "diff": diff,
        "seed_se": se,
        "exceeds_2_seed_se": abs(diff) > 2 * se if se > 0 else None,  # None: no spread (a single run or identical)
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
        for metric in ("perplexity", "sst2:acc", "triviaqa:exact_match")
    ]
    comparisons = [c for c in comparisons if c is not None]
    title = "Recovery of SmolLM2-135M depth-pruned 30 → 22 layers, trained on C4 (mean ± sd over seeds)"
    out = Table(title=title)
    for column in ("row", "n", "train tokens", *(c[1] for c in COLUMNS), "loss recovered", "train cpu s", "eval cpu s"):
        out.add_column(column, overflow="fold")
    for key, row in rows.items():
        label = row["label"] + (" [best adaptive]" if key == best_adaptive else "")
        out.add_row(
            label,
            str(row["metrics"]["perplexity"]["n"]),
            f"{row['train_tokens']:,}" if row["train_tokens"] else "0",
            *(_cell(row["metrics"][m], spec) for m, _, spec in COLUMNS),
            _cell(row.get("loss_recovered"), ".2f"),
            _cell(row["train_cpu_s"], ".0f"),
            _cell(row["eval_cpu_s"], ".0f"),
        )
    console = Console(width=200)
    console.print(out)
    for c in comparisons:
        seeds = {True: "beyond 2 SE", False: "within 2 SE", None: "no spread"}[c["exceeds_2_seed_se"]]
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


def claim(path: Path) -> bool:
    """Take the (row, seed) whose result goes to `path` for this process, so that workers started side by side (one
    per core) never train the same run: a .claim file holding the pid, created exclusively; a claim whose process is
    gone is taken over."""
    marker = path.with_suffix(".claim")
    for _ in range(2):
        try:
            with open(marker, "x") as handle:
                handle.write(str(os.getpid()))
            return True
        except FileExistsError:
            try:
                pid = int(marker.read_text())
                if pid > 0:
                    os.kill(pid, 0)
                    return False  # its process is alive
                marker.unlink(missing_ok=True)
            except (ProcessLookupError, ValueError, FileNotFoundError):
                marker.unlink(missing_ok=True)  # a killed worker's: take it over
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help="comma-separated row keys, in the order to run (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--table", action="store_true", help="aggregate the finished runs and write recovery.json")
    parser.add_argument("--train-tokens", type=int, default=81_920, help="training tokens of every trained row")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of the full-weight rows")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument(
        "--text-samples", type=int, default=400, help="teacher-generated documents of the black-box row"
    )
    parser.add_argument("--eval-windows", type=int, default=40, help="WikiText-2 test windows of 2048 (ppl)")
    parser.add_argument("--kl-windows", type=int, default=4, help="of those, windows scored against the teacher")
    parser.add_argument("--sst2-limit", type=int, default=436)
    parser.add_argument("--triviaqa-limit", type=int, default=500)
    parser.add_argument("--runs-dir", type=Path, default=RUNS, help="where each (row, seed) JSON goes")
    parser.add_argument("--out", type=Path, default=RESULTS / "recovery.json", help="--table: the aggregate JSON")
    args = parser.parse_args()
    if args.table:
        table(args)
        return
    specs = row_specs(args)
    keys = args.rows.split(",") if args.rows else list(specs)
    unknown = [k for k in keys if k not in specs]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; known: {', '.join(specs)}")
    if args.sst2_limit > HELD_APART["sst2"] or args.triviaqa_limit > HELD_APART["triviaqa"]:
        parser.error(f"evaluated rows would overlap the held-apart training slices {HELD_APART}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    runner = RecoveryRunner(args)
    b = budget(args)
    print(f"budget: {b['steps']} steps × {args.batch_size} × {args.seq_len} = {b['train_tokens']:,} tokens per run")
    # seed-major: every row's first seed before any row's second, so a partial run still compares rows
    queue = [(seed, key) for seed in seeds for key in keys if seed == seeds[0] or key not in REFERENCE_ROWS]
    for seed, key in queue:
        path = run_path(args.runs_dir, key, seed)
        if path.exists():
            print(f"skip {key} seed {seed}: {path} exists", file=sys.stderr)
            continue
        if not claim(path):
            print(f"skip {key} seed {seed}: another worker runs it ({path.with_suffix('.claim')})", file=sys.stderr)
            continue
        print(f"run {key} seed {seed}", file=sys.stderr, flush=True)
        try:
            result = runner.run(key, seed)
            atomic_write(path, json.dumps(result, indent=2, default=str).encode())
        finally:
            path.with_suffix(".claim").unlink(missing_ok=True)
        m = result["metrics"]
        print(
            f"{key} seed {seed}: ppl {m['perplexity']:.2f} SST-2 {m.get('sst2:acc', 0):.3f} "
            f"TriviaQA {m.get('triviaqa:exact_match', 0):.3f}; train {result.get('train_wall_s', 0):.0f} s wall, "
            f"eval {result['eval_wall_s']:.0f} s wall",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
