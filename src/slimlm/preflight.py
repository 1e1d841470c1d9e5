"""Checks a recipe needs the model for, made from the model's config alone (no weights) before anything runs.

Options are validated without a model (recipe.py); what depends on the model's shape — a group size that must divide
a layer's input width, more layers removed than exist, more channels kept than there are — is checked here against
the config, following the shape through the stages that change it (depth and width pruning), together with the
evaluation tasks and the calibration data. Every message starts with the recipe path of the field at fault. A shape
a stage makes that cannot be known in advance (a width kept as a fraction) is left to the stage's own check.

`streaming_choice` decides whether a run streams the model layer by layer (the recipe's `stream`; auto compares the
whole model's size with the memory available) and `check_streamable` refuses what a streamed run cannot do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from slimlm.errors import SlimlmError
from slimlm.modules import PROJECTION_WIDTHS, SHORT_NAMES, attention_head_dim
from slimlm.registry import get_stage, stage_names

_CHECKS: dict[str, Callable] = {}


@dataclass(frozen=True)
class Shape:
    """The widths of a decoder as the stages so far leave it; None where it cannot be known before running."""

    layers: int
    hidden: int
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    intermediate: int | None

    @classmethod
    def of(cls, config) -> Shape:
        heads = config.num_attention_heads
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            heads,
            getattr(config, "num_key_value_heads", None) or heads,
            attention_head_dim(config),
            config.intermediate_size,
        )

    def width(self, projection: str, side: int) -> int | None:
        """Input (side 0) or output (side 1) width of a projection, by its recipe name (``q_proj``)."""
        kind = PROJECTION_WIDTHS[SHORT_NAMES[projection]][side]
        heads = {"query": self.heads, "kv": self.kv_heads}
        if kind in heads:
            return None if heads[kind] is None else heads[kind] * self.head_dim
        return getattr(self, kind)


def preflight(stage_name: str):
    """Decorator: ``@preflight("quantize")`` on ``def check(where, options, shape) -> Shape`` (the shape after it)."""

    def decorate(check: Callable) -> Callable:
        _CHECKS[stage_name] = check
        return check

    return decorate


def check_stages(stages, config) -> None:
    shape = Shape.of(config)
    for index, stage in enumerate(stages):
        check = _CHECKS.get(stage.name)
        if check is not None:
            shape = check(f"stages[{index}].{stage.name}", stage.options, shape)


def _targets(options) -> list[str]:
    return getattr(options, "targets", None) or list(SHORT_NAMES)


def _check_divides(
    where: str, divisor: int, options, shape: Shape, side: int, what: str, advice: str, projections=None
) -> None:
    """`divisor` must divide the input (side 0) or output (side 1) width of every target projection (or of
    `projections`)."""
    for projection in projections or _targets(options):
        width = shape.width(projection, side)
        if width is not None and width % divisor:
            raise SlimlmError(f"{where}: {divisor} does not divide the {width} {what} of {projection}; {advice}")


@preflight("quantize")
def _quantize(where: str, options, shape: Shape) -> Shape:
    if not hasattr(options, "grid"):  # smoothquant: per channel
        return shape
    for projection in _targets(options):
        group_size = options.grid(projection).group_size
        if group_size is not None:
            where_set = f"{where}.{options.group_size_field(projection)}"
            advice = "use a divisor of it or null (one scale per output channel)"
            _check_divides(where_set, group_size, options, shape, 0, "input features", advice, [projection])
    return shape


@preflight("share")
def _share(where: str, options, shape: Shape) -> Shape:
    if getattr(options, "granularity", "tensor") == "row_group":
        _check_divides(
            f"{where}.rows_per_codebook",
            options.rows_per_codebook,
            options,
            shape,
            1,
            "output rows",
            "use a divisor of it",
        )
    return shape


@preflight("prune_depth")
def _prune_depth(where: str, options, shape: Shape) -> Shape:
    if options.remove is not None:
        if options.remove >= shape.layers:
            raise SlimlmError(
                f"{where}.remove: {options.remove} would leave no layer of the model's {shape.layers}; "
                f"must be below {shape.layers}"
            )
        return dataclasses.replace(shape, layers=shape.layers - options.remove)
    if options.layers is not None:
        from slimlm.prune.depth import check_named_layers

        check_named_layers(options.layers, shape.layers, where)
        return dataclasses.replace(shape, layers=shape.layers - len(options.layers))
    kept = round(options.keep_ratio * shape.layers)
    if kept < 1:
        raise SlimlmError(
            f"{where}.keep_ratio: {options.keep_ratio} of {shape.layers} layers keeps none; the "
            f"smallest ratio that keeps one is {0.5 / shape.layers:.3g}"
        )
    return dataclasses.replace(shape, layers=kept)


@preflight("prune_width")
def _prune_width(where: str, options, shape: Shape) -> Shape:
    changes = {}
    for field, current, dimension, noun in (
        ("mlp_keep", shape.intermediate, "intermediate", "MLP channels"),
        ("heads_keep", shape.heads, "heads", "query heads"),
    ):
        keep = getattr(options, field)
        if keep is None:
            continue
        if isinstance(keep, int) and current is not None and keep > current:
            raise SlimlmError(
                f"{where}.{field}: {keep} is more than the model's {current} {noun} per layer; keep at "
                f"most {current} (or give a fraction in (0, 1])"
            )
        # a count is exact; a fraction is rounded by the stage itself, so later checks cannot know the width
        changes[dimension] = keep if isinstance(keep, int) else None
    if changes.get("heads", shape.heads) is None:
        changes["kv_heads"] = None
    return dataclasses.replace(shape, **changes)


def check_data(recipe) -> None:
    """The calibration source and the evaluation tasks exist (the text itself is read when a stage needs it)."""
    from slimlm.data import NAMED_SOURCES

    _check_source("calibration.data", recipe.calibration.data, (*NAMED_SOURCES, "self"))
    from slimlm.evaluate.suite import is_perplexity_task
    from slimlm.evaluate.tasks import check_task_names, task_protocols

    for index, task in enumerate(recipe.evaluate.tasks):
        if is_perplexity_task(task) and task not in NAMED_SOURCES:
            _check_source(f"evaluate.tasks[{index}]", task, NAMED_SOURCES)
    try:
        harness_tasks = [task for task in recipe.evaluate.tasks if not is_perplexity_task(task)]
        check_task_names(harness_tasks)
        task_protocols(harness_tasks, recipe.evaluate.task_protocols)
    except SlimlmError as err:
        raise SlimlmError(f"evaluate.tasks: {err}") from None
    _check_task_training_rows(recipe)


def _check_task_training_rows(recipe) -> None:
    """A distill stage that trains on a task's held-apart rows (teacher_text.prompts: sst2 | triviaqa) must not be
    evaluated on them: the task's evaluation has to stop before the first row training reads."""
    from slimlm.recover.teacher_text import HELD_APART

    for index, stage in enumerate(recipe.stages):
        task = getattr(getattr(stage.options, "teacher_text", None), "prompts", None)
        if task not in HELD_APART or task not in recipe.evaluate.tasks:
            continue
        limit, first_trained = recipe.evaluate.task_limit, HELD_APART[task]
        if limit is None or limit > first_trained:
            raise SlimlmError(
                f"evaluate.task_limit: {limit or 'all'} {task} documents would score rows that stages[{index}]."
                f"{stage.name} trains on (teacher_text.prompts: {task} reads rows {first_trained} on); set task_limit "
                f"to at most {first_trained}"
            )


