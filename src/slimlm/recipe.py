"""The YAML recipe: what to load, how to calibrate and evaluate, which stages to run, where to write.

Validation happens before any model is loaded, and every error names the YAML path of the bad field, e.g.
``stages[0].prune.sparsity: must be in [0, 1)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slimlm.errors import SlimlmError
from slimlm.export.options import ExportTarget
from slimlm.modules import SHORT_NAMES
from slimlm.registry import DENSE, StageOptions, get_stage, stage_names

_DTYPES = ("float32", "bfloat16", "float16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(_Strict):
    data: str = Field("c4", description="named set (c4, wikitext2, wikitext2-valid), a file, or 'self' (data-free)")
    samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(2048, ge=8, le=1_000_000)
    seed: int = 0


class EvaluateConfig(_Strict):
    tasks: list[str] = Field(default_factory=lambda: ["wikitext2"])
    seq_len: int = Field(2048, ge=8, le=1_000_000)
    limit: int | None = Field(None, ge=1, description="perplexity windows to use (None: the whole split)")
    task_limit: int | None = Field(None, ge=1, description="documents per downstream task (None: all)")
    speed: bool = True
    prompt_tokens: int = Field(128, ge=1)
    new_tokens: int = Field(64, ge=1)
    # per downstream task: prompt, chat_template, num_fewshot, fewshot_as_multiturn; overrides the measured
    # defaults of evaluate/tasks.py (DEFAULT_PROTOCOLS)
    task_protocols: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # every_stage: each stage's model is scored (the report's curve over the recipe); last_stage: only the final
    # one (the others get their size on disk), for runs that only want the result (slimlm auto's candidates)
    after: Literal["every_stage", "last_stage"] = "every_stage"


class Stage(_Strict):
    """A validated stage: its registered name and its options."""

    name: str
    options: StageOptions


class Recipe(_Strict):
    model: str
    # true: compress layer by layer from the model folder (streaming.py), never holding the whole model; false: load
    # it whole; auto: stream when the whole model would not fit in the memory available (preflight.streaming_choice)
    stream: bool | Literal["auto"] = "auto"
    dtype: str = "float32"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    stages: list[Stage] = Field(default_factory=list)
    export: list[ExportTarget] = Field(default_factory=list)  # deployable copies of the final model (export/)
    output: str = "runs/slimlm"

    @field_validator("stream", mode="before")
    @classmethod
    def _stream_choice(cls, value: Any) -> Any:
        if value is not True and value is not False and value != "auto":
            raise ValueError(f"{value!r} is not true, false or auto")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in _DTYPES:
            raise ValueError(f"must be one of {', '.join(_DTYPES)}")
        return value

    def fingerprint(self) -> str:
        """Identifies what the run computes, so --resume refuses to continue a different recipe."""
        payload = self.to_yaml_dict()
        payload.pop("output")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"stages"})
        data["stages"] = [{stage.name: stage.options.model_dump(mode="json")} for stage in self.stages]
        return data


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each starting with the YAML path of the field."""
    lines = []
    for item in error.errors():
        path = prefix
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown option"
        lines.append(f"{path or 'recipe'}: {message}")
    return "; ".join(lines)


def _parse_stage(index: int, entry: Any) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(entry, dict) or len(entry) != 1:
        raise SlimlmError(f"{where}: expected a mapping with one stage name, e.g. '- prune: {{sparsity: 0.5}}'")
    name, options = next(iter(entry.items()))
    spec = get_stage(name)
    if spec is None:
        raise SlimlmError(f"{where}: unknown stage '{name}'; known stages: {', '.join(stage_names())}")
    if options is not None and not isinstance(options, dict):
        raise SlimlmError(f"{where}.{name}: expected a mapping of options")
    try:
        return Stage(name=name, options=spec.options_model(options).model_validate(options or {}))
    except ValidationError as err:
        raise SlimlmError(format_validation_error(err, prefix=f"{where}.{name}")) from err


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise SlimlmError(f"{source}: expected a mapping at the top level")
    raw_stages = data.get("stages") or []
    if not isinstance(raw_stages, list):
        raise SlimlmError("stages: expected a list of stages")
    stages = [_parse_stage(i, entry) for i, entry in enumerate(raw_stages)]
    try:
        recipe = Recipe.model_validate({**data, "stages": []})
    except ValidationError as err:
        raise SlimlmError(format_validation_error(err)) from err
    # a run with neither stages nor export would report the original as its result (with an export, the export is
    # the compression: slimlm auto's gguf recipes); top-level errors come first
    if not stages and not recipe.export:
        raise SlimlmError("stages: a recipe needs at least one stage, or an export")
    recipe.stages = stages
    check_chain(stages)
    if recipe.stream is True:
        from slimlm.preflight import check_streamable

        check_streamable(recipe, "stream: true")
    return recipe


def check_recipe(recipe: Recipe) -> None:
    """The checks that need the model's config (not its weights): shapes through the stages, data and tasks
    (preflight.py). Run before any folder is written or weight loaded; raises SlimlmError naming the field."""
    from slimlm.models import load_config
    from slimlm.preflight import check_data, check_exports, check_stages

    try:
        config = load_config(recipe.model)
    except SlimlmError as err:
        raise SlimlmError(f"model: {err}") from None
    check_exports(recipe)
    check_stages(recipe.stages, config)
    check_data(recipe)


def check_chain(stages: list[Stage]) -> None:
    """Every stage must accept every kind of projection the stages before it leave in the projections it works on
    (its `targets`, else all of them): StageSpec's contract, checked per projection name."""
    # projection -> {kind: who first left it there}
    kinds = {projection: {DENSE: "the original model"} for projection in list(SHORT_NAMES)}
    for index, stage in enumerate(stages):
        spec = get_stage(stage.name)
        accepted = spec.accepts(stage.options)
        targets = getattr(stage.options, "targets", None) or list(SHORT_NAMES)
        for projection in targets:
            refused = [kind for kind in kinds[projection] if kind not in accepted]
            if refused:
                raise SlimlmError(
                    f"stages[{index}].{stage.name}: cannot follow {kinds[projection][refused[0]]}, which leaves "
                    f"{projection} as {refused[0]}; {_method_label(stage)} works on "
                    f"{', '.join(sorted(accepted))} projections only (reorder or drop one of the two stages)"
                )
        for projection in targets:
            for kind in spec.produces(stage.options):
                kinds[projection].setdefault(kind, f"stages[{index}].{_method_label(stage)}")


def _method_label(stage: Stage) -> str:
    method = getattr(stage.options, "method", None)
    return f"{stage.name} ({method})" if method else stage.name


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise SlimlmError(f"{path}: is a folder; give a recipe .yaml file")
    if not path.is_file():
        raise SlimlmError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SlimlmError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from err
    return parse_recipe(data, str(path))
