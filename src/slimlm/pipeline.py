"""Run a recipe: evaluate the original (cached), apply each stage, save and evaluate after each (or after the last
only: `evaluate.after`), write the report.

Layout of the output folder::

    state.json            what has finished (written atomically after every stage; --resume reads it)
    stages/01-prune/      the model after stage 1 (safetensors + config + tokenizer + slimlm_stage.json)
    model/                the final model (hard links to the last stage's files)
    report.md, report.json, plots/*.png

A streamed run (the recipe's `stream`, preflight.streaming_choice) never holds the whole model: each stage streams
its source folder (the model folder, then the previous stage's folder) layer by layer into its own stage folder
(streaming.py), the original is read a layer at a time when a stage compares with it (EoRA), and only sizes on disk
and the stage's peak memory are recorded: perplexity, tasks and speed need the whole model (`slimlm eval` on a
folder where it fits).

Under ``accelerate launch`` every rank runs the recipe (training stages are collective), but only rank 0 evaluates
and writes the folder; the other ranks write nothing but their training shards and RNG states in scratch/.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from transformers import AutoTokenizer

from slimlm import __version__
from slimlm.calibration import Calibration
from slimlm.errors import SlimlmError
from slimlm.evaluate.records import Record
from slimlm.models import LoadedModel, load_model, resolve_source, save_model, source_fingerprint, torch_dtype
from slimlm.paths import cache_dir
from slimlm.preflight import streaming_choice
from slimlm.recipe import EvaluateConfig, Recipe, check_recipe
from slimlm.recover.distributed import is_main_process
from slimlm.registry import StageContext, get_stage
from slimlm.storage import read_config
from slimlm.streaming import layer_stream, load_streamed, streamed_reference

STATE_FILE = "state.json"
STAGE_META_FILE = "slimlm_stage.json"
# Bump when evaluation code changes what a cached figure means.
EVAL_CACHE_VERSION = "2"  # 2: speed records carry their spread and the machine's load
# What a run writes besides scratch/: a fresh run into the folder of an earlier one removes them first, so no
# stage folder or plot of the earlier run is left beside the new report.
RUN_OUTPUTS = ("stages", "model", "report.md", "report.json", "plots", "export")


def write_json_atomic(path: Path, payload) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


@dataclass
class RunState:
    fingerprint: str
    completed: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, out_dir: Path) -> RunState | None:
        path = out_dir / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(data["fingerprint"], data["completed"])

    def save(self, out_dir: Path) -> None:
        write_json_atomic(out_dir / STATE_FILE, {"fingerprint": self.fingerprint, "completed": self.completed})


def evaluate_measured(model, tokenizer, config: EvaluateConfig, reference, model_path) -> list[Record]:
    """Evaluation plus the peak memory it took."""
    from slimlm.evaluate.footprint import PeakMemory, peak_memory_record
    from slimlm.evaluate.suite import evaluate_model

    with PeakMemory() as peak:
        records = evaluate_model(model, tokenizer, config, reference=reference, model_path=model_path)
    return [*records, peak_memory_record(peak, "eval")]


def evaluate_original(loaded: LoadedModel, config: EvaluateConfig) -> tuple[list[Record], bool]:
    """The original's figures, cached by weights hash and evaluation protocol: later runs do not pay again."""
    key_source = json.dumps(
        {
            "weights": source_fingerprint(loaded.source),
            "protocol": config.model_dump(mode="json"),
            "dtype": str(loaded.model.dtype),
            "version": EVAL_CACHE_VERSION,
        },
        sort_keys=True,
    )
    import hashlib

    path = cache_dir() / "evals" / f"{hashlib.sha256(key_source.encode()).hexdigest()[:24]}.json"
    if path.is_file():
        return [Record.from_dict(r) for r in json.loads(path.read_text())], True
    records = evaluate_measured(loaded.model, loaded.tokenizer, config, None, loaded.source.weights_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, [r.to_dict() for r in records])
    return records, False


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_partial_saves(out: Path) -> None:
    """Temporary folders and files of saves a killed run left (models.save_model, _link_final_model,
    write_json_atomic): never read, only in the way."""
    for folder in (out, out / "stages"):
        for pattern in (".*.tmp-*", ".*.partial"):  # .partial: a streamed stage's folder (streaming.LayerStream)
            for path in folder.glob(pattern):
                _remove(path)


