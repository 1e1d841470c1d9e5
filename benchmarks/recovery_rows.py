"""What the recovery benchmark (recovery.py) runs: its rows, the student's pruning, the training budget, and where
each (row, seed) result goes. Shared by the runner (recovery.py) and the table (recovery_table.py)."""

from __future__ import annotations

from pathlib import Path

from common import RESULTS

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
