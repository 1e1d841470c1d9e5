"""`slimlm auto` end to end: budget -> sensitivity -> allocation -> candidates verified by evaluation -> report.

Phases, each with progress: the calibration walk (probe.py), the sensitivity figures (sensitivity.py, cached on
disk and reused), the allocation (allocate.py), then every candidate and baseline written and scored for real
(the target's own scorer). What has been scored is kept in ``<output>/state.json`` (written atomically after each
one): ``--resume`` continues a killed run from there, with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimlm.auto.allocate import Solution, allocate, uniform_solution
from slimlm.auto.budget import parse_budget
from slimlm.auto.probe import Probe
from slimlm.auto.sensitivity import CostCache, measure
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import parameter_counts
from slimlm.paths import cache_dir, shared_data_dir
from slimlm.pipeline import write_json_atomic
from slimlm.progress import progress_bar

CACHE_VERSION = "1"  # bump when a figure in the sensitivity cache changes meaning
GGUF_BASELINES = ("Q8_0", "Q4_K_M", "IQ4_NL", "Q4_0", "Q3_K_M", "Q2_K")
GGUF_UNIFORM = ("Q8_0", "Q5_0", "Q4_0", "IQ4_NL")  # pure mixes the proxy can price too (Spearman points)
SLIMLM_UNIFORM = ("w8g32", "w4g32", "w4g64", "w4g128", "w3g64", "w2g64")


@dataclass
class AutoSettings:
    model: str
    budget: str
    target: str = "gguf"
    output: str = "runs/auto"
    resume: bool = False
    candidates: int = 4
    max_removed: int = 4
    calib_data: str = "c4"
    calib_samples: int = 2
    calib_seq_len: int = 256
    eval_chunks: int = 8  # gguf: llama-perplexity chunks of 512; slimlm: WikiText-2 windows of 512
    threads: int = 2
    # gguf: llama.cpp types scored beside (default GGUF_BASELINES); slimlm: uniform formats (SLIMLM_UNIFORM)
    baselines: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)  # formats the search may not use (e.g. Q4_1)
    work: str | None = None  # gguf: f32/uniform/baseline GGUFs and their scores (default <output>/work; shareable)

    def fingerprint(self) -> str:
        data = asdict(self)
        data.pop("resume")
        data.pop("output")
        data.pop("work")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _target(settings: AutoSettings, loaded, out: Path):
    if settings.target == "gguf":
        from slimlm.auto.gguf_target import GGUFTarget

        work = Path(settings.work) if settings.work else out / "work"
        return GGUFTarget(loaded.model, loaded.tokenizer, work, settings.threads, settings.exclude)
    if settings.target == "slimlm":
        from slimlm.auto.slimlm_target import SlimlmTarget

        return SlimlmTarget(loaded.model, exclude=settings.exclude)
    raise SlimlmError(f"--target {settings.target!r}: not one of gguf, slimlm")


def _state(out: Path, settings: AutoSettings) -> dict:
    path = out / "state.json"
    if settings.resume and path.is_file():
        state = json.loads(path.read_text())
        if state["fingerprint"] != settings.fingerprint():
            raise SlimlmError(f"--resume: {out} holds a run with other settings; drop --resume or use another --output")
        return state
    return {"fingerprint": settings.fingerprint(), "scores": {}, "phases": {}}


def run_auto(settings: AutoSettings) -> dict:
    from slimlm.data import calibration_windows, load_text
    from slimlm.models import load_model, source_fingerprint

    budget = parse_budget(settings.budget)
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    state = _state(out, settings)
    started = time.process_time(), time.perf_counter()
    loaded = load_model(settings.model)
    model = loaded.model
    target = _target(settings, loaded, out)
    parameters = parameter_counts(model)["total"]
    limit = budget.bytes(parameters)
    windows = calibration_windows(
        loaded.tokenizer, load_text(settings.calib_data), settings.calib_samples, settings.calib_seq_len, 0
    )
    probe = Probe(model, windows)
    items = target.items()
    key = json.dumps(
        [
            source_fingerprint(loaded.source),
            target.name,
            settings.calib_data,
            settings.calib_samples,
            settings.calib_seq_len,
            CACHE_VERSION,
        ]
    )
    cache = CostCache(cache_dir() / "auto" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.jsonl")
    removable = list(range(probe.layers)) if target.name == "gguf" and settings.max_removed else []
    costs = measure(probe, items, cache, removable)
    fixed = target.fixed_bytes(items)
    search_cpu, search_wall = time.process_time() - started[0], time.perf_counter() - started[1]
    solutions = allocate(costs, limit, fixed, settings.max_removed if removable else 0, settings.candidates)
    if not solutions:
        smallest = fixed(frozenset()) + sum(min(i.sizes) for i in items)
        raise SlimlmError(
            f"--budget {settings.budget}: {limit} bytes is below the smallest {target.name} output this search "
            f"can make ({smallest} bytes with every format at its smallest)"
        )
    uniform = _uniform_solutions(settings, costs, fixed)
    rows = _score_all(settings, target, solutions, uniform, state, out, loaded)
    summary = {
        "settings": asdict(settings),
        "budget": {"text": budget.text, "kind": budget.kind, "bytes": limit, "parameters": parameters},
        "search": {
            "cpu_s": search_cpu,
            "wall_s": search_wall,
            "new_figures": costs.new_figures,
            "cache": str(cache.path),
            "items": len(items),
            "options": sum(len(i.options) for i in items),
            "calibration": f"{settings.calib_samples} x {settings.calib_seq_len} tokens of {settings.calib_data}",
        },
        "rows": rows,
    }
    from slimlm.auto.report import write_report

    write_report(summary, out, target)
    return summary


def _uniform_solutions(settings: AutoSettings, costs, fixed) -> dict[str, Solution]:
    names = GGUF_UNIFORM if settings.target == "gguf" else (settings.baselines or SLIMLM_UNIFORM)
    found = {}
    for name in names:
        solution = uniform_solution(costs, name, fixed(frozenset()))
        if solution is not None:
            found[f"uniform {name}"] = solution
    return found


def _score_all(settings, target, solutions, uniform, state, out: Path, loaded) -> list[dict]:
    """Every candidate, uniform mix and llama.cpp baseline written and scored (what state.json has is kept)."""
    jobs = [(f"candidate {i + 1}", s) for i, s in enumerate(solutions)] + list(uniform.items())
    if settings.target == "gguf":
        jobs += [(f"llama.cpp {t}", None) for t in settings.baselines or GGUF_BASELINES]
    rows = []
    with progress_bar("auto: scoring", total=len(jobs)) as advance:
        for label, solution in jobs:
            row = {"label": label}
            if solution is not None:
                row |= {
                    "formats": solution.formats,
                    "removed": list(solution.removed),
                    "proxy_kl": solution.proxy,
                    "predicted_bytes": solution.bytes,
                }
            key = hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16]
            if key not in state["scores"]:
                state["scores"][key] = _score(settings, target, label, solution, out, loaded)
                write_json_atomic(out / "state.json", state)
            rows.append(row | state["scores"][key])
            advance(description=f"auto: scoring ({label})")
    return rows


def _score(settings, target, label: str, solution, out: Path, loaded) -> dict:
    slug = label.replace(" ", "-").replace(".", "")
    if settings.target == "gguf":
        text = shared_data_dir() / "wikitext-2-raw-v1" / "wiki.test.raw"
        if solution is None:
            path = target.llama_type(label.split()[-1], target.work / "llama" / f"{label.split()[-1]}.gguf")
        else:
            # named by what it holds, in the shared work folder: a mix another budget's run wrote is reused
            mix = hashlib.sha256(json.dumps([solution.formats, solution.removed], sort_keys=True).encode())
            path = target.work / "mixes" / f"{mix.hexdigest()[:16]}.gguf"
            if not path.is_file():
                target.write(solution.formats, solution.removed, path)
        return target.score(path, text, settings.eval_chunks) | {"path": str(path)}
    return _score_slimlm(settings, target, solution, out / "runs" / slug, loaded)


def _score_slimlm(settings, target, solution, folder: Path, loaded) -> dict:
    import yaml

    from slimlm.evaluate.footprint import size_on_disk
    from slimlm.pipeline import run_recipe
    from slimlm.recipe import parse_recipe

    data = target.recipe(
        solution.formats,
        settings.model,
        {"data": settings.calib_data, "samples": settings.calib_samples, "seq_len": settings.calib_seq_len},
        {"tasks": ["wikitext2"], "seq_len": 512, "limit": settings.eval_chunks, "speed": False},
        folder,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    summary = run_recipe(parse_recipe(data, str(folder / "recipe.yaml")))
    records = {(r["task"], r["metric"]): r for r in summary["stages"][-1]["records"]}
    ppl, kl = records[("wikitext2", "perplexity")], records.get(("wikitext2", "kl_divergence"))
    return {
        "ppl": ppl["value"],
        "kld": kl["value"] if kl else None,
        "bytes": size_on_disk(folder / "model"),
        "recipe": str(folder / "recipe.yaml"),
        "protocol": ppl["protocol"],
    }
