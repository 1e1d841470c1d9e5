"""`slimlm auto --target slimlm` on the built-in SmolLM2-135M: the searched recipe (RTN or GPTQ grid per projection
kind, decoder layers removed) against every uniform slimlm format, all scored by slimlm's own evaluation.

Budgets: the folder sizes of uniform w4g64 and w3g64 (the recipe's dtype, bfloat16, for the rest), and the decode
latency of uniform w4g64 (slimlm's plain decode path with the packed kernels, measured in this run). Rows: the
candidates, and "uniform F" (every projection at F: RTN grids, and GPTQ's at 4 and 3 bits). Scorer for every row: the
recipe's evaluate stage, WikiText-2 test perplexity and KL to the original on `--chunks` windows of 512 tokens;
decode by evaluate/speed.measure_speed (16-token prompt, 32 new tokens, median of 3 runs, the load average beside).
Written after every budget (results/auto_slimlm.json); a rerun with the same settings resumes each budget's
scored rows (`--work`/auto-<budget>-<settings hash>).

    python benchmarks/auto_slimlm.py [--budgets w4g64,w3g64,w4g64-latency] [--chunks 8] [--work DIR] [--uniform F,..]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import RESULTS
from slimlm.auto.run import AutoSettings, run_auto
from slimlm.auto.slimlm_target import SlimlmTarget
from slimlm.evaluate.machine import machine_info
from slimlm.models import load_model
from slimlm.pipeline import write_json_atomic

MODEL = "smollm2-135m"
UNIFORM = ("w8g32", "w4g32", "w4g64", "w3g64", "w2g64", "gptq-w4g64", "gptq-w3g64")


def budget_text(name: str, target: SlimlmTarget) -> str:
    """A uniform format's predicted folder size, or ``<format>-latency``: its predicted decode ms/token."""
    fmt, latency = name.removesuffix("-latency"), name.endswith("-latency")
    items = target.items()
    if any(fmt not in {o.name for o in i.options} for i in items):  # SmolLM2's 576 inputs take no g128
        raise SystemExit(f"--budgets {name}: {fmt} is not a format every projection of {MODEL} allows")
    if latency:
        ms = sum(target.item_latency(i)[[o.name for o in i.options].index(fmt)] for i in items)
        return f"{ms:.4f}ms/token"
    size = target.fixed_bytes(items)(frozenset()) + sum(o.bytes for i in items for o in i.options if o.name == fmt)
    return f"{size}B"


def best(rows: list[dict], prefix: str, key: str, limit: float) -> dict | None:
    fitting = [r for r in rows if r["label"].startswith(prefix) and r.get(key) is not None and r[key] <= limit]
    return min(fitting, key=lambda r: r["kld"]) if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="w4g64,w3g64,w4g64-latency")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--uniform", default=",".join(UNIFORM), help="uniform formats scored beside the candidates")
    parser.add_argument("--mlp-keep", default="", help="MLP widths the search may cut to (fractions); results key +mlp")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimlm-auto-slimlm"))
    parser.add_argument("--out", type=Path, default=RESULTS / "auto_slimlm.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"budgets": {}}
    results["machine"] = machine_info()
    loaded = load_model(MODEL)
    target = SlimlmTarget(loaded.model, work=args.work / "shared")
    for name in args.budgets.split(","):
        settings = AutoSettings(
            model=MODEL,
            budget=budget_text(name, target),
            target="slimlm",
            output=str(args.work / f"auto-{name}"),
            candidates=args.candidates,
            eval_chunks=args.chunks,
            work=str(args.work / "shared"),
            resume=True,
            baselines=args.uniform.split(","),
            mlp_keep=[float(x) for x in args.mlp_keep.split(",") if x],
        )
        # a folder per budget and settings: a rerun with other --candidates or --uniform starts its own (resuming a
        # folder of other settings is refused); the rows they share are reused through the work folder's scores
        settings.output = str(args.work / f"auto-{name}-{settings.fingerprint()[:8]}")
        load, started = os.getloadavg()[0], (time.process_time(), time.perf_counter())
        summary = run_auto(settings)
        resource = summary["budget"]["resource"]
        key = "decode_ms_per_token" if resource == "ms_per_token" else "bytes"
        rows = summary["rows"]
        key_name = f"{name}+mlp" if settings.mlp_keep else name
        results["budgets"][key_name] = {
            "budget_text": settings.budget,
            "resource": resource,
            "search": summary["search"],
            "run_cpu_s": time.process_time() - started[0],
            "run_wall_s": time.perf_counter() - started[1],
            "loadavg_1min_before": load,
            "rows": rows,
            "latency_model": summary.get("latency_model"),
            "spearman_proxy_vs_kld": summary.get("spearman_proxy_vs_kld"),
            "searched": best(rows, "candidate", key, summary["budget"]["amount"]),
            "uniform": best(rows, "uniform", key, summary["budget"]["amount"]),
            "report": str(Path(settings.output) / "report.md"),
        }
        write_json_atomic(args.out, results)
        _print(key_name, results["budgets"][key_name])


def _print(name: str, entry: dict) -> None:
    print(f"\n## {name}: {entry['budget_text']} (load {entry['loadavg_1min_before']:.1f})")
    print(f"{'row':14s} {'bytes':>10s} {'ppl':>8s} {'KL':>8s} {'ms/tok':>7s} {'removed':>8s} {'MLP':>5s}  formats")
    for r in entry["rows"]:
        formats = ",".join(f"{k}={v}" for k, v in (r.get("formats") or {}).items()) if r["label"][0] == "c" else ""
        removed = ",".join(map(str, r.get("removed") or [])) or "—"
        print(
            f"{r['label']:14s} {r['bytes']:>10d} {r['ppl']:>8.3f} {r['kld']:>8.4f} "
            f"{r.get('decode_ms_per_token') or 0:>7.2f} {removed:>8s} {r.get('mlp_channels') or 'all':>5}  {formats}"
        )
    s, u = entry["searched"], entry["uniform"]
    if s and u:
        print(f"searched {s['label']} KL {s['kld']:.4f} vs best uniform {u['label']} {u['kld']:.4f}")


if __name__ == "__main__":
    main()
