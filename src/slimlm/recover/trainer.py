"""The training loop shared by the distill and lora stages, on accelerate: one process, DDP, FSDP2 or DeepSpeed alike.

AdamW with a cosine schedule after a linear warm-up (transformers' get_cosine_schedule_with_warmup), gradient
accumulation through ``accelerator.accumulate``, gradient clipping, fp32 or bf16 autocast, optional gradient
checkpointing. Every `checkpoint_every` optimizer steps the whole state is saved atomically (checkpoint.py); with
``resume`` a run continues from the newest complete checkpoint, restoring weights, optimizer, schedule, RNG
states and the data position, so it finishes with the weights an uninterrupted run would have reached.

Data: each process reads its own windows of every global micro-batch (data.WindowOrder), so the loop needs no
DataLoader and the stream position is one integer saved with the checkpoint. The scheduler is stepped once per
optimizer step (``step_scheduler_with_optimizer=False``: accelerate would otherwise step it once per process).

Sharded runs (FSDP2, ZeRO-3) hand back a plain model with the gathered weights on every rank (distributed.py), so
callers save it with save_pretrained / slimlm's save_model on rank 0 exactly as after a single-process run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.recover.checkpoint import (
    latest_checkpoint,
    load_latest_checkpoint,
    remove_checkpoints,
    remove_checkpoints_from,
    save_checkpoint,
)
from slimlm.recover.data import DataPosition, WindowOrder
from slimlm.recover.distributed import (
    check_sharding,
    is_sharded,
    meta_skeleton,
    plain_model,
    process_state,
    use_cpu,
    world_size,
)
from slimlm.recover.layers import causal_lm
from slimlm.recover.metrics import MetricsLog, read_metrics
from slimlm.recover.objectives import Batch

METRICS_FILE = "metrics.jsonl"
# Divergence: a step's loss above DIVERGED_FACTOR × the first step's means the optimizer is carrying the model away
# from where it started (too high an lr), not toward the target: healthy runs fall, and their noisy steps stay
# within a few times the start. log(vocab), the cross-entropy of a uniform guess, is the floor of the limit, so that a
# small starting loss (a KL of 0.01) rising to 0.1 on a small batch does not count as divergence.
DIVERGED_FACTOR = 10.0


class TrainingDiverged(SlimlmError):
    """The loss became non-finite or exploded; checkpoints of the weights that produced it have been removed."""


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 4  # windows per micro-batch, per process
    grad_accum: int = 1
    lr: float = 1e-5
    warmup: int = 0  # optimizer steps of linear warm-up
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # optimizer steps; 0: no checkpoints
    keep_checkpoints: int = 2
    seed: int = 0
    resume: bool = True
    description: str = "train"


@dataclass
class TrainResult:
    model: nn.Module  # the trained student, a plain model (sharded runs: gathered on every rank)
    steps: int
    resumed_from: int | None  # the checkpoint's step, None when the run started fresh
    first_loss: float | None
    last_loss: float | None
    metrics_path: Path
    tokens_per_s: float | None


def make_accelerator(config: TrainConfig):
    """A fresh Accelerator; in one process the shared accelerate state is reset first so that a second training
    in the same process may use another precision or accumulation count."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if world_size() <= 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    process_state()  # accelerate's process group; FSDP allowed on CPUs (distributed.py)
    return Accelerator(
        cpu=use_cpu(),
        mixed_precision="bf16" if config.precision == "bf16" else "no",
        gradient_accumulation_steps=config.grad_accum,
        step_scheduler_with_optimizer=False,
    )


