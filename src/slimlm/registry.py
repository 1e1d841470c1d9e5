"""The stage registry: a compression method plugs in by decorating its entry point; the pipeline never changes.

A stage is a function ``apply(model, options, context) -> model`` plus a pydantic options model. Families register
their stages when their package is imported; `get_stage` imports every family first, so the registry is complete.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from slimlm.calibration import Calibration

# Each family package imports its stage modules in its __init__; listing a family here is all the pipeline needs.
FAMILIES = ("slimlm.prune", "slimlm.quantize", "slimlm.lowrank", "slimlm.recover")


class MethodRegistry(dict):
    """name -> function(model, options, context) of one stage's methods: ``@METHODS.register("wanda", WandaOptions)``
    adds one with its own options model (torchao's config per method; None: the stage's options model),
    ``METHODS.check(name)`` is the options validator (one line naming the known methods). ``streams=True`` says the
    method runs entirely inside the calibration walk, so it works on a layer-streamed model (streaming.py)."""

    def __init__(self):
        super().__init__()
        self.options: dict[str, type[StageOptions]] = {}
        self.streaming: set[str] = set()

    def register(
        self, name: str, options: type[StageOptions] | None = None, streams: bool = False
    ) -> Callable[[Callable], Callable]:
        def decorate(fn: Callable) -> Callable:
            self[name] = fn
            if options is not None:
                self.options[name] = options
            if streams:
                self.streaming.add(name)
            return fn

        return decorate

    def check(self, name: str) -> str:
        if name not in self:
            raise ValueError(f"unknown method '{name}'; known: {', '.join(sorted(self))}")
        return name


class StageOptions(BaseModel):
    """Base of every stage's options: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


# What the decoder's Linear projections can be, for the stage contracts: plain Linears, Linears whose weight sits on a
# quantization grid with the codes beside it (quantize with pack: false), Linears sharing one tensor across layers
# (share: tie_layers), and the module kinds of slimlm.storage (packed, w8a8, codebook, lowrank, eora).
DENSE, FAKE_QUANTIZED, TIED = "dense", "fake-quantized", "tied"
PACKED, W8A8, CODEBOOK, LOWRANK, EORA = "packed", "w8a8", "codebook", "lowrank", "eora"  # storage.py's kinds
# left by depth and width pruning: the model no longer has the original's layers and shapes, which only stages that
# match modules against the original (needs_original_layout) cannot work with
RESHAPED = "reshaped"
MODULE_KINDS = frozenset({DENSE, FAKE_QUANTIZED, TIED, PACKED, W8A8, CODEBOOK, LOWRANK, EORA})  # all but RESHAPED
Kinds = frozenset[str]
KindRule = Kinds | Callable[[StageOptions], Kinds]


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its options model (per method where `methods` has one), its entry point, and its contract:
    the kinds of projection it can work on (`accepts`) and the kinds it adds (`produces`), each a set or a function of
    the stage's options. Every stage accepts RESHAPED projections unless it `needs_original_layout`."""

    name: str
    options: type[StageOptions]
    apply: Callable[..., Any]
    summary: str
    methods: MethodRegistry | None = None
    accepts_rule: KindRule = frozenset({DENSE})
    produces_rule: KindRule = frozenset()
    original_layout_rule: bool | Callable[[StageOptions], bool] = False

    def options_model(self, raw: dict | None) -> type[StageOptions]:
        """The options model for these raw options: the chosen method's own, else the stage's."""
        if self.methods is None or not isinstance(raw, dict):
            return self.options
        method = raw.get("method", self.options.model_fields["method"].default)
        return self.methods.options.get(method, self.options) if isinstance(method, str) else self.options

    def accepts(self, options: StageOptions) -> Kinds:
        accepted = self.accepts_rule(options) if callable(self.accepts_rule) else self.accepts_rule
        return accepted if self.needs_original_layout(options) else accepted | {RESHAPED}

    def needs_original_layout(self, options: StageOptions) -> bool:
        rule = self.original_layout_rule
        return rule(options) if callable(rule) else rule

    def streams(self, options: StageOptions) -> bool:
        """Whether this stage, with these options, runs on a layer-streamed model (its method registered streams)."""
        return self.methods is not None and getattr(options, "method", None) in self.methods.streaming

    def produces(self, options: StageOptions) -> Kinds:
        return self.produces_rule(options) if callable(self.produces_rule) else self.produces_rule


_STAGES: dict[str, StageSpec] = {}


def register_stage(
    name: str,
    options: type[StageOptions],
    methods: MethodRegistry | None = None,
    accepts: KindRule = frozenset({DENSE}),
    produces: KindRule = frozenset(),
    needs_original_layout: bool | Callable[[StageOptions], bool] = False,
):
    """Decorator: ``@register_stage("prune", PruneOptions, PRUNE_METHODS, accepts=..., produces=...)`` on
    ``def prune(model, options, context)`` (StageSpec says what each argument means)."""

    def decorate(apply: Callable[..., Any]) -> Callable[..., Any]:
        if name in _STAGES and _STAGES[name].apply is not apply:
            raise ValueError(f"stage '{name}' is registered twice")
        summary = (apply.__doc__ or "").strip().splitlines()[0] if apply.__doc__ else ""
        _STAGES[name] = StageSpec(name, options, apply, summary, methods, accepts, produces, needs_original_layout)
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
    calibration: Calibration  # the run's calibration windows, built once
    output_dir: Any  # pathlib.Path of this stage's scratch space
    load_original: Callable[[], Any] | None = None  # the uncompressed model, for teachers and references
    notes: list[str] = field(default_factory=list)  # what the report must say about this stage (reset per stage)
