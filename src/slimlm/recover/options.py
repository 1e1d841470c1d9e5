"""Options the recovery stages share (the training loop's settings) and the folder a stage trains in.

Every bound is checked when the recipe is parsed, with messages like
``stages[1].distill.temperature: Input should be greater than 0``;
what depends on the model (layer maps, group sizes, vocabularies) is checked when the stage starts.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from slimlm.modules import ProjectionName
from slimlm.recover.trainer import TrainConfig
from slimlm.registry import StageOptions


class TrainingOptions(StageOptions):
    steps: PositiveInt = 200  # optimizer steps
    batch_size: PositiveInt = 4  # windows per micro-batch (per process)
    grad_accum: PositiveInt = 1
    seq_len: int = Field(512, ge=8)
    lr: PositiveFloat = 1e-5
    warmup: NonNegativeInt = 0  # optimizer steps of linear warm-up before the cosine decay
    weight_decay: NonNegativeFloat = 0.0
    max_grad_norm: PositiveFloat | None = 1.0  # null: no clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    data: str = "c4"  # a named set (c4, wikitext2, wikitext2-valid) or a .txt/.jsonl/.parquet file
    checkpoint_every: NonNegativeInt = 50  # optimizer steps between checkpoints; 0: none
    seed: int = 0
    resume: bool = True  # continue from this stage's newest checkpoint when one exists
    keep_sparsity: bool = True  # pruned (exactly zero) weights stay zero

    def train_config(self, description: str) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            lr=self.lr,
            warmup=self.warmup,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            precision=self.precision,
            gradient_checkpointing=self.gradient_checkpointing,
            checkpoint_every=self.checkpoint_every,
            seed=self.seed,
            resume=self.resume,
            description=description,
        )


class QatOptions(BaseModel):
    """Quantization-aware training onto the quantize stage's grid (slimlm.quantize.grid)."""

    model_config = ConfigDict(extra="forbid")
    bits: int = Field(4, ge=2, le=8)
    group_size: PositiveInt | None = 64
    sym: bool = True
    targets: list[ProjectionName] | None = Field(None, min_length=1)  # q_proj ... down_proj; null: all


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
    payload = json.dumps(
        {"options": options.model_dump(mode="json"), "weights": weights_checksum(student), "shapes": shapes},
        sort_keys=True,
    )
    key = hashlib.sha256(payload.encode()).hexdigest()[:12]
    root = Path(context.output_dir) if getattr(context, "output_dir", None) else Path(tempfile.mkdtemp())
    return root / f"{name}-{key}"