def _check_source(where: str, source: str, named: tuple[str, ...]) -> None:
    if source in named:
        return
    path = Path(source).expanduser()
    if path.suffix not in (".txt", ".raw", ".jsonl", ".parquet"):
        raise SlimlmError(
            f"{where}: '{source}' is not a named set ({', '.join(named)}) nor a .txt, .raw, .jsonl or .parquet file"
        )
    if not path.is_file():
        raise SlimlmError(f"{where}: no such file: {path}")
    if path.stat().st_size == 0:
        raise SlimlmError(f"{where}: {path} is empty")


# What each export format stores exactly: (is this packed grid exact, what it lacks, how to get there).
_EXACT_GRIDS = {
    "gguf": (
        lambda o: o.group_size == 32 and o.bits in ((4, 5, 8) if o.sym else (4, 5)),
        "no GGUF block type",
        "quantize symmetric with group_size: 32 at 4, 5 or 8 bits",
    ),
    "compressed-tensors": (
        lambda o: o.sym and o.bits in (4, 8),
        "no pack-quantized form",
        "quantize symmetric at 4 or 8 bits",
    ),
}


def _export_refusal(export_format: str, stage) -> str | None:
    """Why `stage` leaves modules the format cannot write exactly; None when it can."""
    exact, lacking, _ = _EXACT_GRIDS[export_format]
    options, method = stage.options, getattr(stage.options, "method", None)
    if stage.name == "quantize" and method != "smoothquant" and getattr(options, "pack", True):
        for grid in options.grids():
            if not exact(grid):
                return f"{grid.bits}-bit {'' if grid.sym else 'asymmetric '}group {grid.group_size} has {lacking}"
        return None
    if stage.name == "quantize" or (stage.name == "share" and method == "kmeans") or stage.name == "lowrank":
        return f"its {method} modules have {lacking}"
    return None


