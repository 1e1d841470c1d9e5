"""The `lora` stage: low-rank adapters (Hu et al. 2022, "LoRA") trained on a compressed student, then merged.

peft wraps the target projections with W + (α/r)·B·A (B starts at zero, so training starts from the student
itself); only A and B train, with the next-token loss (``loss: lm``) or distillation from the original
(``loss: kd``: forward KL at `temperature`). At the end ``merge_and_unload`` folds B·A into W, so the stage returns a
plain transformers model that ``save_pretrained``/``from_pretrained`` round-trip without peft.

The merged update is dense: on a pruned student the merge would regrow pruned weights, so with ``keep_sparsity``
(the default) the pruning masks are re-applied after the merge; the merged model then differs slightly from the
adapter model that was trained. On a quantized student the merge moves weights off the grid: the stored codes are
dropped, and a later quantize stage puts the weights back on a grid (or use distill's qat instead).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from slimlm.modules import SHORT_NAMES, ProjectionName
from slimlm.recover import constraints
from slimlm.recover.checkpoint import remove_checkpoints
from slimlm.recover.data import packed_windows
from slimlm.recover.distill import TeacherSpec, load_teachers
from slimlm.recover.distributed import is_main_process
from slimlm.recover.objectives import DistillObjective, LanguageModelObjective, LossWeights
from slimlm.recover.options import TrainingOptions, stage_folder
from slimlm.recover.teacher import frozen
from slimlm.recover.trainer import train
from slimlm.registry import DENSE, FAKE_QUANTIZED, register_stage
from slimlm.streaming import require_materialized


class LoraOptions(TrainingOptions):
    rank: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[ProjectionName] = Field(default_factory=lambda: list(SHORT_NAMES), min_length=1)
    loss: Literal["lm", "kd"] = "lm"
    teacher: str = "original"  # for loss: kd
    temperature: PositiveFloat = 1.0  # for loss: kd
    lr: PositiveFloat = 1e-4


def attach_lora(model, options: LoraOptions):
    """The student wrapped by peft with fresh adapters on the target projections (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merge_lora(peft_model, masks: dict | None = None):
    """Fold the adapters into the weights; a plain transformers model comes back (pruning masks re-applied)."""
    model = peft_model.merge_and_unload()
    if masks:
        constraints.apply_masks_by_name(model, masks)
    return model


def _objective(options: LoraOptions, context, model):
    if options.loss == "lm":
        return LanguageModelObjective(), []
    teachers = load_teachers([TeacherSpec(model=options.teacher)], context, model)
    return DistillObjective(teachers, LossWeights(kl=1.0), options.temperature, seed=options.seed), teachers.models


@register_stage("lora", LoraOptions, accepts=frozenset({DENSE, FAKE_QUANTIZED}))
def lora(model, options: LoraOptions, context):
    """LoRA adapters trained with the LM loss or distillation from the original, merged into the weights."""
    require_materialized(model, "LoRA")
    windows = packed_windows(context.tokenizer, options.data, options.seq_len)
    folder = stage_folder(context, "lora", options, model)
    start_device = next(model.parameters()).device
    masks = constraints.recorded_masks(model) if options.keep_sparsity else {}
    objective, teacher_models = _objective(options, context, model)
    peft_model = attach_lora(model, options)
    trainable, total = peft_model.get_nb_trainable_parameters()
    with frozen(teacher_models):
        result = train(peft_model, windows, objective, options.train_config("lora"), folder)
    model = merge_lora(result.model, masks).to(start_device)
    model.eval()
    dropped = constraints.drop_stale_codes(model)
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from is not None else ""
    context.notes.append(
        f"lora: rank {options.rank}, α {options.alpha:g} on {', '.join(options.targets)} ({trainable:,} trainable of "
        f"{total:,} parameters); {result.steps} steps of loss '{options.loss}' on {options.data}{resumed}; "
        f"loss {_fmt(result.first_loss)} → {_fmt(result.last_loss)}; merged into the weights (plain model); "
        f"metrics: {result.metrics_path}"
    )
    if masks:
        context.notes.append(f"lora: pruning masks re-applied after the merge on {len(masks)} Linears")
    if dropped:
        context.notes.append(
            f"lora: the merge moved {dropped} quantized Linears off their grid; their codes were "
            "dropped (re-run quantize to pack)"
        )
    if is_main_process():  # the other ranks are past their last use of the checkpoints (train ends in a barrier)
        remove_checkpoints(folder / "checkpoints")
    return model


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
