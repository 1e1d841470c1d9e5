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

from slimlm.auto.allocate import Resource, Solution, allocate, size_resource, uniform_solution
from slimlm.auto.budget import parse_budget
from slimlm.auto.probe import Probe, input_hessians
from slimlm.auto.recover import REMOVAL_KL_LEFT, recovered_rows
from slimlm.auto.sensitivity import CostCache, Costs, measure
from slimlm.auto.shared_scores import SharedScores
from slimlm.auto.widths import WidthCuts
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import parameter_counts
from slimlm.modules import config_widths
from slimlm.paths import cache_dir, shared_data_dir
from slimlm.pipeline import write_json_atomic
from slimlm.progress import progress_bar

CACHE_VERSION = "1"  # bump when a figure in the sensitivity cache changes meaning
FIT_VERSION = "2"  # the same for the GPTQ/EoRA fits of the slimlm target (2: v_proj per-head, attention-weighted)
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
    # slimlm: the windows GPTQ and EoRA fit to (seed 1), in the recipe and for the proxy's solves; their error is
    # measured on the calibration windows above (seed 0), out of sample: fitted to 512 tokens and scored on them,
    # GPTQ looked better than RTN and was far worse on WikiText-2 (auto_slimlm.json, the first run)
    fit_samples: int = 16
    fit_seq_len: int = 512
    eval_chunks: int = 8  # gguf: llama-perplexity chunks of 512; slimlm: WikiText-2 windows of 512
    threads: int = 2
    # gguf: llama.cpp types scored beside (default GGUF_BASELINES); slimlm: uniform formats (SLIMLM_UNIFORM)
    baselines: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)  # formats the search may not use (e.g. Q4_1)
    # gguf: f32/uniform/baseline GGUFs and their scores (default <output>/work); slimlm: decode timings (default
    # <output>); shareable between runs
    work: str | None = None
    # gguf: time every row and the uniform files with llama-bench (latency budgets need it). Off in tests that do
    # not look at speed: on a busy 2-core machine a 2-thread llama-bench of a tiny model can take minutes
    decode: bool = True
    recover: int | None = None  # gguf: distill candidates that remove layers for this many tokens (recover.py)
    # fractions of the MLP's channels every layer may keep (widths.py; rounded down to the target's step); none: the
    # width is not searched
    mlp_keep: list[float] = field(default_factory=list)

    def fingerprint(self) -> str:
        data = asdict(self)
        data.pop("resume")
        data.pop("output")
        data.pop("work")
        data.pop("decode")  # what is scored does not depend on it: the rows' timings live in the work folder
        for name, unset in (("recover", None), ("mlp_keep", [])):  # runs from before these keep their fingerprint
            if data[name] == unset:
                data.pop(name)
        if self.target != "slimlm" and not self.mlp_keep:  # unused (runs from before them keep their fingerprint)
            data.pop("fit_samples")
            data.pop("fit_seq_len")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _target(settings: AutoSettings, loaded, out: Path):
    if settings.target == "gguf":
        from slimlm.auto.gguf_target import GGUFTarget

        work = Path(settings.work) if settings.work else out / "work"
        return GGUFTarget(loaded.model, loaded.tokenizer, work, settings.threads, settings.exclude)
    if settings.target == "slimlm":
        from slimlm.auto.slimlm_target import SlimlmTarget

        # its decode timings (latency.json) in the work folder: runs at several budgets share them
        return SlimlmTarget(loaded.model, exclude=settings.exclude, work=Path(settings.work) if settings.work else out)
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
    from slimlm.models import load_model

    budget = parse_budget(settings.budget)
    if budget.resource == "ms_per_token" and not settings.decode:
        raise SlimlmError(f"--budget {settings.budget!r}: a latency budget needs the decode timings (drop --no-decode)")
    _check_recover(settings)
    bad = [f for f in settings.mlp_keep if not 0 < f < 1]
    if bad:
        raise SlimlmError(f"--mlp-keep {bad[0]}: give fractions of the MLP's channels between 0 and 1 (0.75)")
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    state = _state(out, settings)
    started = time.process_time(), time.perf_counter()
    loaded = load_model(settings.model)
    model = loaded.model
    target = _target(settings, loaded, out)
    parameters = parameter_counts(model)["total"]
    limit = budget.amount(parameters)
    cuts = width_cuts(settings, loaded, target)
    costs, cache = sensitivity_costs(settings, loaded, target, cuts)
    resources = _resources(target, costs, settings.decode)
    search_cpu, search_wall = time.process_time() - started[0], time.perf_counter() - started[1]
    chosen = resources[budget.resource]
    others = [r for r in resources.values() if r is not chosen]
    max_removed = settings.max_removed if costs.removal else 0
    removal_weight = REMOVAL_KL_LEFT if settings.recover else 1.0
    solutions = allocate(costs, limit, chosen, max_removed, settings.candidates, others, removal_weight)
    if not solutions:
        unit = "bytes" if chosen.name == "bytes" else "ms/token"
        smallest = chosen.fixed(frozenset()) + sum(min(a) for a in chosen.amounts)
        raise SlimlmError(
            f"--budget {settings.budget}: {limit:g} {unit} is below the smallest {target.name} output this search "
            f"can make ({smallest:g} {unit} with every format at its smallest)"
        )
    uniform = _uniform_solutions(settings, costs, list(resources.values()))
    rows = _score_all(settings, target, solutions, uniform, state, out, loaded, cuts)
    if settings.recover:
        save = lambda: write_json_atomic(out / "state.json", state)  # noqa: E731
        rows += recovered_rows(settings, target, rows, state, out, save, _wikitext_test(), fit_calibration(settings))
    summary = {
        "settings": asdict(settings),
        "budget": {
            "text": budget.text,
            "kind": budget.kind,
            "resource": budget.resource,
            "amount": limit,
            "bytes": limit if budget.resource == "bytes" else None,
            "parameters": parameters,
        },
        "search": {
            "cpu_s": search_cpu,
            "wall_s": search_wall,
            "new_figures": costs.new_figures,
            "cache": str(cache.path),
            "items": len(costs.items),
            "options": sum(len(i.options) for i in costs.items),
            "mlp_widths": {str(n): kl for n, kl in costs.widths.items()},
            "calibration": f"{settings.calib_samples} x {settings.calib_seq_len} tokens of {settings.calib_data}",
        },
        "rows": rows,
        "width_calibration": cuts.calibration if cuts else None,
    }
    if settings.recover:
        summary["recovery"] = _recovery_summary(settings, rows)
    if "ms_per_token" in resources:
        summary["latency_model"] = _latency_summary(target.latency_model(), rows)
    from slimlm.auto.report import write_report

    write_report(summary, out, target)
    return summary


