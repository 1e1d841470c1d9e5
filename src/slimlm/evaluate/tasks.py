"""Downstream tasks through lm-evaluation-harness, on an in-memory model and the shared offline data.

The six builtin tasks are lm-eval YAMLs in the ``tasks/`` folder beside this file (registered there as
``slimlm_<name>``, so they never clash with lm-eval's own tasks of the same name). They reproduce lm-eval's prompts
and metrics but read the files in the shared data folder instead of the Hugging Face Hub. Any other name is handed
to lm-eval's own registry as is.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.evaluate.records import Record
from slimlm.paths import shared_data_dir

BUILTIN_TASKS: tuple[str, ...] = ("triviaqa", "piqa", "arc_easy", "boolq", "hellaswag", "sst2")

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
HARNESS = f"lm_eval {version('lm_eval')}"
_LM_EVAL_PREFIX = "slimlm_"
# Metrics whose values are shares of documents (or means of per-document scores in [0, 1]).
_FRACTION_METRICS = {"acc", "acc_norm", "exact_match", "f1"}
# lm-eval bootstraps the stderr of non-mean metrics (e.g. another task's f1) with 100,000 draws by default: slow.
_BOOTSTRAP_ITERS = 1000


def run_tasks(
    model: Any, tokenizer: Any, tasks: list[str], limit: int | None = None, batch_size: int = 8, seed: int = 0
) -> list[Record]:
    """Evaluate `model` zero-shot on each task; one Record per (task, metric).

    `limit` caps the documents per task (the first `limit`, in file order); None evaluates them all.
    Each task runs on its own, seeded with `seed`, so a task's figures do not depend on which tasks came before.
    """
    _check_arguments(tasks, limit, batch_size)
    data_dir = shared_data_dir() if any(task in BUILTIN_TASKS for task in tasks) else None
    records: list[Record] = []
    with _quiet_harness():
        from lm_eval.models.huggingface import HFLM

        needs_lm_eval_registry = any(task not in BUILTIN_TASKS for task in tasks)
        manager = _task_manager(needs_lm_eval_registry, str(data_dir) if data_dir else None)
        _check_known(tasks, manager)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        for task in tasks:
            records += _run_task(lm, manager, task, limit, batch_size, seed, data_dir)
    return records


def _check_arguments(tasks: list[str], limit: int | None, batch_size: int) -> None:
    if not tasks:
        raise SlimlmError(f"no tasks given; builtin tasks are {', '.join(BUILTIN_TASKS)}")
    # lm-eval reads a limit below 1 as a fraction of the documents: ours is always a count.
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SlimlmError(f"limit must be a whole number of documents >= 1 or None, got {limit!r}")
    if batch_size < 1:
        raise SlimlmError(f"batch_size must be >= 1, got {batch_size!r}")
    if len(set(tasks)) != len(tasks):
        raise SlimlmError(f"tasks must not repeat, got {', '.join(tasks)}")


@functools.cache
def _task_manager(needs_lm_eval_registry: bool, data_dir: str | None) -> Any:
    """One TaskManager per setting, kept: indexing lm-eval's thousands of bundled YAMLs takes ~10 s, so that
    registry is only indexed when a task needs it, and only once per process."""
    from lm_eval.tasks import TaskManager

    # TaskManager metadata reaches every task's `custom_dataset` loader (see tasks/utils.py).
    metadata = {"data_dir": data_dir} if data_dir else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_lm_eval_registry, metadata=metadata)


def check_task_names(tasks: list[str]) -> None:
    """Refuse a task name that is neither builtin nor in lm-eval's registry (indexed only when a name needs it)."""
    others = [task for task in tasks if task not in BUILTIN_TASKS]
    if others:
        with _quiet_harness():
            _check_known(others, _task_manager(True, None))


def _check_known(tasks: list[str], manager: Any) -> None:
    for task in tasks:
        if task not in BUILTIN_TASKS and task not in manager.all_tasks:
            raise SlimlmError(
                f"unknown task {task!r}: builtin tasks are {', '.join(BUILTIN_TASKS)}, "
                "other names must be lm-eval task names"
            )


def _lm_eval_name(task: str) -> str:
    return _LM_EVAL_PREFIX + task if task in BUILTIN_TASKS else task


def _our_name(lm_eval_name: str) -> str:
    return lm_eval_name.removeprefix(_LM_EVAL_PREFIX)


def _run_task(
    lm: Any, manager: Any, task: str, limit: int | None, batch_size: int, seed: int, data_dir: Path | None
) -> list[Record]:
    from lm_eval import simple_evaluate

    started = time.perf_counter()
    try:
        output = simple_evaluate(
            model=lm,
            tasks=[_lm_eval_name(task)],
            task_manager=manager,
            num_fewshot=0,
            limit=limit,
            batch_size=batch_size,
            bootstrap_iters=_BOOTSTRAP_ITERS,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except SlimlmError:
        raise
    except Exception as error:  # lm-eval raises anything from KeyError to ConnectionError: make it one line.
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise SlimlmError(f"task {task!r} failed in lm-eval: {reason[:300]}") from error
    wall_s = round(time.perf_counter() - started, 2)
    common = {"harness": HARNESS, "num_fewshot": 0, "limit": limit, "seed": seed, "batch_size": batch_size}
    return [
        record
        for name in output["results"]
        for record in _records_of(name, output, {**common, "wall_s": wall_s}, data_dir)
    ]


def _records_of(
    lm_eval_name: str, output: dict[str, Any], common: dict[str, Any], data_dir: Path | None
) -> list[Record]:
    """Records for one lm-eval task (or group) of a `simple_evaluate` output."""
    config = output["configs"].get(lm_eval_name, {})
    task_metadata = config.get("metadata") or {}
    counts = output["n-samples"].get(lm_eval_name, {})
    protocol = {**common, **_data_protocol(task_metadata, data_dir), "docs": counts.get("effective")}
    if config.get("output_type") == "generate_until":
        protocol["generation"] = config.get("generation_kwargs")
    higher_is_better = output["higher_is_better"].get(lm_eval_name, {})
    records = []
    for key, value in output["results"][lm_eval_name].items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue  # "alias", "name", "sample_len" and the stderr entries read below
        stderr = output["results"][lm_eval_name].get(f"{metric}_stderr,{filter_name}")
        records.append(
            Record(
                task=_our_name(lm_eval_name),
                metric=metric if filter_name == "none" else f"{metric},{filter_name}",
                value=float(value),
                unit="fraction" if metric in _FRACTION_METRICS else "",
                higher_is_better=higher_is_better.get(metric),
                protocol={**protocol, **({"stderr": float(stderr)} if isinstance(stderr, (int, float)) else {})},
                note=task_metadata.get("note", ""),
            )
        )
    return records


def _data_protocol(task_metadata: dict[str, Any], data_dir: Path | None) -> dict[str, Any]:
    """Which local file a builtin task read, with its hash; lm-eval's own tasks name their Hub dataset instead."""
    data_file = task_metadata.get("data_file")
    if not data_file or data_dir is None:
        return {}
    return {"data": data_file, "sha256": _sha256_prefix(data_dir / data_file)}


def _sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """lm-eval logs every step at INFO/WARNING and a few paths print(): keep stdout clean for `--json`."""
    import datasets

    lm_eval_logger = logging.getLogger("lm_eval")
    previous_level = lm_eval_logger.level
    bars_were_enabled = datasets.is_progress_bar_enabled()
    lm_eval_logger.setLevel(logging.ERROR)
    datasets.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        lm_eval_logger.setLevel(previous_level)
        if bars_were_enabled:
            datasets.enable_progress_bar()