def _activation_checkpointing(model: nn.Module, enable: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant: works with frozen bases)."""
    base = causal_lm(model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers 5 name
        base.activation_checkpointing_enable(
            {"use_reentrant": False}
        ) if enable else base.activation_checkpointing_disable()
    elif enable:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def _optimizer_and_schedule(modules: list[nn.Module], config: TrainConfig):
    from transformers import get_cosine_schedule_with_warmup

    parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
    if not parameters:
        raise SlimlmError("training: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, config.warmup, config.steps)


def _trainable_only(models, weights, output_dir) -> None:
    """accelerate save hook: a checkpoint holds the parameters training changes. With LoRA that is the adapters,
    not the frozen base, which the stage rebuilds identically before resuming (its folder is keyed by the starting
    weights). FSDP/DeepSpeed save their own shards and pass no state dicts here."""
    for model, state in zip(models, weights):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if len(trainable) < sum(1 for _ in model.parameters()):
            for key in [key for key in state if key not in trainable]:
                del state[key]


def _partial_load(accelerator) -> dict:
    """Checkpoints without the frozen parameters load non-strictly (plain and DDP models only)."""
    return {} if is_sharded(accelerator) else {"strict": False}


def _prepare_output(output_dir: Path, fingerprint: dict, resume: bool, accelerator) -> None:
    """Resuming: refuse checkpoints written by a run with other settings. Not resuming: clear what a previous run
    left, so that its checkpoints can never be mixed with this run's."""
    path = output_dir / "train_config.json"
    same = path.is_file() and json.loads(path.read_text()) == fingerprint
    if resume and path.is_file() and not same:
        raise SlimlmError(
            f"{output_dir}: holds checkpoints of a training run with other settings; use another "
            "folder or set resume: false"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not resume:
            remove_checkpoints(output_dir / "checkpoints")
            (output_dir / METRICS_FILE).unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fingerprint, indent=2, default=str))
    accelerator.wait_for_everyone()


def train(
    student: nn.Module,
    windows: torch.Tensor,
    objective,
    config: TrainConfig,
    output_dir: Path,
    after_step: Callable[[], None] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    fingerprint: dict | None = None,
) -> TrainResult:
    """Train `student` on `windows` [N, T] against `objective`; checkpoints and metrics.jsonl go to output_dir.

    `after_step` runs after every optimizer step (e.g. re-applying pruning masks); `on_step(step, record)` after
    the step's metrics are logged (tests use it to slow a run down). A non-finite or exploding loss stops the run
    with TrainingDiverged (see DIVERGED_FACTOR), keeping the checkpoints written before it."""
    output_dir = Path(output_dir)
    accelerator = make_accelerator(config)
    from accelerate.utils import set_seed

    set_seed(config.seed)  # initial state of learned extras (projections) and dropout
    if config.gradient_checkpointing:
        _activation_checkpointing(student, True)
    student.train()
    extras = objective.trainable_modules()
    optimizer, scheduler = _optimizer_and_schedule([student, *extras], config)
    check_sharding(accelerator, extras)
    skeleton = meta_skeleton(student) if is_sharded(accelerator) else None  # the plain model to hand back
    prepared = accelerator.prepare(student, *extras, optimizer, scheduler)
    student, extras, optimizer, scheduler = prepared[0], list(prepared[1:-2]), prepared[-2], prepared[-1]
    position = DataPosition()
    accelerator.register_for_checkpointing(position)
    accelerator.register_save_state_pre_hook(_trainable_only)
    checkpoints = output_dir / "checkpoints"
    resumed_from = first_loss = None
    _prepare_output(output_dir, {**asdict(config), **(fingerprint or {})}, config.resume, accelerator)
    if config.resume and load_latest_checkpoint(accelerator, checkpoints, **_partial_load(accelerator)) is not None:
        resumed_from = position.step
        # the divergence limit stays that of the uninterrupted run: its first step's loss, from the metrics file
        first_loss = next((r["loss"] for r in read_metrics(output_dir / METRICS_FILE) if r["step"] == 1), None)
    objective.to(accelerator.device)
    order = WindowOrder(len(windows), config.batch_size, config.seed)
    tokens_per_step = config.batch_size * windows.shape[1] * config.grad_accum * accelerator.num_processes
    last_loss = record = None
    vocab_size = causal_lm(accelerator.unwrap_model(student)).config.vocab_size
    with MetricsLog(
        output_dir / METRICS_FILE, config.steps, position.step, accelerator.is_main_process, config.description
    ) as log:
        while position.step < config.steps:
            lr = scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler moves on after it)
            try:
                values = _one_step(
                    accelerator, student, extras, optimizer, scheduler, objective, windows, order, position, config
                )
                _check_divergence(values["loss"], first_loss, vocab_size, position.step + 1, lr)
            except TrainingDiverged as err:
                kept = _keep_good_checkpoints(accelerator, checkpoints, position.step)
                raise TrainingDiverged(f"{err}; {kept}") from err
            if after_step is not None:
                after_step()
            position.step += 1
            record = log.step(position.step, {**values, "lr": lr}, tokens_per_step)
            first_loss = values["loss"] if first_loss is None else first_loss
            last_loss = values["loss"]
            if (
                config.checkpoint_every
                and position.step % config.checkpoint_every == 0
                and position.step < config.steps
            ):
                save_checkpoint(
                    accelerator,
                    checkpoints,
                    position.step,
                    {"micro_batch": position.micro_batch},
                    config.keep_checkpoints,
                )
            if on_step is not None:
                on_step(position.step, record)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(student, keep_fp32_wrapper=False)  # no autocast left on the returned model
    if skeleton is not None:  # sharded parameters: every rank gets the full trained weights in a plain model
        model = plain_model(skeleton, model, accelerator)
    if config.gradient_checkpointing:
        _activation_checkpointing(model, False)
    model.eval()
    accelerator.free_memory()
    return TrainResult(
        model,
        position.step,
        resumed_from,
        first_loss,
        last_loss,
        output_dir / METRICS_FILE,
        record["tokens_per_s"] if record else None,
    )


