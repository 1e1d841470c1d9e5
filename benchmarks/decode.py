"""Decode tokens/s at batch 1, plain against the compiled static-cache path, beside llama.cpp and the bandwidth bound.

Rows: the built-in SmolLM2-135M in float32 and bfloat16, RTN-quantized by slimlm's quantize stage (symmetric) to
W8 per channel (int8pack) and W4 group 32 (int4pack; Q4_0's grid), that W4 model with its dense rest (the LM
head, i.e. the tied embedding, and the norms) cast to bfloat16, and that W4 model with its LM head quantized too
(quantize option `lm_head: {bits: 8}`: untied from the embedding, 8-bit per channel on int8pack, as llama.cpp's Q4_0
file keeps its head in Q8_0). Columns:

- plain / fast tok/s: slimlm.evaluate.speed (greedy, `--prompt-tokens` then `--new-tokens` decode steps, no EOS)
  on the plain path (eager, DynamicCache) and the compiled one (StaticCache + torch.compile); compile seconds are
  paid before the runs and reported apart. "path" is the path that actually ran (a failed compile falls back).
- same tokens: how many of the fast path's greedy tokens equal the plain path's (the packed kernels compute in
  bfloat16, so the two paths' rounding may part ways on a near tie; from there the texts differ).
- llama.cpp tok/s: `llama-bench -t <threads> -p 0 -n <new tokens> -r 1` on the same weights: the f32 model
  exported by slimlm (GGUF f32), converted by `llama-quantize` to BF16 / Q8_0 / Q4_0 (its tied token_embd, which
  is also the output head, falls back to Q8_0 in the Q4_0 file: 576 columns are no multiple of 256).
- MB/token and bound tok/s: weight bytes one decode step reads (every Linear as its kernel stores it, the norms,
  the LM head whole, one embedding row; the KV cache is left out) and memory read bandwidth / those bytes, the
  bandwidth measured here as in vs_llamacpp.py (numpy max over 1 GiB, best of 1 and 2 threads).

- ppl: WikiText-2 test perplexity of the model as it runs here (packed kernels included), seq_len 2048, stride
  2048, the first `--ppl-windows` windows (8: the protocol of benchmarks/quantization.py); 0 skips it.

The three measurements of a row are interleaved over `--rounds` rounds (plain, fast, llama.cpp in each) so that a
busy machine slows them alike; figures are medians over the rounds, with the 1-minute load average beside them.
`--rows REGEX` measures some rows and keeps the others from the previous results (same settings), each row with its
own start time and load average.

    python benchmarks/decode.py [--threads 2] [--new-tokens 128] [--rounds 3] [--rows REGEX] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from llamacpp_common import gguf_facts, read_bandwidth
from slimlm.data import load_text
from slimlm.evaluate.machine import machine_info
from slimlm.evaluate.perplexity import perplexity_records
from slimlm.evaluate.speed import greedy_decode, measure_speed, prompt_ids
from slimlm.export import llamacpp
from slimlm.export.options import GGUFExport, export_model
from slimlm.inference.decode import decoder_for
from slimlm.models import load_model, torch_dtype
from slimlm.quantize.packed import quantized_linears
from slimlm.recipe import parse_recipe
from slimlm.registry import StageContext, get_stage
from slimlm.storage import kernel_summary

MODEL = "smollm2-135m"


class Row(NamedTuple):
    dtype: str  # the dtype the model is loaded (and quantized) in
    quantize: dict | None  # quantize stage options
    gguf: str  # the GGUF type llama.cpp runs beside it
    cast: str | None = None  # the dtype the model is cast to after quantizing (its dense rest: LM head, norms)


W4 = {"method": "rtn", "bits": 4, "group_size": 32, "sym": True}
ROWS = {
    "fp32": Row("float32", None, "F32"),
    "bf16": Row("bfloat16", None, "BF16"),
    "W8 int8pack": Row("float32", {"method": "rtn", "bits": 8, "group_size": None, "sym": True}, "Q8_0"),
    "W4 int4pack": Row("float32", W4, "Q4_0"),
    # the same W4 codes; the LM head (tied embedding, 113 MB in float32) and norms in bfloat16, which the int4 kernel
    # takes natively; llama.cpp's Q4_0 file keeps that head in Q8_0 (30 MB)
    "W4 int4pack, bf16 rest": Row("float32", W4, "Q4_0", "bfloat16"),
    # the LM head untied and quantized by the stage (8-bit per channel, int8pack): 28 MB read per token, not 113
    "W4 int4pack + W8 head": Row("float32", {**W4, "lm_head": {"bits": 8}}, "Q4_0"),
}


def loadavg() -> float:
    return os.getloadavg()[0]


def build_model(row: Row):
    loaded = load_model(MODEL, row.dtype)
    if row.quantize is not None:  # the quantize stage as a recipe runs it (RTN needs no calibration data)
        options = parse_recipe({"model": MODEL, "stages": [{"quantize": row.quantize}]}).stages[0].options
        get_stage("quantize").apply(loaded.model, options, StageContext(None, None, None))
    if row.cast is not None:
        loaded.model.to(torch_dtype(row.cast))
    return loaded.model, loaded.tokenizer


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads (module docstring): packed Linears as their kernel holds them."""
    packed = dict(quantized_linears(model))
    total, seen = 0, set()
    for name, module in model.named_modules():
        if name in packed:
            kernel_tensors = module._kernel_tensors or (module.qweight, module.scales)
            tensors = [t for t in kernel_tensors if isinstance(t, torch.Tensor)]
        elif isinstance(module, nn.Embedding):
            tensors = []  # the lookup reads one row; a tied head reads the matrix (counted with the head)
            total += module.weight[0].numel() * module.weight.element_size()
        else:
            tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for tensor in tensors:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight.data_ptr() not in seen:  # tied: the embedding, read whole
        total += head.weight.numel() * head.weight.element_size()
    return total