def fit_calibration(settings: AutoSettings) -> dict:
    """The windows GPTQ, EoRA and an MLP cut fit to, as a recipe's `calibration`."""
    return {"data": settings.calib_data, "samples": settings.fit_samples, "seq_len": settings.fit_seq_len, "seed": 1}


def width_cuts(settings: AutoSettings, loaded, target) -> WidthCuts | None:
    """The original's MLP cuts, fitted to the recipe's calibration windows (None when the width is not searched)."""
    if not settings.mlp_keep:
        return None
    step = target.width_step(config_widths(loaded.model.config)[0])
    return WidthCuts.fitted(loaded.model, loaded.tokenizer, fit_calibration(settings), settings.mlp_keep, step)


def sensitivity_costs(settings: AutoSettings, loaded, target, cuts: WidthCuts | None = None) -> tuple[Costs, CostCache]:
    """The cost of every (item, option), of removing each decoder layer (when --max-removed allows any) and of
    each MLP width (`cuts`), measured on the calibration windows or read from the cache of earlier searches on the
    same model."""
    from slimlm.data import calibration_windows, load_text
    from slimlm.models import source_fingerprint

    text = load_text(settings.calib_data)
    probe = Probe(
        loaded.model, calibration_windows(loaded.tokenizer, text, settings.calib_samples, settings.calib_seq_len, 0)
    )
    fitted = target.name == "slimlm" and not {"gptq", "eora"} <= set(settings.exclude)
    what = [source_fingerprint(loaded.source), target.name, settings.calib_data, settings.calib_samples]
    what += [settings.calib_seq_len, CACHE_VERSION]
    what += [settings.fit_samples, settings.fit_seq_len, FIT_VERSION] if fitted else []
    key = json.dumps(what)
    cache = CostCache(cache_dir() / "auto" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.jsonl")
    removable = list(range(probe.layers)) if settings.max_removed else []
    if fitted:  # GPTQ and EoRA fit to windows of their own (seed 1): their error is measured out of sample
        # the MLP cuts were fitted to these same windows: not tokenized again
        fit = (
            cuts.windows
            if cuts is not None
            else calibration_windows(loaded.tokenizer, text, settings.fit_samples, settings.fit_seq_len, 1)
        )
        items = target.items(probe, input_hessians(loaded.model, fit))
    else:
        items = target.items(probe)
    return measure(probe, items, cache, removable, cuts), cache


def _check_recover(settings: AutoSettings) -> None:
    if settings.recover is None:
        return
    if settings.target != "gguf":  # the slimlm target's recipes hold the model in bfloat16, too coarse to train
        raise SlimlmError(
            f"--recover {settings.recover}: built for --target gguf (distillation of the float32 model before "
            "llama-quantize); --target slimlm recipes hold bfloat16 weights"
        )
    if settings.recover <= 0:
        raise SlimlmError(f"--recover {settings.recover}: give a positive number of training tokens")
    if settings.max_removed == 0:
        raise SlimlmError("--recover: distillation recovers removed layers, and --max-removed 0 removes none")


def _recovery_summary(settings: AutoSettings, rows: list[dict]) -> dict:
    """What recovery did to each candidate it trained: KL before and after, and the part of it that was left."""
    recovered = [r for r in rows if r.get("recovered_from")]
    return {
        "tokens": settings.recover,
        "removal_kl_left_assumed": REMOVAL_KL_LEFT,
        "rows": [
            {
                "label": r["label"],
                "removed": r["removed"],
                "kld_before": r["kld_before_recovery"],
                "kld_after": r["kld"],
                "kl_left": r["kld"] / r["kld_before_recovery"] if r["kld_before_recovery"] else None,
            }
            for r in recovered
        ],
    }


def _wikitext_test() -> Path:
    return shared_data_dir() / "wikitext-2-raw-v1" / "wiki.test.raw"


def _resources(target, costs, decode: bool) -> dict[str, Resource]:
    """What a budget may limit: the output's bytes, and the predicted decode ms/token of the target's runtime
    (latency.py; a nanosecond is the finest step the knapsack tells apart)."""
    resources = {"bytes": size_resource(costs, target.fixed_bytes(costs.items))}
    if decode:
        latency = [target.item_latency(item) for item in costs.items]
        resources["ms_per_token"] = Resource("ms_per_token", latency, lambda removed: 0.0, resolution=1e-6)
    return resources


def _latency_summary(model, rows: list[dict]) -> dict:
    from slimlm.auto.latency import agreement

    return {
        "rates_ms_per_million_params": {t: r * 1e6 for t, r in model.rates.items()},
        "fitted_on_ms_per_token": model.fitted_on,
        "agreement_candidates": agreement([r for r in rows if r["label"].startswith("candidate")]),
        "agreement_llamacpp": agreement([r for r in rows if r["label"].startswith("llama.cpp")]),
        "agreement_uniform": agreement([r for r in rows if r["label"].startswith("uniform")]),
    }


def _uniform_solutions(settings: AutoSettings, costs, resources: list[Resource]) -> dict[str, Solution]:
    names = GGUF_UNIFORM if settings.target == "gguf" else (settings.baselines or SLIMLM_UNIFORM)
    found = {}
    for name in names:
        solution = uniform_solution(costs, name, resources)
        if solution is not None:
            found[f"uniform {name}"] = solution
    return found


def _score_all(settings, target, solutions, uniform, state, out: Path, loaded, cuts=None) -> list[dict]:
    """Every candidate, uniform mix and llama.cpp baseline written and scored (what state.json has is kept)."""
    jobs = [(f"candidate {i + 1}", s) for i, s in enumerate(solutions)] + list(uniform.items())
    if settings.target == "gguf":
        jobs += [(f"llama.cpp {t}", None) for t in settings.baselines or GGUF_BASELINES]
    rows, shared = [], SharedScores(settings)
    with progress_bar("auto: scoring", total=len(jobs)) as advance:
        for label, solution in jobs:
            row = {"label": label}
            if solution is not None:
                row |= {
                    "formats": solution.formats,
                    "removed": list(solution.removed),
                    "proxy_kl": solution.raw_proxy,
                    "predicted_bytes": solution.bytes,
                }
                if settings.recover:
                    row["proxy_kl_recovered"] = solution.proxy
                if solution.mlp_channels:  # only then: the rows of uncut mixes keep their keys
                    row["mlp_channels"] = solution.mlp_channels
            # a row scored by an older form of the target's recipes is scored again
            scored = row | ({"recipe_version": target.recipe_version} if target.recipe_version else {})
            key = hashlib.sha256(json.dumps(scored, sort_keys=True).encode()).hexdigest()[:16]
            if key not in state["scores"]:
                state["scores"][key] = shared.get(scored) or shared.put(
                    scored, _score(settings, target, label, solution, out, loaded, cuts)
                )
                write_json_atomic(out / "state.json", state)
            figures = state["scores"][key]
            if settings.decode:  # kept by file in the work folder (gguf) or the output (slimlm): resumed rows get it
                figures = figures | target.decode(Path(figures["path"]), row)
            rows.append(row | figures)
            advance(description=f"auto: scoring ({label})")
    return rows


def _score(settings, target, label: str, solution, out: Path, loaded, cuts=None) -> dict:
    if settings.target == "gguf":
        text = _wikitext_test()
        if solution is None:
            path = target.llama_type(label.split()[-1], target.work / "llama" / f"{label.split()[-1]}.gguf")
        else:
            # named by what it holds, in the shared work folder: a mix another budget's run wrote is reused
            path = target.work / "mixes" / f"{_mix_name(solution, cuts=cuts)}.gguf"
            if not path.is_file():
                channels = solution.mlp_channels
                cut = lambda: cuts.cut(channels)  # noqa: E731
                source = target.source(cut, _cut_name(cuts, channels)) if channels else None
                target.write(solution.formats, solution.removed, path, source)
        return target.score(path, text, settings.eval_chunks) | {"path": str(path)}
    # the label for people, what it holds for SharedScores: a rerun whose "candidate 1" is another mix gets a folder
    # of its own, and the scores kept for the older one still point at that one
    slug = label.replace(" ", "-").replace(".", "")
    mix = _mix_name(solution, target.recipe_version, cuts)[:8]
    return _score_slimlm(settings, target, solution, out / "runs" / f"{slug}-{mix}", loaded)


def _mix_name(solution, recipe_version: str = "", cuts: WidthCuts | None = None) -> str:
    """A name for the output a solution describes: the hash of its formats and removed layers (and of the form of
    the recipe that writes it, when the target versions it; of its MLP cut and the windows fitting it, when cut)."""
    what = [solution.formats, solution.removed] + ([recipe_version] if recipe_version else [])
    what += [["mlp", cuts.key(solution.mlp_channels)]] if solution.mlp_channels else []
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _cut_name(cuts: WidthCuts, channels: int) -> str:
    """A file name for the original cut to `channels` on `cuts`' windows."""
    return f"mlp{channels}-" + hashlib.sha256(cuts.key(channels).encode()).hexdigest()[:8]


def _score_slimlm(settings, target, solution, folder: Path, loaded) -> dict:
    import yaml

    from slimlm.evaluate.footprint import size_on_disk
    from slimlm.pipeline import run_recipe
    from slimlm.recipe import parse_recipe

    data = target.recipe(
        solution.formats,
        settings.model,
        fit_calibration(settings),
        # only the final model is scored: a candidate's stages (cut, removal, quantizers) are not compared
        {"tasks": ["wikitext2"], "seq_len": 512, "limit": settings.eval_chunks, "speed": False, "after": "last_stage"},
        folder,
        tuple(solution.removed),
        solution.mlp_channels,
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
        "path": str(folder / "model"),
        "recipe": str(folder / "recipe.yaml"),
        "protocol": ppl["protocol"],
    }
