"""Streaming perplexity with attention sinks (StreamingLLM) on the built-in SmolLM2-135M.

One long stream: the WikiText-2 test split joined and tokenized as slimlm's perplexity does, its first
`--stream-tokens` tokens (default 32,768 = 4 × the model's 8,192 context), fed in chunks of `--chunk` tokens through
each cache as generation would feed it; every token's next-token NLL is kept. Methods:

- ``dense``: the full cache (DynamicCache), until the stream reaches the model's context (then it has none left);
- ``window 0+L``: the last L tokens only (StreamingLLM's cache with no sinks);
- ``sinks k+(L−k)`` for k = 1, 4, 8: the first k tokens plus the last L − k (the same total L, as the paper's table);
- ``recompute``: sliding-window recomputation, the quality reference: a fresh forward over the L tokens before each
  scored chunk plus the chunk. It costs L/chunk times the streaming methods, so only every `--recompute-every`-th
  chunk is scored; the table compares every method with it on those same chunks.

Also measured: the share of attention each layer sends to the first token (eager attention over one window of L
tokens), the reason sinks matter. Writes JSON (default benchmarks/results/streaming.json) and a plot of perplexity
over position (benchmarks/results/streaming_ppl.png).

    python benchmarks/streaming.py [--stream-tokens N] [--cache-size L] [--chunk C] [--dtype D] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from slimlm.data import load_text, tokenize_joined
from slimlm.evaluate.machine import machine_info
from slimlm.inference.kv_cache import cache_bytes, stream_nll
from slimlm.inference.sink_cache import SinkCache
from slimlm.models import load_model
from slimlm.progress import progress_bar
from slimlm.report import atomic_write

RESULTS = Path(__file__).parent / "results"
SINK_COUNTS = (0, 1, 4, 8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream-tokens", type=int, default=4 * 8192)
    parser.add_argument("--cache-size", type=int, default=1024, help="L: tokens kept (sinks + window)")
    parser.add_argument("--chunk", type=int, default=64, help="tokens fed per forward")
    parser.add_argument("--recompute-every", type=int, default=16, help="score recomputation on every n-th chunk")
    parser.add_argument("--bin", type=int, default=512, help="tokens per point of the plot")
    parser.add_argument(
        "--dtype", default="bfloat16", help="bfloat16 (default: twice float32's speed on this CPU) or float32"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="1 by default: on the shared 2-core machine two threads ran 20× slower"
    )
    parser.add_argument("--only", help="regex on method names to run (default all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "streaming.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "streaming_ppl.png")
    return parser.parse_args()


def methods(cache_size: int) -> list[str]:
    windows = [f"window 0+{cache_size}"] + [f"sinks {k}+{cache_size - k}" for k in SINK_COUNTS[1:]]
    return ["dense", *windows, "recompute"]


def sink_count(name: str) -> int:
    return int(re.search(r"(\d+)\+", name).group(1))


def run_method(name: str, model, stream: torch.Tensor, args) -> dict:
    context = model.config.max_position_embeddings
    start = time.perf_counter()
    if name == "recompute":
        nll, scored = recompute_nll(model, stream, args)
        stored = None
    else:
        if name == "dense":
            stream, cache = stream[:context], DynamicCache(config=model.config)
        else:
            sinks = sink_count(name)
            cache = SinkCache(model.config, window=args.cache_size - sinks, sinks=sinks)
        with progress_bar(name, total=-(-stream.numel() // args.chunk)) as advance:
            nll = stream_nll(model, stream, cache, args.chunk, lambda seen: advance())
        scored = torch.ones_like(nll, dtype=torch.bool)
        stored = cache_bytes(cache)["full"]
    seconds = time.perf_counter() - start
    return {"nll": nll, "scored": scored, "seconds": seconds, "kv_bytes_at_end": stored}


@torch.inference_mode()
def recompute_nll(model, stream: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every `recompute_every`-th chunk, each from a fresh forward over the L tokens before it plus itself."""
    nll = torch.full((stream.numel() - 1,), float("nan"))
    starts = range(0, stream.numel() - 1, args.chunk * args.recompute_every)
    with progress_bar("recompute", total=len(starts)) as advance:
        for start in starts:
            first = max(0, start - args.cache_size)
            end = min(start + args.chunk, stream.numel() - 1)
            logits = model(stream[None, first:end].to(model.device), logits_to_keep=end - start).logits[0].float()
            nll[start:end] = F.cross_entropy(logits, stream[start + 1 : end + 1], reduction="none").cpu()
            advance()
    return nll, ~nll.isnan()


