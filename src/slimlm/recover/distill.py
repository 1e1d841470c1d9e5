"""The `distill` stage: train a pruned or quantized student to imitate the uncompressed original (or other teachers).

Logit losses (forward KL, Hinton et al. 2015; reverse KL, MiniLLM; generalized JSD, GKD), hidden-state and
attention transfer through a layer map (layers.py), an LM loss, on-policy batches (GKD), QAT onto a quantization
grid and pruning masks kept (constraints.py), and an optional on-disk top-k teacher cache (teacher.py).
Black-box and task-specific distillation train on text the teacher generates (`teacher_text`, teacher_text.py);
adaptive settings (a temperature schedule, a loss-mix schedule, teachers weighted by the student's gap) are in
adaptive.py, each defaulting to the fixed setting. Training
runs on the shared accelerate loop (trainer.py) with checkpoints in the stage's scratch folder, so a pipeline
``--resume`` after a crash continues mid-stage; the checkpoints are deleted once the stage has finished.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.modules import decoder_layers
from slimlm.quantize.grid import QuantGrid
from slimlm.recover import constraints
from slimlm.recover.adaptive import Schedule, TemperatureSchedule, format_errors
from slimlm.recover.checkpoint import remove_checkpoints
from slimlm.recover.data import WindowOrder, packed_windows
from slimlm.recover.distributed import is_main_process, process_state, world_size
from slimlm.recover.layers import matching_head_pairs, resolve_layer_map
from slimlm.recover.objectives import DistillObjective, LossWeights
from slimlm.recover.options import QatOptions, TrainingOptions, stage_folder
from slimlm.recover.teacher import Teachers, TopKCache, cache_key, frozen
from slimlm.recover.teacher_text import TeacherTextOptions, cached_documents, teacher_text_windows
from slimlm.recover.trainer import train
from slimlm.registry import FAKE_QUANTIZED, MODULE_KINDS, W8A8, register_stage
from slimlm.streaming import require_materialized


class TeacherSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "original"  # 'original' (the pipeline's uncompressed model) or a model folder / .gguf / hub id
    weight: PositiveFloat = 1.0


class LossMix(BaseModel):
    """The loss weights at the end of training; they move there from `loss` along `schedule` (adaptive.py)."""

    model_config = ConfigDict(extra="forbid")
    end: LossWeights
    schedule: Schedule = "linear"


class DistillOptions(TrainingOptions):
    teacher: list[TeacherSpec] = Field(default_factory=lambda: [TeacherSpec()])
    loss: LossWeights = Field(default_factory=LossWeights)
    temperature: PositiveFloat | TemperatureSchedule = 1.0  # a float (fixed) or {start, end, schedule}
    loss_mix: LossMix | None = None  # null: the weights stay `loss`
    teacher_weighting: Literal["fixed", "gap"] = "fixed"  # gap: by the student's current KL to each teacher
    # train on text the teacher generates (black-box, task-specific) instead of `data`
    teacher_text: TeacherTextOptions | None = None
    jsd_beta: float = Field(0.5, ge=0, le=1)
    hidden_metric: Literal["mse", "cosine"] = "mse"
    on_policy: float = Field(0.0, ge=0, le=1)  # fraction of micro-batches sampled from the student (GKD's λ)
    layer_map: list[NonNegativeInt] | None = None  # teacher layer of each student layer (hidden/attention losses)
    qat: QatOptions | None = None
    # cache the teacher's top-k log-probs on disk instead of running it each step
    teacher_topk: PositiveInt | None = None

    @field_validator("teacher", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        if isinstance(value, str):
            return [{"model": value}]
        if isinstance(value, list) and not value:
            raise ValueError("name at least one teacher")
        if isinstance(value, list):  # entries may be plain names (weight 1)
            return [{"model": entry} if isinstance(entry, str) else entry for entry in value]
        return value

    @field_validator("loss")
    @classmethod
    def _some_loss(cls, value: LossWeights) -> LossWeights:
        if not value.active():
            raise ValueError("every loss weight is 0; give at least one a positive weight")
        return value

    @field_validator("temperature", mode="before")
    @classmethod
    def _fixed_or_scheduled(cls, value):
        """A number or a schedule, with the one error that applies (a plain union would report both branches)."""
        if isinstance(value, dict):
            try:
                return TemperatureSchedule.model_validate(value)
            except ValidationError as err:
                raise ValueError(format_errors(err)) from None
        if isinstance(value, bool) or not isinstance(value, int | float | TemperatureSchedule):
            raise ValueError(f"expected a number or {{start, end, schedule}}, got {value!r}")
        if not isinstance(value, TemperatureSchedule) and value <= 0:
            raise ValueError("Input should be greater than 0")
        return value

    @model_validator(mode="after")
    def _adaptive_settings_fit(self) -> DistillOptions:
        if self.loss_mix is not None:
            end, start = self.loss_mix.end, self.loss
            if not end.active():
                raise ValueError("loss_mix.end: every loss weight is 0; give at least one a positive weight")
            if (end.hidden, end.attention) != (start.hidden, start.attention):
                raise ValueError("loss_mix.end: hidden and attention must keep the weights of `loss`; mix logit terms")
        if self.teacher_weighting == "gap" and len(self.teacher) < 2:
            raise ValueError("teacher_weighting: gap weighs several teachers; name at least two")
        if self.teacher_topk and (isinstance(self.temperature, TemperatureSchedule) or self.teacher_weighting == "gap"):
            raise ValueError(
                "teacher_topk: the cache holds one fixed mixture at one temperature; a temperature schedule and "
                "teacher_weighting: gap need the live teachers"
            )
        return self

    def start_temperature(self) -> float:
        return self.temperature.start if isinstance(self.temperature, TemperatureSchedule) else self.temperature

    @field_validator("teacher_topk")
    @classmethod
    def _cache_needs_logits_only(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        loss = info.data.get("loss")
        if info.data.get("on_policy") or (loss is not None and (loss.hidden or loss.attention)):
            raise ValueError(
                "the cache holds the teacher's logits only; on_policy, loss.hidden and loss.attention "
                "need the live teacher"
            )
        return value


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def load_teachers(specs: list[TeacherSpec], context, student: nn.Module) -> Teachers:
    """The teacher models (the pipeline's original shared, others loaded in the student's dtype)."""
    from slimlm.models import load_model

    models = []
    for spec in specs:
        if spec.model == "original":
            if getattr(context, "load_original", None) is None:
                raise SlimlmError("distill.teacher: 'original' needs the pipeline's original model; none was given")
            models.append(context.load_original())
        else:
            models.append(load_model(spec.model, _dtype_name(student)).model)
        teacher_vocab, student_vocab = models[-1].config.vocab_size, student.config.vocab_size
        if teacher_vocab != student_vocab:
            raise SlimlmError(
                f"distill.teacher: {spec.model} has a vocabulary of {teacher_vocab} tokens, the student "
                f"{student_vocab}; their distributions cannot be compared"
            )
    return Teachers(models, [spec.weight for spec in specs])


def _layer_pairs(student, teachers: Teachers, options: DistillOptions, notes: list[str]):
    """(student, teacher) layer pairs for the hidden loss and those with equal head counts for the attention loss."""
    if not (options.loss.hidden or options.loss.attention):
        return [], []
    is_original = options.teacher[0].model == "original"
    layer_map, how = resolve_layer_map(student, len(decoder_layers(teachers.first)), options.layer_map, is_original)
    pairs = list(enumerate(layer_map))
    attention_pairs = matching_head_pairs(student, teachers.first, layer_map) if options.loss.attention else []
    if options.loss.attention and not attention_pairs:
        raise SlimlmError(
            "distill.loss.attention: no mapped layer pair has the same number of attention heads in "
            "student and teacher; set it to 0 or change layer_map"
        )
    notes.append(
        f"distill: layer map student→teacher {layer_map} ({how}); attention transfer on "
        f"{len(attention_pairs)} of {len(pairs)} pairs"
        if options.loss.attention
        else f"distill: layer map student→teacher {layer_map} ({how})"
    )
    return pairs, attention_pairs


def _projection(student, teacher, options: DistillOptions) -> nn.Module | None:
    """A learned student→teacher width map for the hidden loss, only when the widths differ (FitNets' regressor)."""
    width_s, width_t = student.config.hidden_size, teacher.config.hidden_size
    if not options.loss.hidden or width_s == width_t:
        return None
    return nn.Linear(width_s, width_t, bias=False, dtype=next(student.parameters()).dtype)


def _attach_qat(student, options: DistillOptions):
    if options.qat is None:
        return [], None
    grid = QuantGrid(options.qat.bits, options.qat.sym, options.qat.group_size)
    linears = constraints.qat_targets(student, options.qat.targets)
    for name, linear in linears:
        if options.qat.group_size is not None and linear.in_features % options.qat.group_size:
            raise SlimlmError(
                f"distill.qat.group_size: {options.qat.group_size} does not divide the "
                f"{linear.in_features} input features of {name}; use a divisor or null"
            )
    constraints.attach_fake_quantization(linears, grid)
    return linears, grid


def _teacher_cache(teachers: Teachers, windows, options: DistillOptions, folder, notes) -> TopKCache:
    """The top-k cache for the windows this run reads; built once (by rank 0 under ``accelerate launch``, the
    other ranks wait for it), reused by later runs with the same inputs."""
    order = WindowOrder(len(windows), options.batch_size, options.seed)
    window_ids = order.windows_visited(options.steps * options.grad_accum, world_size())
    key = cache_key(
        [t.model for t in options.teacher],
        teachers.weights,
        options.temperature,
        options.teacher_topk,
        windows,
        window_ids,
    )
    path = folder.parent / "teacher-cache" / f"top{options.teacher_topk}-{key}.pt"
    existed = path.is_file()
    if not existed and is_main_process():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with frozen(teachers.models, device=device):
            TopKCache.build(
                path,
                teachers,
                windows,
                window_ids,
                options.temperature,
                options.teacher_topk,
                options.batch_size,
                device,
            )
    if world_size() > 1:
        process_state().wait_for_everyone()
    if existed:
        notes.append(f"distill: teacher top-{options.teacher_topk} cache reused: {path}")
    else:
        notes.append(
            f"distill: teacher top-{options.teacher_topk} cache written for {len(window_ids)} windows "
            f"({path.stat().st_size / 2**20:.1f} MiB): {path}"
        )
    return TopKCache(path, teachers.first.config.vocab_size)


def _training_windows(teachers: Teachers, options: DistillOptions, context):
    """The packed training windows and, for teacher-generated text, the LM-loss mask of the teacher's tokens."""
    if options.teacher_text is None:
        return packed_windows(context.tokenizer, options.data, options.seq_len), None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with frozen([teachers.first], device=device):
        documents = cached_documents(teachers.first, context.tokenizer, options.teacher_text, context.notes)
    return teacher_text_windows(documents, options.seq_len, context.tokenizer.eos_token_id)


def _temperature(options: DistillOptions) -> str:
    t = options.temperature
    return f"{t:g}" if isinstance(t, float) else f"{t.start:g}→{t.end:g} ({t.schedule})"


# packed/codebook weights are buffers: training leaves them on their grid and trains everything else; W8A8's integer
# matmul has no gradient
@register_stage(
    "distill",
    DistillOptions,
    accepts=MODULE_KINDS - {W8A8},
    produces=lambda o: frozenset({FAKE_QUANTIZED} if o.qat else set()),
)
def distill(model, options: DistillOptions, context):
    """Knowledge distillation: KL / JSD, hidden, attention, on-policy, teacher-written text, adaptive, QAT."""
    require_materialized(model, "distillation")
    notes = context.notes
    teachers = load_teachers(options.teacher, context, model)
    pairs, attention_pairs = _layer_pairs(model, teachers, options, notes)  # model-dependent checks first
    windows, lm_mask = _training_windows(teachers, options, context)
    folder = stage_folder(context, "distill", options, model)
    start_device, attention_kernel = next(model.parameters()).device, model.config._attn_implementation
    qat_linears, grid = _attach_qat(model, options)
    masks = constraints.SparsityMasks(model) if options.keep_sparsity else None
    if options.loss.attention:
        model.set_attn_implementation("eager")  # attention probabilities exist only in eager attention
    cache = _teacher_cache(teachers, windows, options, folder, notes) if options.teacher_topk else None
    objective = DistillObjective(
        None if cache is not None else teachers,
        options.loss,
        options.start_temperature(),
        options.jsd_beta,
        pairs,
        attention_pairs,
        options.hidden_metric,
        _projection(model, teachers.first, options),
        options.on_policy,
        options.seed,
        cache,
        lm_mask,
        options.temperature if isinstance(options.temperature, TemperatureSchedule) else None,
        options.loss_mix.end if options.loss_mix else None,
        options.loss_mix.schedule if options.loss_mix else "linear",
        options.teacher_weighting,
        options.steps * options.grad_accum,
    )
    live = [] if cache is not None else teachers.models
    with frozen(live, eager_attention=bool(options.loss.attention)):
        result = train(
            model,
            windows,
            objective,
            options.train_config("distill"),
            folder,
            after_step=masks.apply if masks else None,
        )
    model = result.model
    if qat_linears:
        constraints.detach_fake_quantization(qat_linears, grid)
    elif constraints.drop_stale_codes(model):
        notes.append(
            "distill: weights changed after quantization; the stored codes were dropped (re-run quantize "
            "to pack, or use qat to train on the grid)"
        )
    if options.loss.attention and attention_kernel:
        model.set_attn_implementation(attention_kernel)
    model.to(start_device)
    _report(notes, options, result, windows, masks, qat_linears)
    if is_main_process():  # the other ranks are past their last use of the checkpoints (train ends in a barrier)
        remove_checkpoints(folder / "checkpoints")
    return model


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _report(notes, options: DistillOptions, result, windows, masks, qat_linears) -> None:
    active = options.loss.active()
    if options.loss_mix is not None:
        active = f"{active} → {options.loss_mix.end.active()} ({options.loss_mix.schedule})"
    teachers = ", ".join(f"{t.model}×{t.weight:g}" for t in options.teacher)
    if options.teacher_weighting == "gap":
        teachers += " (weighted by the student's gap)"
    data = f"teacher text from {options.teacher_text.prompts}" if options.teacher_text else options.data
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from is not None else ""
    notes.append(
        f"distill: {result.steps} steps × {options.batch_size}×{options.grad_accum} windows of "
        f"{options.seq_len} tokens from {data} ({len(windows)} packed windows){resumed}; "
        f"teacher {teachers}; losses {active}, τ={_temperature(options)}, on-policy λ={options.on_policy:g}; "
        f"loss {_loss(result.first_loss)} → {_loss(result.last_loss)}; metrics: {result.metrics_path}"
    )
    if masks:
        notes.append(f"distill: pruning masks kept on {len(masks)} Linears ({masks.sparsity():.1%} zeros)")
    if qat_linears:
        notes.append(
            f"distill: QAT on {len(qat_linears)} Linears ({options.qat.bits}-bit, group "
            f"{options.qat.group_size}, {'sym' if options.qat.sym else 'asym'}); the weights end on the grid"
        )
