"""Does cutting the MLP's width pay under a size budget? `slimlm auto --mlp-keep` on the built-in SmolLM2-135M: the
probe's KL of each width (every layer keeps that many channels, prune_width's scores, fitted to 16 x 512 c4 tokens,
seed 1), and the allocation's best solution at each budget with and without the width in the search (the same
sensitivity figures, the same knapsack, layers removable up to 4). Proxy figures only: a budget where the search
picks a cut is worth building and scoring with `slimlm auto`; where it never does, the width costs more KL per byte
saved than the formats do.

Budgets: gguf — the sizes of llama.cpp's Q4_K_M, Q4_0 and Q2_K files of this model and 70 MB (benchmarks/auto.py's);
slimlm — the folder sizes of uniform w4g64 and w3g64 (benchmarks/auto_slimlm.py's) and of w2g64.
Written to results/auto_widths.json.

    python benchmarks/auto_widths.py [--target gguf|slimlm] [--mlp-keep 0.9,0.83,0.67,0.5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import RESULTS
from slimlm.auto.allocate import allocate, uniform_solution
from slimlm.auto.run import AutoSettings, _resources, _target, sensitivity_costs, width_cuts
from slimlm.models import load_model
from slimlm.pipeline import write_json_atomic

GGUF_BUDGETS = {"Q4_K_M": 105453856, "Q4_0": 91726624, "Q2_K": 88201504, "70MB": 70_000_000}  # auto.json's
SLIMLM_UNIFORM = ("w4g64", "w3g64", "w2g64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="gguf", choices=("gguf", "slimlm"))
    parser.add_argument("--mlp-keep", default="0.9,0.83,0.67,0.5")
    parser.add_argument("--work", default=None, help="the target's work folder (gguf: f32 and uniform files)")
    args = parser.parse_args()
    keep = [float(x) for x in args.mlp_keep.split(",")]
    loaded = load_model("smollm2-135m")
    output = tempfile.mkdtemp(prefix="slimlm-auto-widths-")
    settings = AutoSettings(
        model="smollm2-135m", budget="1GB", target=args.target, output=output, work=args.work, mlp_keep=keep
    )
    target = _target(settings, loaded, Path(output))
    costs, cache = sensitivity_costs(settings, loaded, target, width_cuts(settings, loaded, target))
    size = _resources(target, costs, decode=False)["bytes"]
    if args.target == "gguf":
        budgets = GGUF_BUDGETS
    else:
        budgets = {f"uniform {f}": uniform_solution(costs, f, [size]).bytes for f in SLIMLM_UNIFORM}
    rows = {}
    print(f"widths (channels of {costs.intermediate}: probe KL): {costs.widths}")
    print(f"{'budget':>16} | {'bytes':>11} | {'best, width searched':>34} | {'best, full width':>22}")
    for name, amount in budgets.items():
        with_width = allocate(costs, amount, size, max_removed=4, count=1)
        full = allocate(_without_widths(costs), amount, size, max_removed=4, count=1)
        rows[name] = {"bytes": amount, "width_searched": _describe(with_width), "full_width": _describe(full)}
        w, f = rows[name]["width_searched"], rows[name]["full_width"]
        cut = f"channels {w and w['mlp_channels']} removed {w and w['removed']}"
        print(f"{name:>16} | {amount:>11} | proxy {_kl(w)} {cut} | proxy {_kl(f)} removed {f and f['removed']}")
    result = {
        "target": args.target,
        "mlp_keep": keep,
        "intermediate": costs.intermediate,
        "width_kl": {str(n): kl for n, kl in costs.widths.items()},
        "budgets": rows,
        "cache": str(cache.path),
        "protocol": __doc__.split("\n\n")[0],
    }
    path = RESULTS / "auto_widths.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    write_json_atomic(path, found | {args.target: result})


def _without_widths(costs):
    from dataclasses import replace

    return replace(costs, widths={})


def _describe(solutions) -> dict | None:
    if not solutions:
        return None
    best = solutions[0]
    return {
        "proxy_kl": best.proxy,
        "mlp_channels": best.mlp_channels,
        "removed": list(best.removed),
        "bytes": best.bytes,
    }


def _kl(row: dict | None) -> str:
    return f"{row['proxy_kl']:.4f}" if row else "—"


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
