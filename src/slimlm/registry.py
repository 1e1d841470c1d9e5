"""The stage registry: a compression method plugs in by decorating its entry point; the pipeline never changes.

A stage is a function ``apply(model, options, context) -> model`` plus a pydantic options model. Families register
their stages when their package is imported; `get_stage` imports every family first, so the registry is complete.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

# Each family package imports its stage modules in its __init__; listing a family here is all the pipeline needs.
FAMILIES = ("slimlm.prune", "slimlm.quantize", "slimlm.lowrank", "slimlm.recover")


class MethodRegistry(dict):
    """name -> function(model, options, context) of one stage's methods: ``@METHODS.register("wanda")`` adds one,
    ``METHODS.check(name)`` is the options validator (one line naming the known methods)."""

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def decorate(fn: Callable) -> Callable:
            self[name] = fn
            return fn

        return decorate

    def check(self, name: str) -> str:
        if name not in self:
            raise ValueError(f"unknown method '{name}'; known: {', '.join(sorted(self))}")
        return name


class StageOptions(BaseModel):
    """Base of every stage's options: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class StageSpec:
    name: str
    options: type[StageOptions]
    apply: Callable[..., Any]
    summary: str


_STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, options: type[StageOptions]):
    """Decorator: ``@register_stage("prune", PruneOptions)`` on ``def prune(model, options, context)``."""

    def decorate(apply: Callable[..., Any]) -> Callable[..., Any]:
        if name in _STAGES and _STAGES[name].apply is not apply:
            raise ValueError(f"stage '{name}' is registered twice")
        summary = (apply.__doc__ or "").strip().splitlines()[0] if apply.__doc__ else ""
        _STAGES[name] = StageSpec(name, options, apply, summary)
        return apply

    return decorate


def _load_families() -> None:
    for family in FAMILIES:
        importlib.import_module(family)


def stage_names() -> list[str]:
    _load_families()
    return sorted(_STAGES)


def get_stage(name: str) -> StageSpec | None:
    _load_families()
    return _STAGES.get(name)


@dataclass
class StageContext:
    """What the pipeline hands every stage besides the model and its options."""

    tokenizer: Any
    calibration: Any  # recipe.CalibrationConfig: data, samples, seq_len, seed
    output_dir: Any  # pathlib.Path of this stage's scratch space
    load_original: Callable[[], Any] | None = None  # the uncompressed model, for teachers and references
    notes: list[str] = field(default_factory=list)  # what the report must say about this stage (reset per stage)
    _windows: Any = None

    def calibration_windows(self, model) -> Any:
        """The recipe's calibration windows (token ids, [samples, seq_len]); computed once per run."""
        if self._windows is None:
            from slimlm import data

            cfg = self.calibration
            if cfg.data == "self":
                self._windows = data.sample_from_model(model, cfg.samples, cfg.seq_len, cfg.seed)
            else:
                source = data.load_text(cfg.data)
                self._windows = data.calibration_windows(self.tokenizer, source, cfg.samples, cfg.seq_len, cfg.seed)
        return self._windows
