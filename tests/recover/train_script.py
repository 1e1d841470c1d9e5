"""Distil a tiny random student toward a tiny teacher with the recover trainer, in its own process.

Used by the resume test (killed with SIGKILL, then resumed) and the distributed test (``accelerate launch``, 2
processes). Writes ``rank{N}.json`` (the losses this process saw) and, on rank 0, the final model to ``--out/model``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest's tiny models

from conftest import build_tiny_llama
from slimlm.recover.objectives import DistillObjective, LossWeights
from slimlm.recover.teacher import Teachers, frozen
from slimlm.recover.trainer import TrainConfig, train

VOCAB = 64


def windows(count: int = 24, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, seq_len), generator=torch.Generator().manual_seed(0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after each step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--on-policy", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # bit-for-bit reproducible reductions between runs
    out = Path(args.out)
    teacher = build_tiny_llama(VOCAB, seed=0, layers=2)
    student = build_tiny_llama(VOCAB, seed=1, layers=1)
    objective = DistillObjective(
        Teachers([teacher], [1.0]), LossWeights(kl=1.0, lm=0.1), temperature=2.0, on_policy=args.on_policy, seed=0
    )
    config = TrainConfig(
        steps=args.steps,
        batch_size=2,
        grad_accum=args.grad_accum,
        lr=3e-3,
        warmup=2,
        checkpoint_every=args.checkpoint_every,
        seed=0,
        description="distill",
    )
    seen = []

    def on_step(step: int, record: dict) -> None:
        seen.append({"step": step, "loss": record["loss"]})
        time.sleep(args.sleep)

    with frozen([teacher]):
        result = train(student, windows(), objective, config, out / "train", on_step=on_step)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {"rank": rank, "world": world, "steps": result.steps, "resumed_from": result.resumed_from, "seen": seen}
        )
    )
    if rank == 0:
        result.model.save_pretrained(out / "model")


if __name__ == "__main__":
    main()
