"""The rows of vs_llamacpp.py (what each GGUF is built from, in what order they are measured) and the table printed
from its results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vs_llamacpp_mix import SLIM_TIER

LLAMA_TYPES = ("Q8_0", "Q4_0", "IQ4_NL", "Q4_K_M", "Q3_K_M", "Q2_K")
SLIM_METHODS = ("rtn", "gptq", "awq")


@dataclass
class Row:
    label: str
    priority: int  # processing order (lower first); the table keeps the display order
    build: Callable[[], tuple[Path, dict]]  # -> (GGUF path, what to record about how it was made)
    group: str


def rows(bench) -> list[Row]:
    """Every row of the table, in display order, built by `bench` (vs_llamacpp.Bench)."""
    table = [
        Row("f32 (reference)", 0, lambda: (bench.ensure_f32() or bench.f32, {"tool": "slimlm export_gguf f32"}), "f32")
    ]
    # processing order: what the size-matched comparisons need first; cheap or optional rows last
    prio_imatrix = {"Q4_0": 10, "Q3_K_M": 11, "Q4_K_M": 12, "IQ4_NL": 13, "Q2_K": 14, "Q8_0": 15}
    prio_plain = {"Q4_0": 30, "IQ4_NL": 31, "Q3_K_M": 32, "Q4_K_M": 33, "Q2_K": 34, "Q8_0": 35}
    for qtype in LLAMA_TYPES:
        table.append(
            Row(
                f"llama.cpp {qtype}",
                prio_plain[qtype],
                lambda q=qtype: bench.llama_file(q, False),
                "llama.cpp",
            )
        )
        table.append(
            Row(
                f"llama.cpp {qtype} + imatrix",
                prio_imatrix[qtype],
                lambda q=qtype: bench.llama_file(q, True),
                "llama.cpp + imatrix",
            )
        )
    prio_slim = {("gptq", 4): 21, ("awq", 4): 22, ("rtn", 4): 23, ("gptq", 8): 40, ("rtn", 8): 50, ("awq", 8): 51}
    for bits in (8, 4):
        for method in SLIM_METHODS:
            table.append(
                Row(
                    f"slimlm {method.upper()} W{bits} g32 → {SLIM_TIER[bits]}",
                    prio_slim[method, bits],
                    lambda m=method, b=bits: bench.slim_model_file(m, b),
                    "slimlm (emb f16)",
                )
            )
    for method, bits, prio in (("gptq", 8, 46), ("gptq", 5, 41), ("gptq", 4, 20), ("awq", 4, 44), ("rtn", 4, 45)):
        table.append(
            Row(
                f"slimlm {method.upper()} W{bits} g32 → {SLIM_TIER[bits]}, emb Q8_0†",
                prio,
                lambda m=method, b=bits: bench.slim_model_file(m, b, "q8_0"),
                "slimlm (emb Q8_0†)",
            )
        )
    for qtype, proxy, prio in (("Q4_K_M", "fisher", 42), ("Q3_K_M", "fisher", 43), ("Q3_K_M", "output", 52)):
        budget = f"llama.cpp {qtype} + imatrix"
        table.append(
            Row(
                f"slimlm GPTQ mix Q4_0/Q5_0/Q8_0 ≤ {qtype} size ({proxy} proxy), emb Q8_0†",
                prio,
                lambda q=qtype, b=budget, x=proxy: bench.mix_file(b, bench.llama_file(q, True)[0], x),
                "slimlm (emb Q8_0†)",
            )
        )
    return table


def best_speed(row: dict) -> dict:
    """The llama-bench run of this row with the highest decode tok/s (the machine is shared: other jobs only ever
    slow a run down), with how many runs there were."""
    runs = [row["speed"], *row.get("speed_history", [])]
    return {**max(runs, key=lambda run: run["decode_tps"] or 0), "runs": len(runs)}


def print_table(bench, labels: list[str], markdown: bool) -> None:
    rows_ = bench.rows
    bandwidth = bench.payload.get("bandwidth") or []
    gbps = max((b["gbps"] for b in bandwidth if "max over" in b["method"]), default=None)
    header = [
        "row",
        "token_embd",
        "Linear types",
        "MB",
        "bits/w",
        "ppl ± err",
        "KLD",
        "same top-1 %",
        "prefill tok/s",
        "decode tok/s",
        "load 1m (runs)",
        "bound tok/s",
        "decode GB/s",
    ]
    lines = []
    for label in labels:
        row = rows_.get(label)
        if row is None:
            continue
        p, s = row["perplexity"], best_speed(row)
        linear = " ".join(f"{n}×{t}" for t, n in sorted(row["linear_tensor_types"].items(), key=lambda kv: -kv[1]))
        bound = "—" if gbps is None else f"{gbps * 1e9 / row['tensor_bytes']:.0f}"
        lines.append(
            [
                label,
                row["token_embd_type"],
                linear,
                f"{row['file_bytes'] / 1e6:.1f}",
                f"{row['bits_per_weight']:.2f}",
                f"{p['ppl']:.3f} ± {p['ppl_err']:.3f}",
                f"{p['kld']:.4f}",
                f"{100 * p['same_top_p']:.2f}",
                f"{s['prefill_tps']:.0f}",
                f"{s['decode_tps']:.1f}",
                f"{s['loadavg_1min_before']:.1f}/{s['loadavg_1min_after']:.1f} ({s['runs']})",
                bound,
                f"{s['decode_tps'] * row['tensor_bytes'] / 1e9:.1f}",
            ]
        )
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(
            title=f"slimlm vs llama-quantize — SmolLM2-135M, llama-perplexity -c 512 --chunks "
            f"{bench.args.chunks} on WikiText-2 test, KLD vs f32"
        )
        for column in header:
            table.add_column(column, overflow="fold")
        for line in lines:
            table.add_row(*line)
        Console(width=240).print(table)
    if gbps is not None:
        print(
            f"memory read bandwidth (best): {gbps:.1f} GB/s; bound tok/s = bandwidth / tensor bytes per token; "
            "decode GB/s = decode tok/s x tensor bytes (the bandwidth decoding actually drew)"
        )
    for label, why in bench.skipped.items():
        print(f"skipped {label}: {why}")
