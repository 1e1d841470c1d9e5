"""KIVI's quantized KV cache on the built-in SmolLM2-135M: KV memory, long-context perplexity, decode speed.

Protocol: WikiText-2 test joined and tokenized as slimlm's perplexity does, cut into non-overlapping windows of
`--seq-len` tokens (default 8,192, the model's context; `--windows` of them). Each window is fed in chunks of
`--chunk` tokens through a fresh cache, as a generation loop feeds a long prompt: every chunk attends to itself in
full precision and to the history as the cache stores it; perplexity is over every predicted token. Rows: the full
cache, KIVI at each of `--bits`, and KIVI with the first `--sinks` tokens also kept full precision (not in KIVI) at
4 and 2 bits. Memory is what the cache holds (codes + float16 scales and minima + full-precision tokens) once 2,048
and `--seq-len` tokens have been fed (first window). Decode speed: greedy single-token steps (`--decode-tokens`,
after one untimed step) from a cache filled by one 2,048-token prefill, and from the cache at the end of the first
window. No fused low-bit attention exists on CPU: a quantized cache dequantizes its history at every step, and the
speed columns say what that costs.

With ``--transformers quanto|hqq`` (packages installed by hand: not slimlm dependencies), transformers' own
QuantizedCache at 4 and 2 bits is measured the same way beside slimlm's.

    python benchmarks/kv_cache.py [--windows N] [--seq-len N] [--chunk C] [--bits 8 4 2] [--dtype D] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache, QuantizedCache

from slimlm.data import eval_windows, load_text, tokenize_joined
from slimlm.evaluate.machine import machine_info
from slimlm.inference.kv_cache import KiviCache, cache_bytes, stream_nll
from slimlm.models import load_model
from slimlm.progress import progress_bar
from slimlm.report import atomic_write

RESULTS = Path(__file__).parent / "results"
MEMORY_AT = 2048


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=1, help="windows of --seq-len (the split has 37 of 8192)")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument(
        "--group-size", type=int, default=32, help="KIVI's G (tokens per key group, channels per value group)"
    )
    parser.add_argument("--residual", type=int, default=128, help="KIVI's R: recent tokens kept full precision")
    parser.add_argument("--sinks", type=int, default=4, help="first tokens kept full in the KIVI+sinks rows (0: none)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--transformers", choices=["quanto", "hqq"], help="also transformers' QuantizedCache")
    parser.add_argument(
        "--dtype", default="bfloat16", help="bfloat16 (default: the full cache is 16-bit, as KIVI's baseline)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="1: on the shared 2-core machine two threads ran 20× slower"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_cache.json")
    return parser.parse_args()


def cache_makers(model, args) -> dict[str, Callable]:
    config = model.config
    makers = {"full (DynamicCache)": lambda: DynamicCache(config=config)}
    for bits in args.bits:
        makers[f"KIVI int{bits}"] = lambda bits=bits: KiviCache(config, bits, args.group_size, args.residual)
    for bits in (4, 2) if args.sinks else ():
        makers[f"KIVI int{bits} + {args.sinks} sinks"] = lambda bits=bits: KiviCache(
            config, bits, args.group_size, args.residual, args.sinks
        )
    if args.transformers:
        for bits in (4, 2):
            makers[f"transformers {args.transformers} int{bits}"] = lambda bits=bits: QuantizedCache(
                args.transformers, config, nbits=bits, q_group_size=args.group_size, residual_length=args.residual
            )
    return makers


def stored_bytes(cache) -> int:
    """What a cache holds between steps; transformers' quantized layers keep backend tensors, counted inner by inner."""
    if not isinstance(cache, QuantizedCache):
        return sum(cache_bytes(cache).values())
    names = ("keys", "values", "_quantized_keys", "_quantized_values")
    return sum(_nbytes(getattr(layer, name, None)) for layer in cache.layers for name in names)