@torch.inference_mode()
def first_token_attention(model, stream: torch.Tensor, length: int) -> list[float]:
    """Mean share of attention that queries past the first 64 positions give to position 0, per layer (eager)."""
    kernel = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention probabilities exist only in eager attention
    try:
        attentions = model(stream[None, :length].to(model.device), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(kernel)
    return [layer[0, :, 64:, 0].float().mean().item() for layer in attentions]


def perplexity(nll: torch.Tensor, mask: torch.Tensor) -> float | None:
    chosen = nll[mask & ~nll.isnan()]
    return math.exp(chosen.mean().item()) if chosen.numel() else None


def summarize(rows: dict, args, context: int) -> dict[str, dict]:
    """Perplexity of each streaming method over position ranges (every token it scored), and of every method over
    the chunks recomputation scored in the same ranges: the like-for-like comparison with the reference."""
    length = args.stream_tokens - 1
    position = torch.arange(length)
    spans = {
        f"0–{args.cache_size}": position < args.cache_size,
        f"{args.cache_size}–{context}": (position >= args.cache_size) & (position < context),
        f"{context}–end": position >= context,
    }
    reference = rows["recompute"]["scored"] if "recompute" in rows else torch.zeros(length, dtype=torch.bool)
    summary = {}
    for name, row in rows.items():
        nll = torch.full((length,), float("nan"))
        nll[: row["nll"].numel()] = row["nll"]
        own = {label: None if name == "recompute" else perplexity(nll, mask) for label, mask in spans.items()}
        beside = {f"{label} on recompute chunks": perplexity(nll, mask & reference) for label, mask in spans.items()}
        del beside[f"0–{args.cache_size} on recompute chunks"]  # before the first eviction every cache is exact
        width = args.bin * (4 if name == "recompute" else 1)  # a few scored chunks per point
        summary[name] = {**own, **beside, "curve_bin": width, "curve": binned_perplexity(nll, width)}
    return summary


def binned_perplexity(nll: torch.Tensor, width: int) -> list[float | None]:
    """exp(mean NLL) over each run of `width` positions (None where the method scored none)."""
    return [
        perplexity(nll[s : s + width], torch.ones(min(width, nll.numel() - s), dtype=torch.bool))
        for s in range(0, nll.numel(), width)
    ]


def plot(summary: dict, args, context: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 5))
    for name, row in summary.items():
        width = row["curve_bin"]
        points = [(i * width + width / 2, v) for i, v in enumerate(row["curve"]) if v is not None]
        style = {"marker": "o", "linestyle": "none"} if name == "recompute" else {}
        axes.plot(*zip(*points), label=name, **style)
    axes.axvline(args.cache_size, color="grey", linestyle=":", label=f"first eviction ({args.cache_size})")
    axes.axvline(context, color="black", linestyle="--", label=f"model context ({context})")
    ylabel = f"perplexity per {args.bin} tokens (recompute: its chunks in {4 * args.bin})"
    axes.set(yscale="log", xlabel="position in the stream (tokens)", ylabel=ylabel)
    axes.set_title(
        f"SmolLM2-135M, WikiText-2 test as one stream, cache of {args.cache_size} tokens, chunks of {args.chunk}"
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)


def print_table(summary: dict, rows: dict, shares: list[float] | None) -> None:
    labels = [label for label in next(iter(summary.values())) if not label.startswith("curve")]
    table = Table(title="Streaming perplexity (WikiText-2 test, one stream)")
    for column in ("method", *(f"ppl {label}" for label in labels), "KV MiB kept", "s"):
        table.add_column(column, justify="right")
    for name, row in summary.items():
        stored = rows[name]["kv_bytes_at_end"]
        cells = ["—" if row[label] is None else f"{row[label]:.2f}" for label in labels]
        table.add_row(name, *cells, "—" if stored is None else f"{stored / 2**20:.1f}", f"{rows[name]['seconds']:.0f}")
    console = Console(width=200)
    console.print(table)
    if shares:
        console.print("attention to the first token, by layer: " + " ".join(f"{s:.2f}" for s in shares))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    loaded = load_model("smollm2-135m", dtype=args.dtype)
    model, context = loaded.model, loaded.model.config.max_position_embeddings
    stream = tokenize_joined(loaded.tokenizer, load_text("wikitext2"))[: args.stream_tokens]
    args.stream_tokens = stream.numel()
    chosen = [name for name in methods(args.cache_size) if args.only is None or re.search(args.only, name)]
    rows = {name: run_method(name, model, stream, args) for name in chosen}
    shares = first_token_attention(model, stream, args.cache_size)
    summary = summarize(rows, args, context)
    print_table(summary, rows, shares)
    plot(summary, args, context)
    payload = {
        "model": "smollm2-135m",
        "protocol": {
            "data": "wikitext2 test, rows joined with \\n\\n, tokenized without special tokens",
            "stream_tokens": args.stream_tokens,
            "cache_size": args.cache_size,
            "chunk": args.chunk,
            "recompute_every": args.recompute_every,
            "dtype": args.dtype,
            "threads": args.threads,
            "attention": model.config._attn_implementation,
            "positions": "text positions for queries; sink keys re-rotated so query-key distances are in-cache",
        },
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "machine": machine_info(),
        "first_token_attention_by_layer": shares,
        "seconds": {name: row["seconds"] for name, row in rows.items()},
        "kv_bytes_at_end": {name: row["kv_bytes_at_end"] for name, row in rows.items()},
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(payload, indent=1).encode())
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
