"""`slimlm auto --target gguf` on the built-in SmolLM2-135M at the budgets of issue 15, against uniform mixes and
llama.cpp's own `llama-quantize` types, every row scored by the same tool.

Budgets: the file sizes of llama.cpp's Q4_K_M, Q4_0 and Q2_K (its smallest file for this model; its 576-wide rows
fall back to other types) quantized from slimlm's f32 GGUF of the model, and 70 MB (below anything llama.cpp
makes). At each budget `slimlm.auto.run.run_auto` searches (sensitivity cache shared by every budget), writes its
candidates with llama-quantize per-tensor types, and scores them; beside them:

- "uniform T": every Linear and the token embedding at one type T (``llama-quantize --pure``), the best uniform
  mix that fits the budget is the one compared against;
- "llama.cpp T": llama-quantize's own recipe T (its k-quant mixes), without importance matrix, and with
  ``--imatrix`` also with one from ``llama-imatrix`` on the calibration windows' text.

Scorer for every row: ``llama-perplexity -c 512 --chunks N -t 2`` on WikiText-2 test (wiki.test.raw), KL divergence
and perplexity against the f32 GGUF's log-probs (``--kl-divergence-base``). The load average is recorded next to
each run's times. Not measured here (said in the output): task scores (TriviaQA) and decode tokens/s.

    python benchmarks/auto.py [--chunks 8] [--budgets Q4_K_M,Q4_0,Q2_K,70MB] [--imatrix] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import RESULTS
from slimlm.auto.run import AutoSettings, run_auto
from slimlm.evaluate.machine import machine_info
from slimlm.export.llamacpp import run_imatrix, run_quantize
from slimlm.pipeline import write_json_atomic

LLAMA_SIZES = ("Q4_K_M", "Q4_0", "Q2_K")


def budget_bytes(name: str, work: Path) -> tuple[str, int | str]:
    """A llama.cpp type's file size for this model (quantized from the f32 GGUF), or a size text as given."""
    if name.upper() not in LLAMA_SIZES:
        return name, name
    path = work / "llama" / f"{name.upper()}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        run_quantize(work / "f32.gguf", path, name.upper())
    return f"llama.cpp {name.upper()} size", path.stat().st_size


def imatrix_rows(work: Path, chunks: int, settings: AutoSettings) -> list[dict]:
    """llama-quantize with an importance matrix from llama-imatrix on the calibration text (c4, the windows the
    search calibrates on, decoded), scored like every other row."""
    from slimlm.auto.gguf_target import GGUFTarget
    from slimlm.data import calibration_windows, load_text
    from slimlm.models import load_model
    from slimlm.paths import shared_data_dir

    loaded = load_model("smollm2-135m")
    text_path = work / "calibration.txt"
    windows = calibration_windows(loaded.tokenizer, load_text(settings.calib_data), 8, 512, 0)
    text_path.write_text("\n\n".join(loaded.tokenizer.decode(w) for w in windows))
    matrix = work / "imatrix.gguf"
    if not matrix.is_file():
        run_imatrix(work / "f32.gguf", text_path, ctx=512, output=matrix)
    target = GGUFTarget(loaded.model, loaded.tokenizer, work)
    text = shared_data_dir() / "wikitext-2-raw-v1" / "wiki.test.raw"
    rows = []
    for name in ("Q4_K_M", "Q4_0", "IQ4_NL", "Q3_K_M", "Q2_K"):
        path = work / "llama" / f"{name}-imatrix.gguf"
        if not path.is_file():
            run_quantize(work / "f32.gguf", path, name, imatrix=matrix)
        rows.append({"label": f"llama.cpp {name} + imatrix"} | target.score(path, text, chunks))
    return rows


def _export_f32(work: Path) -> None:
    """The f32 GGUF every budget and row is made from (GGUFTarget writes it once)."""
    if not (work / "f32.gguf").is_file():
        from slimlm.auto.gguf_target import GGUFTarget
        from slimlm.models import load_model

        loaded = load_model("smollm2-135m")
        GGUFTarget(loaded.model, loaded.tokenizer, work)


