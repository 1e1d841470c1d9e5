"""slimlm's GPTQ side by side with llmcompressor's, on the built-in SmolLM2-135M: same model, same calibration windows,
same evaluation; perplexity and quantization-time ratios (slimlm / peer).

Both rows are 4-bit symmetric integer weights in groups of 64 input columns on every decoder Linear (embeddings, norms
and the tied LM head stay fp32), GPTQ with damping 0.01 and blocks of 128 (both libraries' defaults):

- slimlm: `quantize` stage, method gptq (common.StageBench, exactly as benchmarks/quantization.py's "gptq W4 g64").
  Grid: ggml Q4_0's rule, scale = (signed value of largest magnitude) / −8, codes −8..7, the extreme value exactly
  on −8; group scales set as GPTQ reaches each group (from the weights as updated so far); no act_order;
  true-sequential within each decoder layer.
- llmcompressor (peer): `oneshot` with a GPTQModifier whose config_groups ask for int4, symmetric, strategy "group",
  group_size 64 (its W4A16 preset's group of 128 does not divide SmolLM2's hidden size 576), ignore lm_head,
  otherwise its defaults. Grid: compressed-tensors' symmetric int4, scale = max|w| / 7.5, codes round(w/scale)
  clamped to −8..7 (so +max|w| lands on 7, one half step short); group scales from the original weights before
  GPTQ (its static activation ordering, the default: columns visited by descending diag H); all Linears of a
  decoder layer calibrated in one pass.

llmcompressor pins an older transformers than slimlm, so it runs in a venv of its own, benchmarks/.peer-venv
(scripts/peer_venv.sh makes it when it is missing), through benchmarks/peer/llmcompressor_gptq.py in a subprocess
on CPU. That script receives the dense model as a plain HF folder (slimlm's save_model) and the calibration
windows as a safetensors file, and hands back the dequantized (fake-quantized) decoder Linear weights; they are
loaded into a copy of the dense model here and evaluated with the same StageBench.measure as slimlm's row
(WikiText-2 test @2048, KL and top-1 against the dense model).

Timings: "quantize s" is the quantization call alone on each side (slimlm's stage; llmcompressor's `oneshot`,
which includes building its dataloader and tracing the model); the peer's total, with its imports, data set and
model load and oneshot (not the weight checks and file writing that follow), is reported beside it. Both sides run
with the same torch thread count; run it on an otherwise idle machine, the time ratio means little otherwise.

    python benchmarks/peer_llmcompressor.py [--calib-samples 16] [--calib-seq-len 2048] [--eval-windows 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from common import StageBench, add_common_arguments, fmt
from slimlm.models import save_model
from slimlm.report import atomic_write

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / "benchmarks" / ".peer-venv"
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peer" / "llmcompressor_gptq.py"
SLIMLM_LABEL = "slimlm gptq W4 g64"
PEER_LABEL = "llmcompressor gptq W4 g64"
SLIMLM_STAGES = [("quantize", {"method": "gptq", "bits": 4, "group_size": 64, "sym": True})]
SLIMLM_GRID = (
    "ggml Q4_0 rule: scale = signed max / -8 per group of 64, codes -8..7; group scales set as GPTQ "
    "reaches each group; no act_order; true-sequential within a layer"
)
PEER_GRID = (
    "compressed-tensors int4 symmetric: scale = max|w| / 7.5 per group of 64 from the original weights, "
    "codes round(w/scale) clamped to -8..7; static act order; one calibration pass per layer"
)


def ensure_peer_venv() -> None:
    """scripts/peer_venv.sh is idempotent (a no-op once the venv is built from the current script)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "peer_venv.sh")], check=True)
    if not PEER_PYTHON.exists():
        sys.exit(f"{PEER_PYTHON} missing after scripts/peer_venv.sh")