def _remove_earlier_run(out: Path) -> None:
    """A fresh run into the folder of an earlier run (it has a state.json): the earlier stage folders, final model,
    report and plots go; scratch/ (teacher caches, keyed by content) stays."""
    if (out / STATE_FILE).is_file():
        for name in RUN_OUTPUTS:
            _remove(out / name)


def _stage_label(index: int, name: str) -> str:
    return f"{index:02d}-{name}"


def _link_final_model(stage_folder: Path, final: Path) -> None:
    """The final model folder shares the last stage's files (hard links), so it costs no extra disk."""
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    for file in stage_folder.iterdir():
        try:
            os.link(file, tmp / file.name)
        except OSError:
            shutil.copy2(file, tmp / file.name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _disk_records(folder: str | Path) -> list[Record]:
    """Size on disk of a model folder: for a streamed run, which cannot evaluate the whole model, and the stages
    before the last under `evaluate.after: last_stage`."""
    from slimlm.evaluate.footprint import size_on_disk, weight_files

    protocol = {"path": str(folder), "files": [f.name for f in weight_files(folder)]}
    return [Record("size", "size_on_disk", size_on_disk(folder), "bytes", False, protocol)]


class Pipeline:
    def __init__(self, recipe: Recipe, resume: bool = False):
        self.recipe = recipe
        self.out = Path(recipe.output)
        self.resume = resume
        self.writes = is_main_process()  # the only process, or rank 0 under accelerate launch
        self.streaming = None  # preflight.StreamingChoice, made when the run starts

    def _initial_state(self) -> RunState:
        if self.out.exists() and not self.out.is_dir():
            raise SlimlmError(f"output: {self.out} is a file; expected a folder (or a path that does not exist yet)")
        fingerprint = self.recipe.fingerprint()
        previous = RunState.load(self.out) if self.resume else None
        if self.resume and previous is None:
            raise SlimlmError(f"--resume: {self.out / STATE_FILE} not found; nothing to resume")
        if previous is not None and previous.fingerprint != fingerprint:
            raise SlimlmError(
                f"--resume: {self.out} holds a run of a different recipe; use another output folder or drop --resume"
            )
        return previous or RunState(fingerprint)

    def run(self) -> dict:
        check_recipe(self.recipe)  # the model's config against the stages, data and tasks: before anything is written
        self.streaming = streaming_choice(self.recipe)
        state = self._initial_state()
        # Nothing is written before the original loads and evaluates: a bad model or task leaves no folder behind.
        loaded, original_records, cached = self._original()
        self._prepare_folder(state)
        model = self._starting_model(loaded, state)
        calibration = Calibration(self.recipe.calibration, loaded.tokenizer)
        context = StageContext(loaded.tokenizer, calibration, self.out / "scratch", self._original_loader(loaded))
        for index, stage in enumerate(self.recipe.stages, start=1):
            if index <= len(state.completed):
                continue
            model = self._run_stage(index, stage, model, loaded, context, state)
        if not self.writes:
            return self._summary(loaded, original_records, cached, state)
        self._write_final_model(loaded, state)
        exports = self._export(model, loaded)
        summary = self._summary(loaded, original_records, cached, state)
        summary["exports"] = exports
        from slimlm.report import write_report

        write_report(summary, self.out)
        return summary

    def _prepare_folder(self, state: RunState) -> None:
        if not self.writes:
            return
        if not self.resume:
            _remove_earlier_run(self.out)
        _remove_partial_saves(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        state.save(self.out)

    def _original(self) -> tuple[LoadedModel, list[Record], bool]:
        """The original model and its figures (cached or not); a streamed run reads only its tokenizer and size."""
        if not self.streaming.streamed:
            loaded = load_model(self.recipe.model, self.recipe.dtype)
            if not self.writes:
                return loaded, [], False
            return (loaded, *evaluate_original(loaded, self.recipe.evaluate))
        source = resolve_source(self.recipe.model)
        config = read_config(source.path)[0]  # passed on: config.json's model type may be `slimlm` (storage.py)
        tokenizer = AutoTokenizer.from_pretrained(source.path, config=config)
        return LoadedModel(None, tokenizer, source), _disk_records(source.path), False

    def _original_loader(self, loaded: LoadedModel):
        """What a stage calls for the uncompressed model: the loaded one, or a streamed reference read per layer."""
        if not self.streaming.streamed:
            return lambda: loaded.model
        return lambda: streamed_reference(loaded.source.path, torch_dtype(self.recipe.dtype))

    def _starting_model(self, loaded: LoadedModel, state: RunState):
        if self.streaming.streamed:
            return None  # every stage streams its source folder (_stream_source)
        if state.completed:
            folder = self.out / state.completed[-1]["folder"]
            return load_model(str(folder), self.recipe.dtype).model
        # Stages change weights in place; the loaded original stays untouched as the reference and teacher.
        return copy.deepcopy(loaded.model)

    def _run_stage(self, index, stage, model, loaded, context, state):
        from slimlm.evaluate.footprint import PeakMemory, peak_memory_record

        spec = get_stage(stage.name)
        label = _stage_label(index, stage.name)
        folder = self.out / "stages" / label
        streamed = self.streaming.streamed
        context.notes = [self._streaming_note(state)] if streamed else []
        started = time.perf_counter()
        with PeakMemory() as peak:
            if streamed:
                model = load_streamed(self._stream_source(state), folder, torch_dtype(self.recipe.dtype))
            model = spec.apply(model, stage.options, context) or model
        seconds = time.perf_counter() - started
        notes = list(context.notes)
        meta = {
            "stage": stage.name,
            "options": stage.options.model_dump(mode="json"),
            "seconds": seconds,
            "notes": notes,
        }
        if streamed:
            layer_stream(model).finish(loaded.tokenizer, extra_json={STAGE_META_FILE: meta})
            records = _disk_records(folder)
        elif not self.writes:
            records = []  # rank 0 saves and evaluates the stage; the others go on to the next one
        else:
            save_model(model, loaded.tokenizer, folder, extra_json={STAGE_META_FILE: meta})
            if self.recipe.evaluate.after == "every_stage" or index == len(self.recipe.stages):
                records = evaluate_measured(model, loaded.tokenizer, self.recipe.evaluate, loaded.model, folder)
            else:
                records = _disk_records(folder)
        records.append(peak_memory_record(peak, "stage"))
        state.completed.append(
            {
                "index": index,
                "name": stage.name,
                "label": label,
                "folder": f"stages/{label}",
                "seconds": seconds,
                "options": meta["options"],
                "notes": notes,
                "records": [r.to_dict() for r in records],
            }
        )
        if self.writes:
            state.save(self.out)
        return model

    def _stream_source(self, state: RunState) -> Path:
        """The folder a streamed stage reads: the previous stage's, or the model's."""
        return (
            self.out / state.completed[-1]["folder"]
            if state.completed
            else Path(resolve_source(self.recipe.model).path)
        )

    def _streaming_note(self, state: RunState) -> str:
        return (
            f"streamed layer by layer in {self.recipe.dtype} from {self._stream_source(state)} "
            f"({self.streaming.reason}); only the size on "
            "disk and the peak memory are measured: perplexity, tasks and speed need the whole model in memory "
            "(slimlm eval on the stage folder where it fits)"
        )

    def _write_final_model(self, loaded: LoadedModel, state: RunState) -> None:
        final = self.out / "model"
        if state.completed:
            _link_final_model(self.out / state.completed[-1]["folder"], final)
        else:
            save_model(loaded.model, loaded.tokenizer, final)

    def _export(self, model, loaded: LoadedModel) -> list[dict]:
        """The recipe's export targets, written into <output>/export/ (each atomically, by its exporter)."""
        from slimlm.export.options import export_model

        written = []
        for target in self.recipe.export:
            path = self.out / "export" / target.name
            path.parent.mkdir(parents=True, exist_ok=True)
            summary = export_model(model, loaded.tokenizer, target, path)
            entry = {"format": target.format, "path": str(path), "bytes": summary.bytes, "line": summary.line()}
            if target.format == "gguf" and loaded.source.gguf_bytes:  # GGUF beside GGUF
                entry["original_gguf_bytes"] = loaded.source.gguf_bytes
            written.append(entry)
        return written

    def _summary(self, loaded, original_records, cached, state) -> dict:
        from slimlm.evaluate.machine import machine_info

        return {
            "slimlm_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "recipe": self.recipe.to_yaml_dict(),
            "machine": machine_info(),
            "original": {
                "name": "original",
                "description": loaded.source.description,
                "source": loaded.source.spec,
                "path": loaded.source.weights_path,
                "records": [r.to_dict() for r in original_records],
                "cached": cached,
            },
            "stages": state.completed,
            "streaming": {"streamed": self.streaming.streamed, "reason": self.streaming.reason},
            "model_folder": "model",
        }


def run_recipe(recipe: Recipe, resume: bool = False) -> dict:
    return Pipeline(recipe, resume).run()
