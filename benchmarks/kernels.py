"""Low-bit CPU kernels against float32: one Linear's forward at decode (1 row) and prefill (128 rows) shapes.

Every variant is a real module forward (casts included): float32 and bfloat16 nn.Linear, and QuantizedLinear with
int4pack (W4 symmetric, groups of 64 and 32), int8pack (W8 per channel) and the dequantize-then-multiply fallback
(W4 g64, ``dequantized``). Calls are interleaved (each repetition runs every variant once) so that a busy machine
slows them alike; figures are medians. With ``--model``, also the whole built-in model's prefill and decode speed
(slimlm.evaluate.speed) dense float32 against RTN W4 g64 packed, with the kernel and dequantized.

    python benchmarks/kernels.py [--threads N] [--reps N] [--model] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from slimlm.quantize.grid import QuantGrid, quantize_codes
from slimlm.quantize.packed import QuantizedLinear, use_kernel
from slimlm.storage import kernel_summary as kernel_label

SHAPES = [(576, 1536), (1536, 576), (4096, 11008)]  # (in, out): SmolLM2-135M up/down, LLaMA-7B up
ROWS = {"decode": 1, "prefill": 128}
VARIANTS = {  # name -> (grid, kernel) for packed variants
    "int4pack W4 g64": (QuantGrid(4, True, 64), "auto"),
    "int4pack W4 g32": (QuantGrid(4, True, 32), "auto"),
    "int8pack W8 per-channel": (QuantGrid(8, True, None), "auto"),
    "dequantized W4 g64": (QuantGrid(4, True, 64), "dequantized"),
}


def build_variants(in_features: int, out_features: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    modules = {"fp32 F.linear": linear, "bf16 F.linear": nn.Linear(in_features, out_features, bias=False).bfloat16()}
    for name, (grid, kernel) in VARIANTS.items():
        modules[name] = QuantizedLinear.from_linear(linear, quantize_codes(linear.weight, grid), kernel)
    return modules


@torch.inference_mode()
def time_interleaved(modules: dict[str, nn.Module], rows: int, reps: int) -> dict[str, float]:
    """Median microseconds per forward of each module, the variants run in turn within every repetition."""
    in_features = next(iter(modules.values())).in_features
    inputs = {
        name: torch.randn(rows, in_features, dtype=torch.bfloat16 if "bf16" in name else torch.float32)
        for name in modules
    }
    times = {name: [] for name in modules}
    for rep in range(reps + 2):  # two warm-up rounds
        for name, module in modules.items():
            start = time.perf_counter()
            module(inputs[name])
            if rep >= 2:
                times[name].append((time.perf_counter() - start) * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_rows(reps: int) -> list[dict]:
    results = []
    for in_features, out_features in SHAPES:
        modules = build_variants(in_features, out_features)
        for phase, rows in ROWS.items():
            shape_reps = max(3, reps // 8) if in_features * out_features * rows > 1e8 else reps
            timed = time_interleaved(modules, rows, shape_reps)
            for name, micros in timed.items():
                results.append(
                    {
                        "shape": f"{in_features}→{out_features}",
                        "phase": phase,
                        "rows": rows,
                        "variant": name,
                        "us": micros,
                        "speedup_vs_fp32": timed["fp32 F.linear"] / micros,
                        "reps": shape_reps,
                    }
                )
    return results


def model_rows() -> list[dict]:
    """Whole-model prefill/decode: the built-in model dense, then RTN W4 g64 packed with each kernel."""
    from slimlm.evaluate.speed import measure_speed
    from slimlm.models import load_model
    from slimlm.quantize.packed import pack_model
    from slimlm.quantize.rtn import rtn_quantize
    from slimlm.quantize.stage import QuantizeOptions

    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    settings = {"prompt_tokens": 128, "new_tokens": 32, "runs": 3, "warmup": 1}
    rows = [("fp32 dense", measure_speed(model, tokenizer, **settings))]
    rtn_quantize(model, QuantizeOptions(method="rtn", bits=4, group_size=64), None)
    pack_model(model)
    for kernel in ("auto", "dequantized"):
        use_kernel(model, kernel)
        rows.append(
            (
                f"W4 g64 {kernel_label(model).split(' ')[0]}",
                measure_speed(model, tokenizer, kernel=kernel_label(model), **settings),
            )
        )
    return [
        {
            "variant": name,
            **{r.metric: r.value for r in records if r.value is not None},
            "kernel": records[0].protocol["kernel"],
            "settings": settings,
        }
        for name, records in rows
    ]


def print_tables(console: Console, matmuls: list[dict], models: list[dict]) -> None:
    table = Table(title="One Linear forward, median µs (speedup vs fp32 F.linear)")
    variants = list(dict.fromkeys(row["variant"] for row in matmuls))
    for column in ["shape", "phase", *variants]:
        table.add_column(column, justify="right")
    for key in dict.fromkeys((row["shape"], row["phase"]) for row in matmuls):
        cells = {row["variant"]: row for row in matmuls if (row["shape"], row["phase"]) == key}
        table.add_row(*key, *(f"{cells[v]['us']:.0f} ({cells[v]['speedup_vs_fp32']:.2f}×)" for v in variants))
    console.print(table)
    if models:
        table = Table(title="Whole model (smollm2-135m), median of 3 runs")
        for column in ("variant", "prefill ms", "decode tokens/s", "kernel"):
            table.add_column(column)
        for row in models:
            table.add_row(
                row["variant"], f"{row['prefill_ms']:.1f}", f"{row['decode_tokens_per_s']:.1f}", row["kernel"]
            )
        console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=40, help="timed repetitions per shape (fewer for big ones)")
    parser.add_argument("--model", action="store_true", help="also time the built-in model end to end")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    matmuls = matmul_rows(args.reps)
    models = model_rows() if args.model else []
    print_tables(Console(width=200), matmuls, models)
    from slimlm.evaluate.machine import machine_info

    payload = {
        "torch": torch.__version__,
        "threads": args.threads,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "machine": machine_info(),
        "matmul": matmuls,
        "model": models,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