def run_peer(bench: StageBench, scratch: Path) -> tuple[dict, dict]:
    """The dense model as an HF folder and the windows as a file, llmcompressor's GPTQ in the peer venv; returns its
    dequantized weights and its JSON summary."""
    folder = scratch / "dense"
    save_model(bench.dense, bench.tokenizer, folder)
    windows = scratch / "windows.safetensors"
    save_file({"input_ids": bench.windows.to(torch.int64).contiguous()}, str(windows))
    out = scratch / "peer_weights.safetensors"
    summary_path = scratch / "peer.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # nothing of slimlm's venv may leak into the peer's
    command = [
        str(PEER_PYTHON),
        str(PEER_SCRIPT),
        str(folder),
        str(windows),
        str(out),
        "--json",
        str(summary_path),
        "--threads",
        str(torch.get_num_threads()),
    ]
    print(f"peer: {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env=env, cwd=scratch)
    return load_file(str(out)), json.loads(summary_path.read_text())


def peer_model(bench: StageBench, weights: dict):
    """A copy of the dense model with the peer's dequantized decoder Linear weights in place."""
    model = copy.deepcopy(bench.dense)
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        sys.exit(f"peer weights name parameters the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            if params[name].shape != value.shape:
                sys.exit(f"{name}: peer shape {tuple(value.shape)}, model {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
    return model


def ratios(slimlm: dict, peer: dict) -> dict:
    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    return {
        "perplexity": ratio(slimlm.get("perplexity"), peer.get("perplexity")),
        "quantize_seconds": ratio(slimlm.get("seconds"), peer.get("seconds")),
    }


def verdict(ratio: float | None) -> str | None:
    """The goal is a ratio slimlm / peer of at most 1."""
    return None if ratio is None else ("met" if ratio <= 1 else "missed")


def print_table(results: dict, comparison: dict, description: str) -> None:
    table = Table(title="GPTQ W4 g64 side by side — SmolLM2-135M, WikiText-2 test @2048", caption=description)
    for column in ("row", "grid", "ppl", "KL", "top-1", "quantize s", "peer total s"):
        table.add_column(column, overflow="fold")
    for label in (SLIMLM_LABEL, PEER_LABEL):
        row = results.get(label)
        if row is None:
            continue
        table.add_row(
            label,
            row.get("grid", "—"),
            fmt(row.get("perplexity"), ".3f"),
            fmt(row.get("kl_divergence"), ".4f"),
            fmt(row.get("top1_agreement"), ".3f"),
            fmt(row.get("seconds"), ".1f"),
            fmt(row.get("peer", {}).get("total_seconds"), ".1f"),
        )
    r = comparison["ratios"]
    table.add_row("slimlm / peer", "", fmt(r["perplexity"], ".4f"), "", "", fmt(r["quantize_seconds"], ".3f"), "")
    Console(width=200).print(table)
    goal = comparison["goal"]
    print(
        f"goal (ppl ratio ≤ 1 and time ratio ≤ 1): perplexity {goal['perplexity']}, time {goal['time']}",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "peer_llmcompressor.json")
    parser.set_defaults(speed_runs=0)
    for action in parser._actions:  # two rows, always both: --only and --resume mean nothing here (see --skip-slimlm)
        if action.dest in ("only", "resume"):
            action.help = argparse.SUPPRESS
    parser.add_argument(
        "--skip-slimlm",
        action="store_true",
        help=f"reuse the '{SLIMLM_LABEL}' row of --out (same calibration and evaluation settings)",
    )
    args = parser.parse_args()
    args.only, args.resume = None, False
    previous = json.loads(args.out.read_text()) if args.skip_slimlm and args.out.exists() else None
    if args.skip_slimlm:
        if previous is None or SLIMLM_LABEL not in previous.get("rows", {}):
            sys.exit(f"--skip-slimlm: no '{SLIMLM_LABEL}' row in {args.out}")
        wanted = {
            "calibration": {"data": "c4", "samples": args.calib_samples, "seq_len": args.calib_seq_len, "seed": 0},
            "evaluation": {"data": "wikitext2 test", "seq_len": 2048, "windows": args.eval_windows},
        }
        for key, value in wanted.items():
            if previous.get(key) != value:
                sys.exit(f"--skip-slimlm: {args.out} was measured with {key} {previous.get(key)}, not {value}")

    ensure_peer_venv()
    bench = StageBench(args)
    if args.skip_slimlm:
        bench.results[SLIMLM_LABEL] = previous["rows"][SLIMLM_LABEL]
        print(f"reusing {SLIMLM_LABEL} from {args.out}", file=sys.stderr)
    else:
        bench.run_stages(SLIMLM_LABEL, SLIMLM_STAGES)
        bench.results[SLIMLM_LABEL]["grid"] = SLIMLM_GRID
        bench.results[SLIMLM_LABEL]["torch_threads"] = torch.get_num_threads()

    with tempfile.TemporaryDirectory(prefix="slimlm-peer-") as scratch:
        weights, summary = run_peer(bench, Path(scratch))
    model = peer_model(bench, weights)
    bench.measure(
        PEER_LABEL,
        model,
        summary["oneshot_seconds"],
        None,
        {"grid": PEER_GRID, "peer": summary, "torch_threads": summary.get("torch_threads")},
    )

    slimlm_row, peer_row = bench.results[SLIMLM_LABEL], bench.results[PEER_LABEL]
    r = ratios(slimlm_row, peer_row)
    comparison = {
        "ratios": r,
        "ratio_definition": "slimlm / llmcompressor; perplexity on the evaluation windows, quantize seconds = "
        "slimlm's quantize stage vs llmcompressor's oneshot call (model already loaded)",
        "goal": {"perplexity": verdict(r["perplexity"]), "time": verdict(r["quantize_seconds"])},
        "grids": {SLIMLM_LABEL: SLIMLM_GRID, PEER_LABEL: PEER_GRID},
        "peer_versions": summary.get("versions"),
    }
    payload = json.loads(args.out.read_text())
    payload["comparison"] = comparison
    atomic_write(args.out, json.dumps(payload, indent=2, default=str).encode())
    print_table(bench.results, comparison, bench.description)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
