"""Adaptive distillation: settings that change while the student trains (distill's `temperature` schedule,
`loss_mix` and `teacher_weighting`). Each defaults to the fixed setting, which it then reproduces exactly.

- Temperature schedule: τ moves from `start` to `end` over training (linear or cosine). A high τ early shows the
  student the teacher's whole distribution ("dark knowledge", Hinton et al. 2015); τ → 1 later fits the distribution
  the model is used with. Annealed temperatures are the survey's most common adaptive knob (e.g. Annealing-KD,
  Jafari et al. 2021).
- Loss-mix schedule: the loss weights move from `loss` to `loss_mix.end`, e.g. forward KL (mode-covering, stable
  while the student is far off) early to reverse KL or JSD (mode-seeking, MiniLLM / GKD) later.
- Teacher weighting by gap: with several teachers (the original and an intermediate checkpoint, a "teacher
  assistant" in TAKD's sense, Mirzadeh et al. 2020), each micro-batch weights teacher k by w_k · exp(−gap_k), where
  gap_k is the student's forward KL to teacher k on that batch: the student learns mostly from the teacher it can
  currently follow, and shifts to the original as its gap to it closes.

The position in training is the micro-batch's index over all micro-batches of the run, so a resumed run follows the
same schedule.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat

Schedule = Literal["linear", "cosine"]


class TemperatureSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: PositiveFloat
    end: PositiveFloat
    schedule: Schedule = "linear"


def format_errors(error) -> str:
    """A nested pydantic ValidationError as one line, ``start: Input should be greater than 0``."""
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc'])}: "
        + ("unknown option" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, "))
        for item in error.errors()
    )


def training_fraction(micro_batch: int, total_micro_batches: int) -> float:
    """0 at the first micro-batch, 1 at the last."""
    return min(1.0, micro_batch / max(1, total_micro_batches - 1))


def interpolate(start: float, end: float, fraction: float, schedule: str = "linear") -> float:
    """start at fraction 0, end at 1; cosine moves slowly at both ends (half a cosine period)."""
    if schedule == "cosine":
        fraction = (1 - math.cos(math.pi * fraction)) / 2
    return start + (end - start) * fraction


def temperature_at(temperature: float | TemperatureSchedule, fraction: float) -> float:
    if isinstance(temperature, TemperatureSchedule):
        return interpolate(temperature.start, temperature.end, fraction, temperature.schedule)
    return temperature


def mixed_weights(start: dict[str, float], end: dict[str, float] | None, fraction: float, schedule: str):
    """Each loss weight interpolated from `start` to `end` (all of start when end is None)."""
    if end is None:
        return dict(start)
    return {name: interpolate(start[name], end[name], fraction, schedule) for name in start}


def gap_weights(base: list[float], gaps: list[float]) -> list[float]:
    """Teacher weights ∝ base_k · exp(−gap_k), normalised (the smallest gap is subtracted first, for stability)."""
    low = min(gaps)
    raw = [w * math.exp(-(gap - low)) for w, gap in zip(base, gaps, strict=True)]
    total = sum(raw)
    return [r / total for r in raw]