def _nbytes(value) -> int:
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, torch.Tensor):
        if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:  # quanto's packed tensors
            return sum(_nbytes(getattr(value, name)) for name in value.__tensor_flatten__()[0])
        return value.nbytes
    return 0


@torch.inference_mode()
def decode_speed(model, cache, steps: int) -> float:
    """Greedy single-token steps per second from `cache` (one untimed step first)."""
    token = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - start)


def run_config(name: str, make_cache: Callable, model, windows: torch.Tensor, args) -> dict:
    total_nll, tokens, memory, speeds = 0.0, 0, {}, {}
    started = time.perf_counter()
    for index, window in enumerate(windows):
        cache = make_cache()

        def after_chunk(seen: int, cache=cache, first=index == 0) -> None:
            if first and seen == MEMORY_AT:
                memory[MEMORY_AT] = stored_bytes(cache)
            advance()

        with progress_bar(f"{name} window {index + 1}", total=-(-window.numel() // args.chunk)) as advance:
            nll = stream_nll(model, window, cache, args.chunk, after_chunk)
        total_nll, tokens = total_nll + nll.sum().item(), tokens + nll.numel()
        if index == 0:
            memory[window.numel()] = stored_bytes(cache)
            speeds[window.numel()] = decode_speed(model, cache, args.decode_tokens)
    if windows.shape[1] > MEMORY_AT:  # a fresh cache filled by one 2k-token prefill (a quanto cache cannot be copied)
        cache = make_cache()
        with torch.inference_mode():
            model(windows[:1, :MEMORY_AT].to(model.device), past_key_values=cache, logits_to_keep=1)
        speeds[MEMORY_AT] = decode_speed(model, cache, args.decode_tokens)
    return {
        "perplexity": math.exp(total_nll / tokens),
        "tokens_scored": tokens,
        "kv_bytes": memory,
        "decode_tokens_per_s": speeds,
        "seconds": time.perf_counter() - started,
    }


def print_table(rows: dict, seq_len: int) -> None:
    full = next(iter(rows.values()))
    table = Table(title=f"KV cache on SmolLM2-135M, WikiText-2 test windows of {seq_len}")
    columns = (
        "cache",
        "ppl",
        "Δ ppl",
        f"KV MiB @{MEMORY_AT}",
        f"KV MiB @{seq_len}",
        "× smaller",
        "decode tok/s @2k",
        f"@{seq_len}",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in rows.items():
        kv, speed = row["kv_bytes"], row["decode_tokens_per_s"]
        table.add_row(
            name,
            f"{row['perplexity']:.3f}",
            f"{row['perplexity'] - full['perplexity']:+.3f}",
            f"{kv.get(MEMORY_AT, 0) / 2**20:.1f}",
            f"{kv[seq_len] / 2**20:.1f}",
            f"{full['kv_bytes'][seq_len] / kv[seq_len]:.2f}",
            f"{speed.get(MEMORY_AT, 0):.1f}",
            f"{speed[seq_len]:.1f}",
        )
    Console(width=200).print(table)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    loaded = load_model("smollm2-135m", dtype=args.dtype)
    model = loaded.model
    source = load_text("wikitext2")
    windows = eval_windows(tokenize_joined(loaded.tokenizer, source), args.seq_len, args.windows, source.path)
    rows = {name: run_config(name, make, model, windows, args) for name, make in cache_makers(model, args).items()}
    print_table(rows, args.seq_len)
    payload = {
        "model": "smollm2-135m",
        "protocol": {
            "data": source.path,
            "seq_len": args.seq_len,
            "windows": len(windows),
            "chunk": args.chunk,
            "kivi": {
                "group_size": args.group_size,
                "residual_length": args.residual,
                "sinks_row": args.sinks,
                "scales": "float16",
            },
            "dtype": args.dtype,
            "threads": args.threads,
            "attention": model.config._attn_implementation,
            "decode_tokens": args.decode_tokens,
        },
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "machine": machine_info(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(payload, indent=2).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