def _check_divergence(loss: float, first_loss: float | None, vocab_size: int, step: int, lr: float) -> None:
    if first_loss is None:
        return
    limit = max(DIVERGED_FACTOR * first_loss, math.log(vocab_size))
    if loss > limit:
        raise TrainingDiverged(
            f"training diverged at step {step}: loss {loss:.4g} is above {limit:.4g} (the larger of "
            f"{DIVERGED_FACTOR:g}× the first step's {first_loss:.4g} and log(vocab) {math.log(vocab_size):.3g}) at "
            f"lr {lr:.3g}; lower lr"
        )


def _keep_good_checkpoints(accelerator, root: Path, steps_done: int) -> str:
    """After divergence at step steps_done + 1: the checkpoint of step steps_done holds the weights that produced
    the bad loss and goes; older ones stay. Returns what is left, for the error message."""
    if accelerator.is_main_process:
        remove_checkpoints_from(root, steps_done)
    kept = latest_checkpoint(root)
    return f"last good checkpoint kept: {kept}" if kept else "no checkpoint before it to keep"


def _one_step(
    accelerator, student, extras, optimizer, scheduler, objective, windows, order, position, config: TrainConfig
) -> dict[str, float]:
    """grad_accum micro-batches, one optimizer step; returns the step's losses averaged over micro-batches and
    processes."""
    sums: dict[str, float] = {}
    rank, world = accelerator.process_index, accelerator.num_processes
    for _ in range(config.grad_accum):
        window_ids = order.batch(position.micro_batch, rank, world)
        batch = Batch(windows[window_ids].to(accelerator.device), window_ids, position.micro_batch)
        with accelerator.accumulate(student, *extras):
            with accelerator.autocast():
                loss, parts = objective(student, batch)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged at step {position.step + 1}: the loss became {loss.item()} "
                    f"(micro-batch {position.micro_batch}); lower lr (now {config.lr:g}) or check "
                    "the data"
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                # The model's own parameter list when it is alone: accelerate then uses FSDP's sharded clipping.
                clipped = list(student.parameters()) + [p for extra in extras for p in extra.parameters()]
                accelerator.clip_grad_norm_(clipped, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        position.micro_batch += 1
        for name, value in {"loss": loss.item(), **parts}.items():
            sums[name] = sums.get(name, 0.0) + value / config.grad_accum
    scheduler.step()
    names = sorted(sums)
    averaged = accelerator.reduce(torch.tensor([sums[n] for n in names], device=accelerator.device), "mean")
    return {name: float(value) for name, value in zip(names, averaged.tolist()) if math.isfinite(value)}
