"""Recovery benchmark on the built-in SmolLM2-135M: a depth-pruned student retrained with the same token budget.

Teacher: the built-in SmolLM2-135M (30 layers, dequantized Q4_1 original). Student: the teacher depth-pruned to 22
layers (`prune_depth {remove: 8, criterion: block_influence}`, ranked on the seeded c4 calibration windows), pruned
once and deep-copied for every row, so every row starts from exactly the same weights.

Rows (each a registered stage on a copy of the student; the time and peak memory are the recovery stage's only):
- teacher: the dense 30-layer model, for reference (KL 0 by definition);
- no recovery: the pruned student itself;
- LM fine-tune: `distill` with loss {lm: 1} and every teacher term 0 (all weights train, next-token loss);
- LoRA: `lora` rank 8 / α 16 on every projection, loss lm, merged into the weights;
- KD logits: `distill` with loss {kl: 1} (forward KL to the teacher at temperature `--temperature`);
- KD logits + hidden: `distill` with loss {kl: 1, hidden: `--hidden-weight`}, hidden-state MSE between each kept
  layer and the teacher layer it was (the layer map comes from `config.slimlm_kept_layers`, set by prune_depth);
- KD on-policy λ=0.5: `distill` with loss {kl: 1}, on_policy 0.5 (half of the micro-batches are the window's first
  quarter continued by the student's own samples, scored by the teacher; GKD).

Token budget: every trained row runs steps = `--train-tokens` // (batch_size × seq_len × grad_accum) optimizer
steps, so every row sees the same number of training tokens (on-policy rows included: the student still processes
seq_len tokens per window, three quarters of them its own samples). The table prints the tokens each run saw (from
the stage's metrics.jsonl) and its training throughput. Training text: the c4 sample (1,000 documents) and WikiText-2
*validation* (split into articles at its top-level ` = Title = ` headings) written together into one .jsonl file
that the stages' `data` option reads (the option takes one source), packed into seq_len windows in a seeded order.
Learning rates: `--lr` for the full-weight rows (LM fine-tune, KD), `--lora-lr` for the adapters; `--warmup` steps
of linear warm-up (default a tenth of the steps), then cosine decay. No checkpoints are written (checkpoint_every 0).

Evaluation: WikiText-2 *test*, seq_len 2048, the first `--eval-windows` windows: perplexity, KL / top-1 agreement
against the teacher on the same windows; closed-book TriviaQA exact match (and F1) on the first `--triviaqa-limit`
questions of the shared 3,000-question validation subset (0 skips it), zero-shot, greedy, through lm-eval.

Results go to JSON after every row (atomically), so `--resume` skips rows already measured.

    python benchmarks/recovery.py [--train-tokens N] [--triviaqa-limit 500] [--seq-len 512] [--batch-size 4]
                                  [--lr 1e-4] [--eval-windows 8] [--only REGEX] [--resume]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common import StageBench, add_common_arguments, fmt, mib
from slimlm.data import load_text
from slimlm.evaluate.footprint import PeakMemory
from slimlm.modules import decoder_layers
from slimlm.recover.metrics import read_metrics
from slimlm.registry import get_stage

PRUNE = ("prune_depth", {"remove": 8, "criterion": "block_influence"})
TRAIN_SOURCES = ("c4", "wikitext2-valid")
TEACHER_ROW = "teacher (dense, 30 layers)"
STUDENT_ROW = "no recovery (22 layers)"
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \s*$")


def rows(args) -> list[tuple[str, str, dict]]:
    """(label, recovery stage, options without the shared training settings) for every trained row."""
    kd = {"loss": {"kl": 1.0}, "temperature": args.temperature}
    return [
        ("LM fine-tune", "distill", {"loss": {"kl": 0.0, "lm": 1.0}, "lr": args.lr}),
        ("LoRA r8 (lm)", "lora", {"rank": 8, "alpha": 16.0, "loss": "lm", "lr": args.lora_lr}),
        ("KD logits", "distill", {**kd, "lr": args.lr}),
        (
            "KD logits + hidden",
            "distill",
            {
                **kd,
                "loss": {"kl": 1.0, "hidden": args.hidden_weight},
                "hidden_metric": args.hidden_metric,
                "lr": args.lr,
            },
        ),
        ("KD on-policy λ=0.5", "distill", {**kd, "on_policy": 0.5, "lr": args.lr}),
    ]


def training_steps(args) -> int:
    per_step = args.batch_size * args.seq_len * args.grad_accum
    return max(1, args.train_tokens // per_step)


def _wikitext_articles(rows_: list[str]) -> list[str]:
    """WikiText rows grouped into articles at their top-level headings, each joined as evaluation joins rows."""
    articles: list[list[str]] = []
    for row in rows_:
        if _WIKITEXT_TITLE.match(row) or not articles:
            articles.append([])
        articles[-1].append(row)
    return ["\n\n".join(article) for article in articles if any(r.strip() for r in article)]


def write_training_text(folder: Path) -> tuple[Path, dict]:
    """c4 + WikiText-2 validation as one .jsonl (the stages' `data` option takes a single source)."""
    documents, described = [], []
    for name in TRAIN_SOURCES:
        source = load_text(name)
        docs = _wikitext_articles(source.documents) if name.startswith("wikitext") else source.documents
        docs = [doc for doc in docs if doc.strip()]
        documents += docs
        described.append({"source": name, "file": source.path, "sha256": source.sha256, "documents": len(docs)})
    path = folder / "train_c4_wikitext2-valid.jsonl"
    payload = "".join(json.dumps({"text": doc}) + "\n" for doc in documents).encode()
    path.write_bytes(payload)
    return path, {"sources": described, "sha256": hashlib.sha256(payload).hexdigest()[:16]}


class RecoveryBench(StageBench):
    """Prunes the student once, runs each recovery stage on a copy of it, and adds TriviaQA to the measurements."""

    def __init__(self, args):
        super().__init__(args)
        self._student = None
        self._scratch = Path(tempfile.mkdtemp(prefix="slimlm-recovery-"))
        self.train_path, self.train_data = write_training_text(self._scratch)

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)

    def student(self):
        """The depth-pruned student (pruned on first use, then cached) and what pruning it cost."""
        if self._student is None:
            model = copy.deepcopy(self.dense)
            with tempfile.TemporaryDirectory(dir=self._scratch) as scratch:
                context = self.context(Path(scratch))
                spec = get_stage(PRUNE[0])
                with PeakMemory() as peak:
                    start = time.perf_counter()
                    model = spec.apply(model, spec.options_model(PRUNE[1]).model_validate(PRUNE[1]), context)
                    seconds = time.perf_counter() - start
            model.eval()
            self._student = (model, seconds, peak, list(context.notes))
            print(
                f"student: {len(decoder_layers(model))} layers, kept {model.config.slimlm_kept_layers} "
                f"({seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        return self._student

    def training_options(self) -> dict:
        args = self.args
        steps = training_steps(args)
        warmup = steps // 10 if args.warmup is None else args.warmup
        return {
            "steps": steps,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "seq_len": args.seq_len,
            "warmup": min(warmup, steps - 1),
            "data": str(self.train_path),
            "checkpoint_every": 0,
            "seed": 0,
        }

    def run_student(self) -> None:
        model, seconds, peak, notes = self.student()
        self.measure(
            STUDENT_ROW,
            model,
            None,
            None,
            {
                "stages": [PRUNE],
                "notes": notes,
                "prune_seconds": seconds,
                "prune_peak_rss_bytes": peak.peak_bytes,
                "train_tokens": 0,
            },
        )

    def run_recovery(self, label: str, stage: str, options: dict) -> None:
        student, prune_seconds, _, prune_notes = self.student()
        model = copy.deepcopy(student)
        options = {**self.training_options(), **options}
        spec = get_stage(stage)
        with tempfile.TemporaryDirectory(dir=self._scratch) as scratch:
            context = self.context(Path(scratch))
            with torch.enable_grad(), PeakMemory() as peak:  # main() turns gradients off for evaluation
                start = time.perf_counter()
                model = spec.apply(model, spec.options_model(options).model_validate(options), context)
                seconds = time.perf_counter() - start
            records = [r for path in sorted(Path(scratch).glob("*/metrics.jsonl")) for r in read_metrics(path)]
        model.eval()
        model.requires_grad_(False)
        per_step = options["batch_size"] * options["seq_len"] * options["grad_accum"]
        steps = len(records) or options["steps"]
        last = records[-1] if records else {}
        first = records[0] if records else {}
        recorded = {**options, "data": "+".join(TRAIN_SOURCES)}  # the .jsonl lives in a temporary folder
        self.measure(
            label,
            model,
            seconds,
            peak,
            {
                "stages": [PRUNE, (stage, recorded)],
                "notes": prune_notes + [note.replace(str(self.train_path), recorded["data"]) for note in context.notes],
                "prune_seconds": prune_seconds,
                "train_steps": steps,
                "train_tokens": steps * per_step,
                "train_tokens_per_s": last.get("tokens_per_s"),
                "train_loss_first": first.get("loss"),
                "train_loss_last": last.get("loss"),
                "train_log": records,
                "train_data": self.train_data,
            },
        )

    def measure(self, label, model, seconds, peak, extra, model_path=None, speed_kernel=None) -> None:
        if self.args.triviaqa_limit:
            from slimlm.evaluate.tasks import run_tasks

            records = run_tasks(model, self.tokenizer, ["triviaqa"], limit=self.args.triviaqa_limit)
            found = {r.metric: r for r in records if r.task == "triviaqa"}
            extra = {
                **extra,
                "triviaqa_exact_match": found["exact_match"].value,
                "triviaqa_f1": found["f1"].value if "f1" in found else None,
                "triviaqa_protocol": found["exact_match"].protocol,
            }
        super().measure(label, model, seconds, peak, extra, model_path, speed_kernel)


def print_table(results: dict, description: str) -> None:
    table = Table(
        title="slimlm recovery benchmark — SmolLM2-135M 30 → 22 layers (block influence), WikiText-2 test @2048",
        caption=description,
    )
    columns = (
        "row",
        "ppl",
        "KL",
        "top-1",
        "TriviaQA EM",
        "train tokens",
        "train tok/s",
        "loss first → last",
        "wall s",
        "peak MiB",
        "peak extra MiB",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for label, row in results.items():
        first, last = row.get("train_loss_first"), row.get("train_loss_last")
        losses = "—" if first is None else f"{first:.3f} → {last:.3f}"
        table.add_row(
            label,
            fmt(row["perplexity"], ".2f"),
            fmt(row.get("kl_divergence"), ".4f"),
            fmt(row.get("top1_agreement"), ".3f"),
            fmt(row.get("triviaqa_exact_match"), ".3f"),
            fmt(row.get("train_tokens"), ","),
            fmt(row.get("train_tokens_per_s"), ".0f"),
            losses,
            fmt(row.get("seconds"), ".0f"),
            mib(row.get("peak_rss_bytes")),
            mib(row.get("peak_extra_rss_bytes")),
        )
    Console(width=220).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "recovery.json")
    parser.add_argument(
        "--train-tokens",
        type=int,
        default=32_768,
        help="training tokens per run (steps = this // (batch × seq_len × grad_accum))",
    )
    parser.add_argument("--triviaqa-limit", type=int, default=500, help="TriviaQA questions; 0 skips TriviaQA")
    parser.add_argument("--seq-len", type=int, default=512, help="training window length")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of the full-weight rows")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: a tenth of the steps)")
    parser.add_argument("--temperature", type=float, default=1.0, help="KD temperature")
    parser.add_argument("--hidden-weight", type=float, default=0.01, help="weight of the hidden-state loss")
    parser.add_argument("--hidden-metric", choices=("mse", "cosine"), default="mse")
    args = parser.parse_args()
    if args.train_tokens < 1 or args.triviaqa_limit < 0:
        parser.error("--train-tokens must be >= 1 and --triviaqa-limit >= 0")
    if args.speed_rows == ".":
        # Every recovered row keeps the student's shapes (LoRA is merged): its speed is the student's.
        args.speed_rows = f"^{re.escape(TEACHER_ROW)}$|^{re.escape(STUDENT_ROW)}$"

    bench = RecoveryBench(args)
    steps = training_steps(args)
    print(
        f"budget: {steps} steps × {args.batch_size}×{args.grad_accum} windows of {args.seq_len} tokens = "
        f"{steps * args.batch_size * args.grad_accum * args.seq_len:,} tokens per run "
        f"(asked {args.train_tokens:,})",
        file=sys.stderr,
        flush=True,
    )
    try:
        if bench.wanted(TEACHER_ROW):
            bench.measure(TEACHER_ROW, bench.dense, None, None, {"stages": [], "notes": [], "train_tokens": 0})
        if bench.wanted(STUDENT_ROW):
            bench.run_student()
        for label, stage, options in rows(args):
            if bench.wanted(label):
                bench.run_recovery(label, stage, options)
    finally:
        bench.close()
    print_table(bench.results, bench.description)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
