"""Downstream tasks through lm-evaluation-harness, on an in-memory model and the shared offline data.

The six builtin tasks are lm-eval YAMLs in the ``tasks/`` folder beside this file (registered there as
``slimlm_<name>``, so they never clash with lm-eval's own tasks of the same name). They reproduce lm-eval's prompts
and metrics but read the files in the shared data folder instead of the Hugging Face Hub. Any other name is handed
to lm-eval's own registry as is.

How a task is prompted (its template, plain text or the model's chat template, zero- or few-shot) is its
TaskProtocol; each builtin task has a default chosen by measurement (benchmarks/task_protocols.py), and every Record
names the protocol it ran. A template other than lm-eval's is a YAML ``<task>_<prompt>.yaml`` beside the task's own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
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


@dataclass(frozen=True)
class TaskProtocol:
    """How lm-eval builds a task's prompts: the template, its `apply_chat_template`, `num_fewshot` and
    `fewshot_as_multiturn`.

    `prompt` is "lm-eval" (the template of lm-eval's own task) or the name of a variant YAML `<task>_<prompt>.yaml`.
    `fewshot_as_multiturn` gives each example its own user/assistant turn; without it lm-eval folds the examples
    into the one user message. It only means something with the chat template and at least one example.
    """

    prompt: str = "lm-eval"
    chat_template: bool = False
    num_fewshot: int = 0
    fewshot_as_multiturn: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise SlimlmError(f"prompt must be a template name such as 'lm-eval', got {self.prompt!r}")
        for name in ("chat_template", "fewshot_as_multiturn"):
            if not isinstance(getattr(self, name), bool):
                raise SlimlmError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.num_fewshot, bool) or not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise SlimlmError(f"num_fewshot must be a whole number >= 0, got {self.num_fewshot!r}")
        if self.fewshot_as_multiturn and not (self.chat_template and self.num_fewshot > 0):
            raise SlimlmError("fewshot_as_multiturn needs chat_template: true and num_fewshot >= 1")

    @classmethod
    def of(cls, task: str, options: TaskProtocol | Mapping[str, Any]) -> TaskProtocol:
        """A protocol from a recipe's mapping (or one already built); bad keys or values name the task."""
        if isinstance(options, TaskProtocol):
            return options
        if not isinstance(options, Mapping):
            raise SlimlmError(f"task protocol of {task!r} must be a mapping, got {options!r}")
        allowed = [field.name for field in fields(cls)]
        unknown = [key for key in options if key not in allowed]
        if unknown:
            raise SlimlmError(f"task protocol of {task!r}: unknown {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        try:
            protocol = cls(**options)
        except SlimlmError as error:
            raise SlimlmError(f"task protocol of {task!r}: {error}") from None
        prompts = prompt_variants(task)
        if protocol.prompt not in prompts:
            raise SlimlmError(
                f"task protocol of {task!r}: unknown prompt {protocol.prompt!r}; {task} has {', '.join(prompts)}"
            )
        return protocol


def prompt_variants(task: str) -> list[str]:
    """The templates a task can run with: lm-eval's, then each variant YAML of a builtin task."""
    if task not in BUILTIN_TASKS:
        return ["lm-eval"]
    return ["lm-eval", *sorted(path.stem.removeprefix(f"{task}_") for path in TASKS_DIR.glob(f"{task}_*.yaml"))]


# Chosen by measurement on SmolLM2-135M-Instruct against the same model 50 % magnitude-pruned, first 200 documents
# (benchmarks/task_protocols.py, results/task_protocols.json): the protocol under which the original scores clearly
# above the broken model. TriviaQA: exact match 0.065 vs 0.000 plain 5-shot (3.7 standard errors; 0-shot and chat
# 0-shot leave the original at 0, chat 5-shot multiturn at 0.010). SST-2: accuracy 0.780 vs 0.575 with the Review
# template (4.5 standard errors); lm-eval's own template is at chance plain or chat, 0- or 5-shot. The chat template
# helps neither task for this model. Other tasks: lm-eval's plain zero-shot, as before.
DEFAULT_PROTOCOLS: dict[str, TaskProtocol] = {
    **{task: TaskProtocol() for task in BUILTIN_TASKS},
    "triviaqa": TaskProtocol(num_fewshot=5),
    "sst2": TaskProtocol(prompt="review"),
}


def task_protocols(
    tasks: list[str], overrides: Mapping[str, TaskProtocol | Mapping[str, Any]] | None = None
) -> dict[str, TaskProtocol]:
    """Each task's protocol: its override if given, else its default (plain zero-shot for lm-eval's own tasks)."""
    overrides = overrides or {}
    strays = [task for task in overrides if task not in tasks]
    if strays:
        raise SlimlmError(f"task protocols given for {', '.join(strays)}, which are not among the tasks run")
    defaults = {task: DEFAULT_PROTOCOLS.get(task, TaskProtocol()) for task in tasks}
    return {**defaults, **{task: TaskProtocol.of(task, options) for task, options in overrides.items()}}


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    protocols: Mapping[str, TaskProtocol | Mapping[str, Any]] | None = None,
) -> list[Record]:
    """Evaluate `model` on each task under its protocol (see `task_protocols`); one Record per (task, metric).

    `limit` caps the documents per task (the first `limit`, in file order); None evaluates them all.
    Each task runs on its own, seeded with `seed`, so a task's figures do not depend on which tasks came before.
    """
    _check_arguments(tasks, limit, batch_size)
    chosen = task_protocols(tasks, protocols)
    _check_chat_template(tokenizer, chosen)
    data_dir = shared_data_dir() if any(task in BUILTIN_TASKS for task in tasks) else None
    records: list[Record] = []
    with _quiet_harness():
        from lm_eval.models.huggingface import HFLM

        needs_lm_eval_registry = any(task not in BUILTIN_TASKS for task in tasks)
        manager = _task_manager(needs_lm_eval_registry, str(data_dir) if data_dir else None)
        _check_known(tasks, manager)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        for task in tasks:
            records += _run_task(lm, manager, task, chosen[task], limit, batch_size, seed, data_dir)
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


def _check_chat_template(tokenizer: Any, protocols: dict[str, TaskProtocol]) -> None:
    wanting = [task for task, protocol in protocols.items() if protocol.chat_template]
    if wanting and not getattr(tokenizer, "chat_template", None):
        raise SlimlmError(
            f"chat_template is true for {', '.join(wanting)} but the tokenizer has no chat template; "
            "set chat_template: false for a base model"
        )


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


def _lm_eval_name(task: str, prompt: str = "lm-eval") -> str:
    if task not in BUILTIN_TASKS:
        return task
    return f"{_LM_EVAL_PREFIX}{task}" + ("" if prompt == "lm-eval" else f"_{prompt}")


def _our_name(lm_eval_name: str) -> str:
    return lm_eval_name.removeprefix(_LM_EVAL_PREFIX)


def _run_task(
    lm: Any,
    manager: Any,
    task: str,
    protocol: TaskProtocol,
    limit: int | None,
    batch_size: int,
    seed: int,
    data_dir: Path | None,
) -> list[Record]:
    from lm_eval import simple_evaluate

    ran = _lm_eval_name(task, protocol.prompt)
    started = time.perf_counter()
    try:
        output = simple_evaluate(
            model=lm,
            tasks=[ran],
            task_manager=manager,
            # lm-eval keeps a YAML's own `num_fewshot: 0` over this argument: our YAMLs leave it unset.
            num_fewshot=protocol.num_fewshot,
            apply_chat_template=protocol.chat_template,
            fewshot_as_multiturn=protocol.fewshot_as_multiturn,
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
    common = {"harness": HARNESS, **asdict(protocol), "limit": limit, "seed": seed, "batch_size": batch_size}
    return [
        record
        for name in output["results"]
        # a prompt variant's records carry the task's own name; a group's subtasks keep theirs
        for record in _records_of(
            name, task if name == ran else _our_name(name), output, {**common, "wall_s": wall_s}, data_dir
        )
    ]


def _records_of(
    lm_eval_name: str, task: str, output: dict[str, Any], common: dict[str, Any], data_dir: Path | None
) -> list[Record]:
    """Records for one lm-eval task (or group) of a `simple_evaluate` output."""
    config = output["configs"].get(lm_eval_name, {})
    task_metadata = config.get("metadata") or {}
    counts = output["n-samples"].get(lm_eval_name, {})
    protocol = {**common, **_data_protocol(task_metadata, data_dir), "docs": counts.get("effective")}
    if common["num_fewshot"]:
        protocol["fewshot_split"] = _fewshot_source(config)
    if "chance" in task_metadata:  # the score of guessing: a report marks figures that do not beat it
        protocol["chance"] = task_metadata["chance"]
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
                task=task,
                metric=metric if filter_name == "none" else f"{metric},{filter_name}",
                value=float(value),
                unit="fraction" if metric in _FRACTION_METRICS else "",
                higher_is_better=higher_is_better.get(metric),
                protocol={**protocol, **({"stderr": float(stderr)} if isinstance(stderr, (int, float)) else {})},
                note=task_metadata.get("note", ""),
            )
        )
    return records


def _fewshot_source(config: dict[str, Any]) -> str:
    """Where lm-eval drew the examples from: as in its ConfigurableTask.fewshot_docs, the few-shot split, else the
    training split, else the evaluated split with the document itself left out (its sampler does that)."""
    split = config.get("fewshot_split") or config.get("training_split")
    if split:
        return split
    return f"{config.get('validation_split') or config.get('test_split')} (other documents than the one asked)"


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