def compare(rows: list[dict], budget: int) -> dict:
    """The best candidate against the best uniform mix and the best llama.cpp row that fit the budget."""

    def best(prefix: str) -> dict | None:
        fitting = [r for r in rows if r["label"].startswith(prefix) and r["bytes"] <= budget]
        return min(fitting, key=lambda r: r["kld"]) if fitting else None

    found = {"searched": best("candidate"), "uniform": best("uniform"), "llama.cpp": best("llama.cpp")}
    searched = found["searched"]
    verdict = {}
    for other in ("uniform", "llama.cpp"):
        if searched and found[other]:
            verdict[f"beats_{other.replace('.', '')}"] = searched["kld"] < found[other]["kld"]
    return {k: (v and {x: v[x] for x in ("label", "bytes", "ppl", "kld")}) for k, v in found.items()} | verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="Q4_K_M,Q4_0,Q2_K,70MB")
    parser.add_argument("--chunks", type=int, default=8, help="llama-perplexity chunks of 512 tokens")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--max-removed", type=int, default=4)
    parser.add_argument("--llama-types", default="Q4_K_M,IQ4_NL,Q4_0,Q2_K", help="llama-quantize rows")
    parser.add_argument("--exclude", default="", help="comma list of types the search may not use (e.g. Q4_1)")
    parser.add_argument("--tag", default="", help="suffix of the budget keys and output folders (e.g. -no-q4_1)")
    parser.add_argument("--imatrix", action="store_true", help="also llama.cpp types with an importance matrix")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimlm-auto-bench"))
    parser.add_argument("--out", type=Path, default=RESULTS / "auto.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"budgets": {}}
    results |= {"machine": machine_info(), "protocol": _protocol(args)}
    _export_f32(args.work / "shared")
    for name in args.budgets.split(","):
        settings = AutoSettings(
            model="smollm2-135m",
            budget="0B",
            output=str(args.work / f"auto-{name}{args.tag}"),
            candidates=args.candidates,
            max_removed=args.max_removed,
            eval_chunks=args.chunks,
            work=str(args.work / "shared"),
            baselines=args.llama_types.split(","),
            exclude=[x for x in args.exclude.split(",") if x],
            resume=True,
        )
        label, size = budget_bytes(name, args.work / "shared")
        settings.budget = f"{size}B" if isinstance(size, int) else size
        load, started = os.getloadavg()[0], (time.process_time(), time.perf_counter())
        summary = run_auto(settings)
        entry = {
            "budget": label,
            "budget_bytes": summary["budget"]["bytes"],
            "search": summary["search"],
            "run_cpu_s": time.process_time() - started[0],
            "run_wall_s": time.perf_counter() - started[1],
            "loadavg_1min_before": load,
            "loadavg_1min_after": os.getloadavg()[0],
            "spearman_proxy_vs_kld": summary.get("spearman_proxy_vs_kld"),
            "rows": [{k: v for k, v in r.items() if k != "formats"} | _mix(r) for r in summary["rows"]],
            "report": str(Path(settings.output) / "report.md"),
        }
        entry["comparison"] = compare(summary["rows"], summary["budget"]["bytes"])
        results["budgets"][name + args.tag] = entry
        write_json_atomic(args.out, results)
        _print_budget(name, entry)
    if args.imatrix:
        rows = imatrix_rows(args.work / "shared", args.chunks, AutoSettings(model="smollm2-135m", budget="1GB"))
        results["imatrix_rows"] = rows
        for entry in results["budgets"].values():
            entry["comparison_imatrix"] = compare(
                [r for r in entry["rows"] if r["label"].startswith("candidate")] + rows, entry["budget_bytes"]
            )
        write_json_atomic(args.out, results)
    _print_summary(results)


def _mix(row: dict) -> dict:
    formats = row.get("formats")
    if not formats:
        return {}
    counts: dict[str, int] = {}
    for t in formats.values():
        counts[t] = counts.get(t, 0) + 1
    return {"type_counts": counts}


def _protocol(args) -> dict:
    return {
        "scorer": f"llama-perplexity -c 512 --chunks {args.chunks} -t 2 on wiki.test.raw; --kl-divergence against "
        "the f32 GGUF's --kl-divergence-base",
        "search": "slimlm auto --target gguf: sensitivity on 2 x 256 c4 tokens (seed 0), KL of each Linear at Q4_0 "
        "carried to its other types by output error; multiple-choice knapsack; layer removal up to "
        f"{args.max_removed} layers; {args.candidates} candidates verified",
        "not_measured": "task scores (TriviaQA) and decode tok/s",
        "pid": os.getpid(),
    }


def _print_budget(name: str, entry: dict) -> None:
    print(f"\n## budget {name}: {entry['budget_bytes']} bytes (load {entry['loadavg_1min_before']:.1f})")
    print(f"{'row':32s} {'bytes':>11s} {'ppl':>8s} {'KLD':>8s} {'proxy':>8s}")
    for r in entry["rows"]:
        proxy = f"{r['proxy_kl']:.4f}" if r.get("proxy_kl") is not None else "—"
        print(f"{r['label']:32s} {r['bytes']:>11d} {r['ppl']:>8.3f} {r['kld']:>8.4f} {proxy:>8s}")


def _print_summary(results: dict) -> None:
    print("\n| budget | bytes | searched (ppl / KLD) | best uniform ≤ budget | best llama.cpp ≤ budget | search s |")
    print("|---|---|---|---|---|---|")
    for name, e in results["budgets"].items():
        c = e["comparison"]

        def cell(row):
            return "none fits" if not row else f"{row['label']}: {row['ppl']:.3f} / {row['kld']:.4f}"

        print(
            f"| {name} | {e['budget_bytes']} | {cell(c['searched'])} | {cell(c['uniform'])} | "
            f"{cell(c['llama.cpp'])} | {e['search']['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