def gguf_files(work: Path) -> dict[str, Path]:
    """The f32 GGUF of the built-in model (exported by slimlm) and llama-quantize's BF16, Q8_0 and Q4_0 of it."""
    work.mkdir(parents=True, exist_ok=True)
    files = {kind: work / f"{kind}.gguf" for kind in ("F32", "BF16", "Q8_0", "Q4_0")}
    if not files["F32"].exists():
        loaded = load_model(MODEL)
        export_model(loaded.model, loaded.tokenizer, GGUFExport(format="gguf", dtype="f32"), files["F32"])
    for kind, path in files.items():
        if not path.exists():
            llamacpp.run_tool("llama-quantize", [files["F32"], path, kind, "2"])
    return files


def decode_rate(model, tokenizer, args, compile: bool):
    """The decode tokens/s record of one short measure_speed call (its protocol names the path that ran)."""
    records = measure_speed(
        model, tokenizer, args.prompt_tokens, args.new_tokens, runs=1, warmup=1, kernel=kernel_summary(model),
        compile=compile,
    )  # fmt: skip
    return next(r for r in records if r.metric == "decode_tokens_per_s")


def same_tokens(model, tokenizer, args) -> str:
    """How many greedy tokens the fast path shares with the plain one, and where they first differ."""
    input_ids = prompt_ids(tokenizer, args.prompt_tokens, model.config.vocab_size)
    with torch.inference_mode():
        plain = greedy_decode(model, input_ids, args.new_tokens).decoded_ids
        fast = greedy_decode(model, input_ids, args.new_tokens, decoder=decoder_for(model)).decoded_ids
    differ = [i for i, (a, b) in enumerate(zip(plain, fast)) if a != b]
    return f"{len(plain)}/{len(plain)}" if not differ else f"first {differ[0]}/{len(plain)}"


def wikitext_perplexity(model, tokenizer, windows: int) -> dict | None:
    """WikiText-2 test perplexity on the first `windows` windows of 2048 (module docstring), with its protocol."""
    if not windows:
        return None
    records = perplexity_records(model, tokenizer, load_text("wikitext2"), "wikitext2", 2048, windows)
    record = next(r for r in records if r.metric == "perplexity")
    return {"value": record.value, "protocol": record.protocol}


