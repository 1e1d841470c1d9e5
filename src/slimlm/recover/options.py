"""Options the recovery stages share (the training loop's settings) and the folder a stage trains in.

Every bound is checked when the recipe is parsed, with messages like ``stages[1].distill.temperature: must be > 0``;
what depends on the model (layer maps, group sizes, vocabularies) is checked when the stage starts.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from slimlm.recover.trainer import TrainConfig
from slimlm.registry import StageOptions

PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def positive(value, what: str = "must be > 0"):
    if value is not None and value <= 0:
        raise ValueError(what)
    return value


def at_least_one(value):
    if value is not None and value < 1:
        raise ValueError("must be at least 1")
    return value


def non_negative(value):
    if value is not None and value < 0:
        raise ValueError("must be >= 0")
    return value


def fraction(value):
    if not 0 <= value <= 1:
        raise ValueError("must be in [0, 1]")
    return value


class TrainingOptions(StageOptions):
    steps: int = 200  # optimizer steps
    batch_size: int = 4  # windows per micro-batch (per process)
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 1e-5
    warmup: int = 0  # optimizer steps of linear warm-up before the cosine decay
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # null: no clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    data: str = "c4"  # a named set (c4, wikitext2, wikitext2-valid) or a .txt/.jsonl/.parquet file
    checkpoint_every: int = 50  # optimizer steps between checkpoints; 0: none
    seed: int = 0
    resume: bool = True  # continue from this stage's newest checkpoint when one exists
    keep_sparsity: bool = True  # pruned (exactly zero) weights stay zero

    @field_validator("steps", "batch_size", "grad_accum")
    @classmethod
    def _counts(cls, value: int) -> int:
        return at_least_one(value)

    @field_validator("warmup", "weight_decay", "checkpoint_every")
    @classmethod
    def _non_negative(cls, value):
        return non_negative(value)

    @field_validator("lr", "max_grad_norm")
    @classmethod
    def _positive(cls, value):
        return positive(value)

    @field_validator("seq_len")
    @classmethod
    def _window(cls, value: int) -> int:
        if value < 8:
            raise ValueError("must be at least 8 tokens")
        return value

    def train_config(self, description: str) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                           warmup=self.warmup, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                           precision=self.precision, gradient_checkpointing=self.gradient_checkpointing,
                           checkpoint_every=self.checkpoint_every, seed=self.seed, resume=self.resume,
                           description=description)


class QatOptions(BaseModel):
    """Quantization-aware training onto the quantize stage's grid (slimlm.quantize.grid)."""

    model_config = ConfigDict(extra="forbid")
    bits: int = 4
    group_size: int | None = 64
    sym: bool = True
    targets: list[str] | None = None  # q_proj ... down_proj; null: all

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if not 2 <= value <= 8:
            raise ValueError("must be in 2..8")
        return value

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int | None) -> int | None:
        return at_least_one(value)

    @field_validator("targets")
    @classmethod
    def _targets(cls, value):
        return known_projections(value)


def known_projections(names: list[str] | None) -> list[str] | None:
    unknown = [name for name in names or [] if name not in PROJECTION_NAMES]
    if unknown:
        raise ValueError(f"unknown module {', '.join(repr(n) for n in unknown)}; known: {', '.join(PROJECTION_NAMES)}")
    if names is not None and not names:
        raise ValueError(f"name at least one module; known: {', '.join(PROJECTION_NAMES)}")
    return names


def weights_checksum(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the starting weights (per-tensor sums), so checkpoints of another student are ignored."""
    sums = torch.stack([p.detach().float().sum() for p in model.parameters()]).double()
    return hashlib.sha256(sums.cpu().numpy().tobytes()).hexdigest()[:16]


def stage_folder(context, name: str, options: StageOptions, student: torch.nn.Module) -> Path:
    """The stage's training folder: the same options on the same starting student find their checkpoints again
    (a pipeline --resume after a crash); anything else gets a folder of its own."""
    # Shapes and weight sums, not the config: a student reloaded from the previous stage's folder (pipeline
    # --resume) carries a config that serialises differently but must find the same folder.
    shapes = [[name, list(p.shape)] for name, p in student.named_parameters()]
    payload = json.dumps({"options": options.model_dump(mode="json"), "weights": weights_checksum(student),
                          "shapes": shapes}, sort_keys=True)
    key = hashlib.sha256(payload.encode()).hexdigest()[:12]
    root = Path(context.output_dir) if getattr(context, "output_dir", None) else Path(tempfile.mkdtemp())
    return root / f"{name}-{key}"
