"""One call that measures a model the way every report needs it: quality, size, memory, speed."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from slimlm.data import NAMED_SOURCES, load_text
from slimlm.errors import SlimlmError
from slimlm.evaluate.records import Record

PERPLEXITY_TASKS = NAMED_SOURCES  # wikitext2, wikitext2-valid, c4: scored with slimlm's fixed-window protocol


def is_perplexity_task(task: str) -> bool:
    return task in PERPLEXITY_TASKS or Path(task).suffix in (".txt", ".raw", ".jsonl", ".parquet")


def check_finite(model) -> None:
    """A NaN or Inf anywhere in the weights turns every figure into nan: refuse, naming the first such tensor."""
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point() and tensor.device.type != "meta":
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            if bad:
                raise SlimlmError(
                    f"{name}: {bad} of {tensor.numel()} values are not finite (NaN/Inf); the model cannot be evaluated"
                )


def evaluate_model(
    model,
    tokenizer,
    config,
    reference=None,
    model_path: str | Path | None = None,
    footprint: bool = True,
) -> list[Record]:
    """Run the recipe's evaluation (`config` is a recipe.EvaluateConfig) and return every figure as a Record.

    `reference` (the original model) adds KL divergence and top-1 agreement to each perplexity task.
    `model_path` is what was saved (folder or GGUF file), for size on disk.
    """
    from slimlm.evaluate import footprint as footprint_module
    from slimlm.evaluate.perplexity import perplexity_records

    check_finite(model)
    records: list[Record] = []
    for task in config.tasks:
        if is_perplexity_task(task):
            records += perplexity_records(
                model, tokenizer, load_text(task), task, config.seq_len, config.limit, reference
            )
    harness_tasks = [task for task in config.tasks if not is_perplexity_task(task)]
    if harness_tasks:
        from slimlm.evaluate.tasks import run_tasks

        # per-task prompt protocols (chat template, few-shot) from the recipe; others run their measured default
        protocols = config.task_protocols
        records += run_tasks(model, tokenizer, harness_tasks, limit=config.task_limit, protocols=protocols)
    if footprint:
        records += footprint_module.footprint_records(model, model_path)
    if config.speed:
        from slimlm.evaluate.speed import measure_speed
        from slimlm.storage import kernel_summary as kernel_label

        # which matmul ran (dense, a low-bit kernel, or dequantize-then-multiply) goes with every speed figure
        records += measure_speed(
            model,
            tokenizer,
            prompt_tokens=config.prompt_tokens,
            new_tokens=config.new_tokens,
            kernel=kernel_label(model),
        )
    return records