def measure_row(label: str, args, ggufs: dict[str, Path], gbps: float) -> dict:
    row = ROWS[label]
    model, tokenizer = build_model(row)
    rounds = {"plain": [], "fast": [], "llama.cpp": [], "load": []}
    for _ in range(args.rounds):
        rounds["load"].append(loadavg())
        rounds["plain"].append(decode_rate(model, tokenizer, args, compile=False).value)
        fast = decode_rate(model, tokenizer, args, compile=True)
        rounds["fast"].append(fast.value)
        bench = llamacpp.run_bench(ggufs[row.gguf], args.threads, prompt=0, gen=args.new_tokens, repetitions=1)
        rounds["llama.cpp"].append(bench["decode_tps"])
    rounds["load"].append(loadavg())
    median = {key: statistics.median(values) for key, values in rounds.items() if key != "load"}
    # each round's ratio: a burst of other work slows both sides of one round, so this is steadier than medians
    ratios = [fast / llama for fast, llama in zip(rounds["fast"], rounds["llama.cpp"])]
    slim_bytes, gguf_bytes = weight_bytes_per_token(model), gguf_facts(ggufs[row.gguf])["tensor_bytes"]
    return {
        "row": label,
        **row._asdict(),
        "kernel": kernel_summary(model),
        "lm_head_kernel_fast": fast.protocol["lm_head_kernel"],
        "plain_tps": median["plain"],
        "fast_tps": median["fast"],
        "path": fast.protocol["path"],
        "note": fast.note,  # why the plain path ran, and whether the machine was busy
        "compile_seconds": fast.protocol["compile_seconds"],
        "same_tokens": same_tokens(model, tokenizer, args),
        "llamacpp_type": row.gguf,
        "llamacpp_tps": median["llama.cpp"],
        "fast_over_llamacpp": statistics.median(ratios),
        "weight_bytes_per_token": slim_bytes,
        "bound_tps": gbps * 1e9 / slim_bytes,
        "gguf_tensor_bytes": gguf_bytes,
        "gguf_bound_tps": gbps * 1e9 / gguf_bytes,
        "rounds": rounds,
        "load_avg_1min": [min(rounds["load"]), max(rounds["load"])],
        "wikitext2_perplexity": wikitext_perplexity(model, tokenizer, args.ppl_windows),
    }


def print_table(console: Console, rows: list[dict], args, gbps: float) -> None:
    table = Table(title=f"Decode tok/s, batch 1, {args.threads} threads, {args.new_tokens} new tokens ({MODEL})")
    columns = (
        "format", "plain", "fast", "path", "compile s", "same tokens", "llama.cpp", "fast / llama.cpp",
        "MB/token", "bound", "GGUF MB/token", "GGUF bound", "ppl", "load avg",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["row"],
            f"{row['plain_tps']:.1f}",
            f"{row['fast_tps']:.1f}",
            row["path"],
            f"{row['compile_seconds']:.1f}" if row["compile_seconds"] is not None else "-",
            row["same_tokens"],
            f"{row['llamacpp_tps']:.1f} ({row['llamacpp_type']})",
            f"{row['fast_over_llamacpp']:.0%}",
            f"{row['weight_bytes_per_token'] / 1e6:.0f}",
            f"{row['bound_tps']:.0f}",
            f"{row['gguf_tensor_bytes'] / 1e6:.0f}",
            f"{row['gguf_bound_tps']:.0f}",
            "-" if row.get("wikitext2_perplexity") is None else f"{row['wikitext2_perplexity']['value']:.2f}",
            "{:.1f}–{:.1f}".format(*row["load_avg_1min"]),
        )
    console.print(table)
    console.print(
        f"median of {args.rounds} interleaved rounds (fast / llama.cpp: median of the rounds' ratios); bound = "
        f"{gbps:.1f} GB/s measured read bandwidth / weight bytes per token; compile s is paid once per process (FX "
        "graph cache warm or cold, as found), never inside tok/s"
    )


def kept_rows(path: Path, measured: list[dict], args) -> list[dict]:
    """The rows just measured, and those of the previous results not measured this time (a `--rows` subset), in
    ROWS order; previous rows are kept only when their settings match (threads, tokens, rounds) and their row still
    exists. Each row carries its own start time and load average; the bandwidth is the latest run's."""
    settings = ("threads", "prompt_tokens", "new_tokens", "rounds")
    previous = json.loads(path.read_text()) if path.exists() else {}
    same = all(previous.get(key) == getattr(args, key) for key in settings)
    rows = {row["row"]: row for row in previous.get("rows", []) if same and row["row"] in ROWS}
    rows.update({row["row"]: row for row in measured})
    return [rows[label] for label in ROWS if label in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 windows of 2048 per row (0: none)")
    parser.add_argument("--rows", default=".", help="regex over the row names: " + ", ".join(ROWS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimlm-decode-bench"), help="GGUF files, reused")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("SLIMLM_NO_PROGRESS", "1")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    ggufs = gguf_files(args.work)
    bandwidth = read_bandwidth()
    rows = []
    for label in (label for label in ROWS if re.search(args.rows, label)):
        rows.append(
            {"started": time.strftime("%Y-%m-%d %H:%M:%S"), **measure_row(label, args, ggufs, bandwidth["gbps"])}
        )
        print(
            f"{label}: fast {rows[-1]['fast_tps']:.1f} tok/s, llama.cpp {rows[-1]['llamacpp_tps']:.1f}", file=sys.stderr
        )
    rows = kept_rows(args.out, rows, args)
    print_table(Console(width=220), rows, args, bandwidth["gbps"])
    payload = {
        "started": started,
        "torch": torch.__version__,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "machine": machine_info(),
        "bandwidth": bandwidth,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
