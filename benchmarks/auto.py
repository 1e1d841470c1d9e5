"""`slimlm auto --target gguf` on the built-in SmolLM2-135M at the budgets of issue 15, against uniform mixes and
llama.cpp's own `llama-quantize` types, every row scored by the same tool.

Budgets: the file sizes of llama.cpp's Q4_K_M, Q4_0 and Q2_K (its smallest file for this model; its 576-wide rows
fall back to other types) quantized from slimlm's f32 GGUF of the model, and 70 MB (below anything llama.cpp
makes); ``<TYPE>-latency`` (e.g. Q4_0-latency) is a latency budget: llama-bench's decode ms/token of that
llama.cpp file on this machine. At each budget `slimlm.auto.run.run_auto` searches (sensitivity cache shared by
every budget), writes its candidates with llama-quantize per-tensor types, and scores them; beside them:

- "uniform T": every Linear and the token embedding at one type T (``llama-quantize --pure``), the best uniform
  mix that fits the budget is the one compared against;
- "llama.cpp T": llama-quantize's own recipe T (its k-quant mixes), without importance matrix, and with
  ``--imatrix`` also with one from ``llama-imatrix`` on the calibration windows' text.

Scorer for every row: ``llama-perplexity -c 512 --chunks N -t T`` on WikiText-2 test (wiki.test.raw), KL divergence
and perplexity against the f32 GGUF's log-probs (``--kl-divergence-base``); decode speed by ``llama-bench -p 0
-n 64 -r 5 -t T`` (tok/s mean, ms/token the median repetition; kept in <work>/shared/latency.json with the load
average). Under a latency budget a row fits when its *measured* ms/token does. ``--decode-only`` times every GGUF
of the work folder into that cache and stops: run it on a quiet machine first, the search then reuses the figures.
Task scores (TriviaQA, SST-2) of the chosen files: benchmarks/auto_tasks.py, from this script's JSON.

    python benchmarks/auto.py [--chunks 8] [--budgets Q4_K_M,Q4_0,Q2_K,70MB,Q4_0-latency] [--imatrix] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import RESULTS
from slimlm.auto.latency import decode_figures
from slimlm.auto.run import AutoSettings, run_auto
from slimlm.evaluate.machine import machine_info
from slimlm.export.llamacpp import run_imatrix, run_quantize
from slimlm.pipeline import write_json_atomic

LLAMA_SIZES = ("Q4_K_M", "Q4_0", "Q2_K")


def budget_text(name: str, work: Path, threads: int = 2) -> tuple[str, str]:
    """(label, --budget text): a llama.cpp type's file size for this model (quantized from the f32 GGUF), its
    decode ms/token for ``<TYPE>-latency``, or a budget text as given."""
    type_name, latency = name.upper().removesuffix("-LATENCY"), name.upper().endswith("-LATENCY")
    if type_name not in LLAMA_SIZES:
        return name, name
    path = work / "llama" / f"{type_name}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        run_quantize(work / "f32.gguf", path, type_name)
    if latency:
        ms = decode_figures(path, work / "latency.json", threads)["decode_ms_per_token"]
        return f"llama.cpp {type_name} decode latency", f"{ms:.4f}ms/token"
    return f"llama.cpp {type_name} size", f"{path.stat().st_size}B"


def time_files(work: Path, threads: int = 2) -> None:
    """Decode speed of every GGUF in the work folder, into its latency cache (the search reuses the figures)."""
    for path in [work / "f32.gguf", *sorted(work.glob("*/*.gguf"))]:
        figures = decode_figures(path, work / "latency.json", threads)
        print(f"{path.relative_to(work)}: {figures['decode_tps']:.1f} tok/s, {figures['decode_ms_per_token']:.3f} ms")


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
        rows.append({"label": f"llama.cpp {name} + imatrix", "path": str(path)} | target.score(path, text, chunks))
    return rows


def same_type(searched: list[dict], imatrix: list[dict], name: str) -> dict | None:
    """The best searched row against llama.cpp's type `name` with the imatrix, whatever its size: with an imatrix
    llama-quantize makes a few tensors bigger (Q4_0: blk.0-2.ffn_down as Q4_1, +166 kB) and writes 4 more metadata
    keys, so that file no longer fits the budget its plain twin defines."""
    named = next((r for r in imatrix if r["label"] == f"llama.cpp {name} + imatrix"), None)
    if named is None or not searched:
        return None
    best = min(searched, key=lambda r: r["kld"])
    shown = ("label", "bytes", "ppl", "kld")
    return {
        "searched": {k: best.get(k) for k in shown},
        "llama.cpp": {k: named.get(k) for k in shown},
        "beats_llamacpp": best["kld"] < named["kld"],
    }


def _export_f32(work: Path) -> None:
    """The f32 GGUF every budget and row is made from (GGUFTarget writes it once)."""
    if not (work / "f32.gguf").is_file():
        from slimlm.auto.gguf_target import GGUFTarget
        from slimlm.models import load_model

        loaded = load_model("smollm2-135m")
        GGUFTarget(loaded.model, loaded.tokenizer, work)


def compare(rows: list[dict], budget: float, key: str = "bytes") -> dict:
    """The best candidate against the best uniform mix and the best llama.cpp row whose `key` (bytes, or the
    measured decode_ms_per_token) fits the budget."""

    def best(prefix: str) -> dict | None:
        fitting = [r for r in rows if r["label"].startswith(prefix) and r.get(key) is not None and r[key] <= budget]
        return min(fitting, key=lambda r: r["kld"]) if fitting else None

    found = {"searched": best("candidate"), "uniform": best("uniform"), "llama.cpp": best("llama.cpp")}
    searched = found["searched"]
    verdict = {}
    for other in ("uniform", "llama.cpp"):
        if searched and found[other]:
            verdict[f"beats_{other.replace('.', '')}"] = searched["kld"] < found[other]["kld"]
    shown = ("label", "bytes", "ppl", "kld", "decode_tps", "decode_ms_per_token")
    return {k: (v and {x: v.get(x) for x in shown}) for k, v in found.items()} | verdict


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
    parser.add_argument("--decode-only", action="store_true", help="time every GGUF of the work folder, then stop")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (1: timings robust to a busy CPU)")
    parser.add_argument("--recover", type=int, help="slimlm auto --recover TOKENS (give the budgets a --tag too)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimlm-auto-bench"))
    parser.add_argument("--out", type=Path, default=RESULTS / "auto.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"budgets": {}}
    results |= {"machine": machine_info(), "protocol": _protocol(args)}
    _export_f32(args.work / "shared")
    if args.decode_only:
        return time_files(args.work / "shared", args.threads)
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
            threads=args.threads,
            recover=args.recover,
        )
        label, settings.budget = budget_text(name, args.work / "shared", args.threads)
        load, started = os.getloadavg()[0], (time.process_time(), time.perf_counter())
        summary = run_auto(settings)
        entry = {
            "budget": label,
            "budget_text": settings.budget,
            "budget_resource": summary["budget"]["resource"],
            "budget_amount": summary["budget"]["amount"],
            "budget_bytes": summary["budget"]["bytes"],
            "search": summary["search"],
            "run_cpu_s": time.process_time() - started[0],
            "run_wall_s": time.perf_counter() - started[1],
            "loadavg_1min_before": load,
            "loadavg_1min_after": os.getloadavg()[0],
            "spearman_proxy_vs_kld": summary.get("spearman_proxy_vs_kld"),
            "latency_model": summary.get("latency_model"),
            "recovery": summary.get("recovery"),
            "rows": [{k: v for k, v in r.items() if k != "formats"} | _mix(r) for r in summary["rows"]],
            "report": str(Path(settings.output) / "report.md"),
            "protocol": _protocol(args),  # per budget: budgets run on other days may differ (threads)
        }
        entry["comparison"] = compare(summary["rows"], entry["budget_amount"], _fit_key(entry))
        results["budgets"][name + args.tag] = entry
        write_json_atomic(args.out, results)
        _print_budget(name, entry)
    if args.imatrix:
        rows = imatrix_rows(args.work / "shared", args.chunks, AutoSettings(model="smollm2-135m", budget="1GB"))
        results["imatrix_rows"] = rows
        for key, entry in results["budgets"].items():
            searched = [r for r in entry["rows"] if r["label"].startswith("candidate")]
            entry["comparison_imatrix"] = compare(
                searched + rows, entry.get("budget_amount", entry["budget_bytes"]), _fit_key(entry)
            )
            entry["comparison_imatrix_same_type"] = same_type(searched, rows, key.split("-")[0])
        write_json_atomic(args.out, results)
    _print_summary(results)


def _fit_key(entry: dict) -> str:
    """What a row must keep within the budget: its bytes, or its measured decode ms/token."""
    return "decode_ms_per_token" if entry.get("budget_resource") == "ms_per_token" else "bytes"


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
        "scorer": f"llama-perplexity -c 512 --chunks {args.chunks} -t {args.threads} on wiki.test.raw; "
        "--kl-divergence against the f32 GGUF's --kl-divergence-base",
        "search": "slimlm auto --target gguf: sensitivity on 2 x 256 c4 tokens (seed 0), KL of each Linear at Q4_0 "
        "carried to its other types by output error; multiple-choice knapsack; layer removal up to "
        f"{args.max_removed} layers; {args.candidates} candidates verified",
        "decode": f"llama-bench -p 0 -n 64 -r 5 -t {args.threads}: tok/s mean ± sd, ms/token the median repetition, "
        "load average recorded per file; predicted ms/token: Σ matrix params × a rate per type fitted on the f32 "
        "and uniform files",
        "tasks": "benchmarks/auto_tasks.py (TriviaQA 5-shot EM, SST-2 accuracy of the chosen files)",
        "pid": os.getpid(),
    }


def _print_budget(name: str, entry: dict) -> None:
    print(f"\n## budget {name}: {entry.get('budget_text')} (load {entry['loadavg_1min_before']:.1f})")
    print(f"{'row':32s} {'bytes':>11s} {'ppl':>8s} {'KLD':>8s} {'proxy':>8s} {'tok/s':>7s} {'ms/tok':>7s} {'pred':>6s}")
    for r in entry["rows"]:
        proxy = f"{r['proxy_kl']:.4f}" if r.get("proxy_kl") is not None else "—"
        speed = " ".join(
            f"{r[k]:>{w}.{d}f}" if r.get(k) is not None else f"{'—':>{w}s}"
            for k, w, d in (("decode_tps", 7, 1), ("decode_ms_per_token", 7, 2), ("predicted_ms_per_token", 6, 2))
        )
        print(f"{r['label']:32s} {r['bytes']:>11d} {r['ppl']:>8.3f} {r['kld']:>8.4f} {proxy:>8s} {speed}")


def _print_summary(results: dict) -> None:
    print(
        "\n| budget | limit | searched: ppl / KLD, tok/s | best uniform ≤ budget | best llama.cpp ≤ budget | search s |"
    )
    print("|---|---|---|---|---|---|")
    for name, e in results["budgets"].items():
        c = e["comparison"]

        def cell(row):
            if not row:
                return "none fits"
            speed = f", {row['decode_tps']:.0f} tok/s" if row.get("decode_tps") else ""
            return f"{row['label']}: {row['ppl']:.3f} / {row['kld']:.4f}{speed}"

        print(
            f"| {name} | {e.get('budget_text', e['budget_bytes'])} | {cell(c['searched'])} | {cell(c['uniform'])} | "
            f"{cell(c['llama.cpp'])} | {e['search']['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
