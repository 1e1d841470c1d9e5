"""Attention kernels at prefill on the built-in SmolLM2-135M: eager against SDPA, time and peak memory.

One forward over `--lengths` tokens (default 512, 2,048, 8,192; seeded random ids, batch 1, no cache, only the last
position's logits so the LM head does not dominate memory) with each attention implementation:

- ``eager``: transformers' matmul + softmax, the full attention matrix materialized (the only one that can return
  attention probabilities: slimlm's distillation switches to it for that alone);
- ``sdpa``: torch's scaled_dot_product_attention as transformers calls it by default; on CPU torch dispatches an
  unpadded causal prefill to its flash-attention kernel (``sdpa flash``) unless told otherwise;
- ``sdpa math`` / ``sdpa flash``: SDPA restricted to one backend (torch.nn.attention.sdpa_kernel), to show which one
  the default ran; a backend torch cannot use for the call is reported as unavailable, not timed.

transformers' ``flash_attention_2`` needs the CUDA flash-attn package and is reported as unavailable on a CPU.
Peak memory is the process's resident high-water mark during the forward above what it held before (VmHWM reset,
slimlm.evaluate.footprint.PeakMemory), after returning freed heap to the system. One untimed 512-token forward per
kernel first; the kernels take turns within each run; figures are medians of `--runs` (`--long-runs` from 4,096
tokens on).

    python benchmarks/attention.py [--lengths 512 2048 8192] [--runs N] [--dtype D] [--threads T] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.utils import is_flash_attn_2_available

from slimlm.evaluate.footprint import PeakMemory
from slimlm.evaluate.machine import machine_info
from slimlm.models import load_model
from slimlm.report import atomic_write

RESULTS = Path(__file__).parent / "results"
KERNELS = {  # row -> (transformers attention implementation, SDPA backends allowed or None for torch's choice)
    "eager": ("eager", None),
    "sdpa": ("sdpa", None),
    "sdpa math": ("sdpa", [SDPBackend.MATH]),
    "sdpa flash": ("sdpa", [SDPBackend.FLASH_ATTENTION]),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--runs", type=int, default=3, help="runs per kernel below 4,096 tokens")
    parser.add_argument("--long-runs", type=int, default=1, help="runs per kernel from 4,096 tokens")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--threads", type=int, default=1, help="1: on the shared 2-core machine two threads ran 20× slower"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "attention.json")
    return parser.parse_args()


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc), so one run's leftovers do not hide the next run's peak."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@torch.inference_mode()
def timed_forward(model, ids: torch.Tensor, backends) -> tuple[float, int]:
    """Seconds and peak extra resident bytes of one forward."""
    release_freed_memory()
    context = sdpa_kernel(backends) if backends else contextlib.nullcontext()
    with context, PeakMemory() as peak:
        start = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        seconds = time.perf_counter() - start
    return seconds, peak.peak_bytes - peak.start_bytes


def measure_length(model, length: int, runs: int) -> dict[str, dict]:
    """Every kernel on one length; the kernels take turns within each run, so a busy machine slows them alike."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    measured: dict[str, list] = {kernel: [] for kernel in KERNELS}
    why: dict[str, str] = {}
    for _ in range(runs):
        for kernel, (implementation, backends) in KERNELS.items():
            model.set_attn_implementation(implementation)
            try:
                measured[kernel].append(timed_forward(model, ids, backends))
            except RuntimeError as err:  # "No available kernel": the backend cannot serve this call
                why[kernel] = str(err).splitlines()[0][:200]
    return {
        kernel: {"available": False, "why": why[kernel]}
        if kernel in why
        else {
            "available": True,
            "seconds": statistics.median(s for s, _ in results),
            "peak_extra_bytes": max(b for _, b in results),
            "runs": runs,
        }
        for kernel, results in measured.items()
    }


def print_table(rows: dict, lengths: list[int]) -> None:
    table = Table(title="Prefill of SmolLM2-135M: seconds / peak extra MiB")
    for column in ("kernel", *(f"{n} tokens" for n in lengths)):
        table.add_column(column, justify="right")
    for kernel, by_length in rows.items():
        cells = [
            f"{row['seconds']:.2f} s / {row['peak_extra_bytes'] / 2**20:.0f} MiB" if row["available"] else "n/a"
            for row in (by_length[n] for n in lengths)
        ]
        table.add_row(kernel, *cells)
    Console(width=200).print(table)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    model = load_model("smollm2-135m", dtype=args.dtype).model
    measure_length(model, 512, 1)  # warm-up: first-call costs (thread pools, kernel selection)
    by_length = {}
    for length in args.lengths:
        by_length[length] = measure_length(model, length, args.runs if length < 4096 else args.long_runs)
        print(length, {k: r.get("seconds") for k, r in by_length[length].items()}, flush=True)
    rows = {kernel: {length: by_length[length][kernel] for length in args.lengths} for kernel in KERNELS}
    print_table(rows, args.lengths)
    payload = {
        "model": "smollm2-135m",
        "protocol": {
            "batch": 1,
            "ids": "seeded random",
            "logits_to_keep": 1,
            "dtype": args.dtype,
            "threads": args.threads,
            "runs": {"below 4096": args.runs, "from 4096": args.long_runs},
            "memory": "VmHWM above resident memory at the start of the forward",
        },
        "flash_attention_2": "available" if is_flash_attn_2_available() else "unavailable (needs CUDA flash-attn)",
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "machine": machine_info(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(payload, indent=2).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
