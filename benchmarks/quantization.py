"""Quantization benchmark on the built-in SmolLM2-135M (dequantized Q4_1 original): quality, size, speed, time, memory.

Rows: fp32; RTN / GPTQ / AWQ at W4 g64, W3 g64 and W8 per channel; GPTQ W3/W4 + EoRA rank 16 and 64; SmoothQuant
W8A8; k-means 4-bit sharing; SVD at 50 % rank on the MLP. Every row runs its stages through the stage registry on
a fresh copy of the fp32 model, with the same calibration windows (c4, seeded), saves the result with slimlm's
`save_model` (size on disk and bits per weight come from that folder: packed formats count what they write) and is
evaluated on WikiText-2 test (seq_len 2048, first `--eval-windows` windows) against the fp32 model.

SmolLM2's hidden size 576 is not a multiple of 128, so g64 stands in for the usual g128. The original's Linear
weights were stored as Q4_1 (4-bit asymmetric, blocks of 32): a 4-bit grid with groups of 32 aligned to those
blocks can land back on the stored values and flatter 4-bit methods, which is why no row uses g32.
The speed columns name the kernel that ran: a low-bit kernel, or "dequantized" (weights expanded, then an
ordinary matmul: no low-bit speedup is claimed).

    python benchmarks/quantization.py [--calib-samples 4] [--eval-windows 8] [--only REGEX] [--resume]
"""

from __future__ import annotations

import argparse
import sys

import torch
from rich.console import Console
from rich.table import Table

from common import StageBench, add_common_arguments, fmt, mib
from slimlm.registry import get_stage
from slimlm.storage import kernel_summary


def _weight_only(method: str, bits: int, group_size: int | None) -> tuple[str, dict]:
    return ("quantize", {"method": method, "bits": bits, "group_size": group_size, "sym": True})


def rows() -> list[tuple[str, list[tuple[str, dict]]]]:
    """(label, stages) for every row."""
    table = []
    for bits, group_size, label in (
        (4, 64, "W4 g64"),
        (3, 64, "W3 g64"),
        (2, 64, "W2 g64"),
        (8, None, "W8 per-channel"),
    ):
        for method in ("rtn", "gptq", "awq"):
            table.append((f"{method} {label}", [_weight_only(method, bits, group_size)]))
    for bits in (4, 3):
        for rank in (16, 64):
            table.append(
                (
                    f"gptq W{bits} g64 + eora r{rank}",
                    [_weight_only("gptq", bits, 64), ("lowrank", {"method": "eora", "rank": rank})],
                )
            )
    table += [
        ("smoothquant W8A8", [("quantize", {"method": "smoothquant", "bits": 8, "group_size": None})]),
        ("kmeans 4-bit", [("share", {"method": "kmeans", "bits": 4})]),
        (
            "svd 50% rank MLP",
            [("lowrank", {"method": "svd", "rank_ratio": 0.5, "targets": ["gate_proj", "up_proj", "down_proj"]})],
        ),
    ]
    return table


def missing_stage(stages: list[tuple[str, dict]]) -> str | None:
    """The first stage or method this checkout cannot run yet (rows are skipped, not faked)."""
    for name, options in stages:
        spec = get_stage(name)
        if spec is None:
            return f"stage {name}"
        try:
            spec.options_model(options).model_validate(options)
        except Exception as error:  # noqa: BLE001 - an unknown method of a known stage
            return f"{name} {options.get('method')}: {str(error).splitlines()[-1].strip()}"
    return None


def print_table(results: dict, description: str) -> None:
    table = Table(title="slimlm quantization benchmark — SmolLM2-135M, WikiText-2 test @2048", caption=description)
    columns = (
        "row",
        "ppl",
        "KL",
        "top-1",
        "disk MiB",
        "bits/weight",
        "decode tok/s",
        "prefill ms",
        "kernel",
        "quantize s",
        "peak extra MiB",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for label, row in results.items():
        kernel = row.get("protocols", {}).get("decode_tokens_per_s", {}).get("kernel", "—")
        table.add_row(
            label,
            fmt(row["perplexity"], ".2f"),
            fmt(row.get("kl_divergence"), ".4f"),
            fmt(row.get("top1_agreement"), ".3f"),
            mib(row.get("size_on_disk")),
            fmt(row.get("bits_per_weight"), ".2f"),
            fmt(row.get("decode_tokens_per_s"), ".1f"),
            fmt(row.get("prefill_ms"), ".0f"),
            kernel,
            fmt(row.get("seconds"), ".0f"),
            mib(row.get("peak_extra_rss_bytes")),
        )
    Console(width=220).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "quantization.json", calib_samples=4)
    args = parser.parse_args()

    bench = StageBench(args)
    if bench.wanted("fp32"):
        bench.run_stages("fp32", [], save=True)
    for label, stages in rows():
        if not bench.wanted(label):
            continue
        missing = missing_stage(stages)
        if missing:
            print(f"skip {label}: {missing} is not available in this checkout", file=sys.stderr)
            continue
        bench.run_stages(label, stages, save=True, speed_kernel=kernel_summary)
    print_table(bench.results, bench.description)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
