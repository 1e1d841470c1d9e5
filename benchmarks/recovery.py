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
so the benchmark can be stopped and continued by a later session. A run stopped part-way resumes too: its training
checkpoints every `--checkpoint-every` steps into `--work-dir`/<row>__seed<k>/ (the trainer restores weights,
optimizer, schedule, RNG and data position, so the resumed run sees the batches an uninterrupted one would), and
the trained model is saved there before evaluation; the folder is removed once the result is written.

`--table` (recovery_table.py) aggregates whatever exists (mean ± sample standard deviation over seeds, n per row),
prints the table and writes results/recovery.json.

    python benchmarks/recovery.py --rows no-recovery,lm-finetune,kd-logits --seeds 0,1,2
    python benchmarks/recovery.py --table
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS
from recovery_rows import INTERMEDIATE, PRUNE, REFERENCE_ROWS, RUNS, budget, row_specs, run_path, training_steps
from recovery_table import table
from slimlm.calibration import Calibration
from slimlm.data import calibration_windows, load_text
from slimlm.evaluate.machine import machine_info
from slimlm.evaluate.perplexity import ReferenceLogits, perplexity_records
from slimlm.evaluate.tasks import run_tasks
from slimlm.models import load_model, save_model
from slimlm.modules import decoder_layers
from slimlm.paths import cache_dir
from slimlm.recipe import CalibrationConfig
from slimlm.recover.metrics import read_metrics
from slimlm.recover.teacher_text import HELD_APART
from slimlm.registry import StageContext, get_stage
from slimlm.report import atomic_write


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
        self._student = None
        self._intermediate = None

    def context(self, folder: Path) -> StageContext:
        calibration = Calibration(self.calibration, self.tokenizer, windows=self.calib_windows)
        return StageContext(self.tokenizer, calibration, folder, load_original=lambda: self.teacher)

    def _pruned(self, stage: tuple[str, dict]):
        spec = get_stage(stage[0])
        with tempfile.TemporaryDirectory() as folder:
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
        """The 26-layer assistant teacher, saved once in the work folder (distill loads a teacher from a folder; a
        fixed path keeps a resumed kd-teacher-gap run's options, hence its checkpoint folder, the same)."""
        if self._intermediate is None:
            self._intermediate = self.args.work_dir / "intermediate-26"
            if not (self._intermediate / "config.json").is_file():  # pruning is deterministic: an earlier save is it
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
            "checkpoint_every": self.args.checkpoint_every,
            "seed": seed,
        }

    def run_folder(self, key: str, seed: int) -> Path:
        """Checkpoints of the run's training, then its trained model until the result is written (main removes it)."""
        return self.args.work_dir / f"{key}__seed{seed}"

    def train(self, key: str, stage: str, options: dict, seed: int) -> tuple[torch.nn.Module, dict]:
        """Train the row, resuming from the newest checkpoint an earlier (stopped) process left in the run folder; a
        model an earlier process trained but did not get to evaluate is loaded instead of trained again."""
        options = {**self.training_options(seed), **options}
        if "teacher" in options:
            options["teacher"] = [self.intermediate_folder() if t == "INTERMEDIATE" else t for t in options["teacher"]]
        folder = self.run_folder(key, seed)
        trained, saved_info = folder / "trained", folder / "train_info.json"
        if trained.is_dir() and saved_info.is_file():
            info = json.loads(saved_info.read_text())
            if info["options"] == json.loads(json.dumps(options)):
                print(f"{key} seed {seed}: trained by an earlier process, evaluating {trained}", file=sys.stderr)
                return load_model(str(trained)).model.requires_grad_(False), info
            print(f"{key} seed {seed}: {trained} was trained with other options; training again", file=sys.stderr)
            shutil.rmtree(trained)
        spec = get_stage(stage)
        context = self.context(folder / "stage")
        student = copy.deepcopy(self.student())  # pruned before the clock starts: the wall is the training's own
        torch.manual_seed(seed)  # LoRA's adapter init draws from the global generator before training seeds it
        with torch.enable_grad():
            wall, cpu = time.perf_counter(), time.process_time()
            model = spec.apply(student, spec.options_model(options).model_validate(options), context)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        records = [r for path in sorted((folder / "stage").glob("*/metrics.jsonl")) for r in read_metrics(path)]
        model.eval().requires_grad_(False)
        earlier = earlier_segments_s(records)
        steps = len(records)
        info = {
            "stage": stage,
            "options": options,
            "notes": context.notes,
            "train_steps": steps,
            "train_tokens": steps * options["batch_size"] * options["seq_len"],
            # a resumed run: this process's wall + the kept steps' time of the processes before it (their set-up and
            # the steps after their last checkpoint are not counted); their CPU time is unknown
            "train_wall_s": wall + sum(earlier),
            "train_cpu_s": None if earlier else cpu,
            "resumed_segments_s": earlier,
            "train_tokens_per_s": records[-1]["tokens_per_s"] if records else None,
            "train_loss_first": records[0]["loss"] if records else None,
            "train_loss_last": records[-1]["loss"] if records else None,
            "train_log": [{k: r[k] for k in r if k != "time"} for r in records[:: max(1, steps // 50)]],
        }
        save_model(model, self.tokenizer, trained)  # an evaluation cut short does not cost the training
        atomic_write(saved_info, json.dumps(info, indent=2, default=str).encode())
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
            model, info = self.train(key, stage, options, seed)
        result = {"row": key, "label": label, "seed": seed, **info, **self.evaluate(model)}
        result.update(
            load_average_before=load_before,
            load_average_after=os.getloadavg(),
            threads=torch.get_num_threads(),
            machine=machine_info(),
            budget=budget(self.args),
        )
        return result


def earlier_segments_s(records: list[dict]) -> list[float]:
    """The step time of each process that trained before the current one: a resumed run's metrics restart their
    `elapsed_s` clock, so each drop of it ends an earlier process's segment."""
    ends = [a["elapsed_s"] for a, b in itertools.pairwise(records) if b["elapsed_s"] < a["elapsed_s"]]
    return [round(e, 1) for e in ends]


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
    parser.add_argument("--markdown", action="store_true", help="--table: print the table as markdown")
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
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=cache_dir() / "recovery-runs",
        help="checkpoints and trained models of unfinished runs (a stopped run resumes from them)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=5, help="optimizer steps between checkpoints")
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
            shutil.rmtree(runner.run_folder(key, seed), ignore_errors=True)
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
