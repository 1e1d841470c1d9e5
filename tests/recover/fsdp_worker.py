"""One process of the 2-process runs in test_fsdp.py, started by ``accelerate launch``.

``train``: distil a tiny random student (one pruned Linear) toward a frozen tiny teacher with the recover trainer,
under whichever backend the launch config sets up (DDP or FSDP2); writes ``rank{N}.json`` (per-step losses, how
student and teacher were held) and, on rank 0, the gathered student with slimlm's save_model plus the logits of the
trained (still prepared, sharded under FSDP2) student on a probe batch.

``compress``: ``slimlm compress RECIPE`` with an audit hook recording every file-system write this rank makes under
``--watch``; the list goes to ``--audit/writes-rank{N}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest's tiny models

from conftest import build_tiny_llama, build_tokenizer, random_windows
from slimlm.models import save_model
from slimlm.recover.constraints import SparsityMasks
from slimlm.recover.objectives import DistillObjective, LossWeights
from slimlm.recover.teacher import Teachers, frozen
from slimlm.recover.trainer import TrainConfig, train

RANK = int(os.environ.get("RANK", "0"))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.link", "os.symlink"}
CONFIG = TrainConfig(steps=6, batch_size=2, grad_accum=2, lr=3e-3, warmup=1, checkpoint_every=3, seed=0)


def _teacher_state(teacher, before: list[torch.Tensor]) -> dict:
    from torch.distributed.tensor import DTensor

    parameters = list(teacher.parameters())
    return {
        "requires_grad": any(p.requires_grad for p in parameters),
        "has_grad": any(p.grad is not None for p in parameters),
        "sharded": any(isinstance(p, DTensor) for p in parameters),
        "unchanged": all(torch.equal(p, b) for p, b in zip(parameters, before)),
    }


def _student_state(student) -> dict:
    """How the prepared student holds its weights: FSDP2 shards each parameter by rows over the ranks."""
    from accelerate.state import AcceleratorState
    from torch.distributed.tensor import DTensor

    weight = student.model.layers[0].mlp.up_proj.weight
    local = weight.to_local() if isinstance(weight, DTensor) else weight
    state = AcceleratorState()
    return {
        "distributed_type": str(state.distributed_type),
        "fsdp2": bool(state.is_fsdp2),
        "class": type(student).__name__,
        "sharded": isinstance(weight, DTensor),
        "rows": [int(local.shape[0]), int(weight.shape[0])],
    }


def train_run(out: Path) -> None:
    tokenizer = build_tokenizer()
    teacher = build_tiny_llama(len(tokenizer), seed=0, layers=2)
    student = build_tiny_llama(len(tokenizer), seed=1, layers=2)
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight[:, ::2] = 0  # a pruned Linear: its zeros must survive training
    masks = SparsityMasks(student)
    before = [p.detach().clone() for p in teacher.parameters()]
    windows = random_windows(student, samples=32, seq_len=16)
    objective = DistillObjective(Teachers([teacher], [1.0]), LossWeights(kl=1.0, lm=0.1), temperature=2.0, seed=0)
    losses = []
    with frozen([teacher]):
        result = train(
            student,
            windows,
            objective,
            CONFIG,
            out / "train",
            after_step=masks.apply,
            on_step=lambda step, record: losses.append(record["loss"]),
        )
        teacher_state = _teacher_state(teacher, before)
    probe = windows[:2]
    with torch.no_grad():  # `student` is the prepared model itself (FSDP2 converts it in place): every rank runs it
        trained_logits = student.eval()(input_ids=probe).logits
        plain_logits = result.model(input_ids=probe).logits
    report = {
        "rank": RANK,
        "world": int(os.environ["WORLD_SIZE"]),
        "losses": losses,
        "student": _student_state(student),
        "teacher": teacher_state,
        "returned_class": type(result.model).__name__,
        "returned_vs_trained": (plain_logits - trained_logits).abs().max().item(),
    }
    (out / f"rank{RANK}.json").write_text(json.dumps(report))
    if RANK == 0:
        save_model(result.model, tokenizer, out / "model")
        torch.save({"probe": probe, "logits": trained_logits}, out / "logits.pt")


def _audit_writes(watch: Path, writes: list[str]):
    def hook(event: str, args: tuple) -> None:
        if event == "open":
            writing = isinstance(args[2], int) and args[2] & WRITE_FLAGS
        else:
            writing = event in WRITE_EVENTS
        if writing and isinstance(args[0], str | os.PathLike):
            path = os.path.abspath(os.fspath(args[0]))
            if path.startswith(f"{watch}{os.sep}"):
                writes.append(os.path.relpath(path, watch))

    return hook


def compress_run(recipe: Path, watch: Path, audit: Path) -> None:
    from slimlm.cli import main

    writes: list[str] = []
    sys.addaudithook(_audit_writes(watch.resolve(), writes))
    try:
        main(["compress", str(recipe)])
    finally:
        audit.mkdir(parents=True, exist_ok=True)
        (audit / f"writes-rank{RANK}.json").write_text(json.dumps(sorted(set(writes))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "compress"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--recipe", type=Path)
    parser.add_argument("--watch", type=Path)
    parser.add_argument("--audit", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # reproducible reductions, and two processes share two cores
    if args.mode == "train":
        train_run(args.out)
    else:
        compress_run(args.recipe, args.watch, args.audit)


if __name__ == "__main__":
    main()
