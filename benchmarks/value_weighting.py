"""Does weighting v_proj's Hessian by the attention each token receives (slimlm/value_hessian.py) help the methods
besides GPTQ? The same method with `attention_weighted_v` off and on, on the built-in SmolLM2-135M, scored as every
stage benchmark (common.StageBench: WikiText-2 test @2048, KL and top-1 against the dense model).

Rows: GPTQ W4 g64 (where the weighting was introduced), SparseGPT 50 % unstructured, and EoRA rank 32 after RTN W3
g64 (the weighting applies to EoRA's fit only; RTN has none), each off / on.

    python benchmarks/value_weighting.py [--calib-samples 4] [--eval-windows 8] [--only REGEX] [--resume]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from rich.console import Console
from rich.table import Table

from common import StageBench, add_common_arguments, fmt

ROWS = {
    f"{label} v-weighting {'on' if weighted else 'off'}": [
        *before,
        (stage, {**options, "attention_weighted_v": weighted}),
    ]
    for label, before, stage, options in (
        ("gptq W4 g64", [], "quantize", {"method": "gptq", "bits": 4, "group_size": 64}),
        ("sparsegpt 50%", [], "prune", {"method": "sparsegpt", "sparsity": 0.5}),
        (
            "rtn W3 g64 + eora r32",
            [("quantize", {"method": "rtn", "bits": 3, "group_size": 64, "pack": False})],
            "lowrank",
            {"method": "eora", "rank": 32},
        ),
    )
    for weighted in (False, True)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "value_weighting.json", calib_samples=4)
    parser.set_defaults(speed_runs=0)
    args = parser.parse_args()
    bench = StageBench(args)
    for label, stages in ROWS.items():
        if bench.wanted(label):
            bench.run_stages(label, stages)
    table = Table(title="v_proj Hessian weighted by received attention, off vs on", caption=bench.description)
    for column in ("row", "ppl", "KL", "top-1", "seconds"):
        table.add_column(column)
    for label, row in bench.results.items():
        table.add_row(
            label,
            fmt(row.get("perplexity"), ".3f"),
            fmt(row.get("kl_divergence"), ".4f"),
            fmt(row.get("top1_agreement"), ".3f"),
            fmt(row.get("seconds"), ".0f"),
        )
    Console(width=160).print(table)
    print(f"wrote {args.out}; load average {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
