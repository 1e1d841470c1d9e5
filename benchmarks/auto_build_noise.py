"""How much the real score of one slimlm-target recipe moves between builds: the same recipe with other calibration
seeds (the GPTQ fitting windows), so that a searched candidate and a uniform format are compared by mean and spread,
not by one build each.

Why: uniform GPTQ w4g64 of SmolLM2 scored KL 0.1816, 0.1858 and 0.1996 in three runs of one recipe (2, 2 and 1
threads): its weights differ from the first layer's o_proj on, as bfloat16 reductions of another thread count
change the Hessians GPTQ rounds by. A gap smaller than that spread says nothing about the search.

Each row: a recipe.yaml written by `slimlm auto --target slimlm` (benchmarks/auto_slimlm.py), run with
`calibration.seed` = each of `--seeds`, scored by its own evaluate stage (WikiText-2 test windows of 512, KL to the
original), at the thread count given. Results: results/auto_build_noise.json, written after every build; a rerun
skips the builds it has.

    python benchmarks/auto_build_noise.py --recipes LABEL=PATH/recipe.yaml,... [--seeds 1,2,3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from common import RESULTS
from slimlm.evaluate.machine import machine_info
from slimlm.pipeline import run_recipe, write_json_atomic
from slimlm.recipe import parse_recipe


def build(recipe_path: Path, seed: int, folder: Path) -> dict:
    """The recipe with calibration seed `seed`, run into `folder`: its final KL and perplexity."""
    data = yaml.safe_load(recipe_path.read_text())
    data["calibration"]["seed"] = seed
    data["output"] = str(folder)
    data["evaluate"]["after"] = "last_stage"  # the final model's score is the one compared (recipes of older runs)
    load, started = os.getloadavg()[0], time.perf_counter()
    summary = run_recipe(parse_recipe(data, str(recipe_path)))
    records = {(r["task"], r["metric"]): r for r in summary["stages"][-1]["records"]}
    return {
        "seed": seed,
        "kld": records[("wikitext2", "kl_divergence")]["value"],
        "ppl": records[("wikitext2", "perplexity")]["value"],
        "wall_s": time.perf_counter() - started,
        "loadavg_1min_before": load,
        "threads": torch.get_num_threads(),
    }


def spread(builds: list[dict]) -> dict:
    values = [b["kld"] for b in builds]
    return {
        "n": len(values),
        "kld_mean": statistics.fmean(values),
        "kld_sd": statistics.stdev(values) if len(values) > 1 else None,
        "kld_min": min(values),
        "kld_max": max(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", required=True, help="LABEL=recipe.yaml,... (rows of an auto_slimlm run)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "auto_build_noise.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    results["machine"] = machine_info()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = dict(pair.split("=", 1) for pair in args.recipes.split(","))
    for seed in seeds:  # seed-major: every row's first seed before any row's second
        for label, path in rows.items():
            row = results["rows"].setdefault(label, {"recipe": yaml.safe_load(Path(path).read_text()), "builds": []})
            if any(b["seed"] == seed and b["threads"] == args.threads for b in row["builds"]):
                continue
            with tempfile.TemporaryDirectory(prefix="slimlm-build-noise-") as folder:
                found = build(Path(path), seed, Path(folder) / "run")
            row["builds"].append(found)
            row["spread"] = spread(row["builds"])
            write_json_atomic(args.out, results)
            print(f"{label} seed {seed}: KL {found['kld']:.4f} ppl {found['ppl']:.2f} ({found['wall_s']:.0f} s)")
    for label, row in results["rows"].items():
        s = row["spread"]
        sd = f" ± {s['kld_sd']:.4f}" if s["kld_sd"] is not None else ""
        print(f"{label:28s} n={s['n']} KL {s['kld_mean']:.4f}{sd} (min {s['kld_min']:.4f}, max {s['kld_max']:.4f})")


if __name__ == "__main__":
    main()