def check_exports(recipe) -> None:
    """An export that would refuse the final model fails now, not after the stages ran: every module a stage leaves
    must have an exact form in the format, unless the export may write it dense (dequantize: true)."""
    for index, target in enumerate(recipe.export):
        if target.format not in _EXACT_GRIDS or target.dequantize:
            continue
        for position, stage in enumerate(recipe.stages):
            reason = _export_refusal(target.format, stage)
            if reason:
                raise SlimlmError(
                    f"export[{index}].{target.format}: stages[{position}].{stage.name} leaves modules it cannot write "
                    f"exactly ({reason}); {_EXACT_GRIDS[target.format][2]}, or set dequantize: true to write them dense"
                )


_GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def available_memory() -> int:
    """Bytes the run may use: what the system can give without swapping."""
    return psutil.virtual_memory().available


@dataclass(frozen=True)
class StreamingChoice:
    """Whether the run streams the model layer by layer (streaming.py) or loads it whole, and why, in one line."""

    streamed: bool
    reason: str


def streaming_choice(recipe) -> StreamingChoice:
    """The recipe's `stream`: true and false as written; auto streams a model folder when the whole model would not
    fit (the original plus the stages' working copy, in the recipe's dtype, over the memory available now). A stage
    that cannot stream then fails here, naming it, before anything runs."""
    from slimlm.models import resolve_source
    from slimlm.streaming import checkpoint_numel

    source = resolve_source(recipe.model)
    if recipe.stream is False:
        return StreamingChoice(False, "stream: false in the recipe")
    if source.kind != "folder":
        if recipe.stream is True:
            raise SlimlmError(
                f"stream: true needs a model folder with safetensors weights; model '{recipe.model}' is a "
                f"{source.kind} source (convert it to a folder first)"
            )
        return StreamingChoice(False, f"stream: auto, a {source.kind} source is loaded whole")
    if recipe.stream is True:
        return StreamingChoice(True, "stream: true in the recipe")
    needed = 2 * checkpoint_numel(source.path) * _DTYPE_BYTES[recipe.dtype]
    available = available_memory()
    estimate = (
        f"the whole model needs ≈{needed / _GIB:.1f} GiB (the original and a working copy in {recipe.dtype}), "
        f"{available / _GIB:.1f} GiB available"
    )
    if needed <= available:
        return StreamingChoice(False, f"stream: auto, loaded whole: {estimate}")
    reason = f"stream: auto, streamed: {estimate}"
    try:
        check_streamable(recipe, reason)
    except SlimlmError as err:
        raise SlimlmError(f"{err}; or set stream: false to load it whole anyway") from None
    return StreamingChoice(True, reason)


def _streaming_methods() -> str:
    """The methods registered as streaming (the calibration-walk methods), per stage: 'prune (sparsegpt, wanda)'."""
    stages = [get_stage(name) for name in stage_names()]
    listed = [(spec.name, sorted(spec.methods.streaming)) for spec in stages if spec.methods is not None]
    return "; ".join(f"{name} ({', '.join(methods)})" for name, methods in listed if methods)


def check_streamable(recipe, why: str) -> None:
    """A streamed run (chosen because of `why`) holds one decoder layer at a time: every stage must run inside the
    calibration walk, the calibration data must not be sampled from the whole model, and nothing is exported."""
    for index, stage in enumerate(recipe.stages):
        method = getattr(stage.options, "method", None)
        if not get_stage(stage.name).streams(stage.options):
            label = f"{stage.name} ({method})" if method else stage.name
            raise SlimlmError(
                f"stages[{index}].{label}: needs the whole model in memory, which a streamed run "
                f"({why}) never loads; streaming runs {_streaming_methods()}"
            )
    if recipe.calibration.data == "self":
        raise SlimlmError(
            f"calibration.data: 'self' samples text from the whole model, which a streamed run ({why}) never loads; "
            "use a named set or a file"
        )
    if recipe.export:
        raise SlimlmError(
            f"export: an export needs the whole model in memory, which a streamed run ({why}) never loads; drop it "
            "and run `slimlm export` on the output folder where it fits"
        )
