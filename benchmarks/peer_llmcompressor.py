"""slimlm's GPTQ side by side with its peers' (llm-compressor, GPTQModel), on the built-in SmolLM2-135M: same model,
same calibration windows, same evaluation; perplexity, quantize wall time and peak memory, and the ratios
slimlm / peer. Goal (issue 13): slimlm's time ≤ 0.5 × each peer's at equal or better perplexity, at the calibration
sizes 4 × 2048 and the papers' 128 × 2048 (or 32 × 2048 where 128 would take a peer more than an hour here).

All rows are 4-bit symmetric integer weights in groups of 64 input columns on every decoder Linear (embeddings, norms
and the tied LM head stay fp32), GPTQ with damping 0.01 and blocks of 128 (the libraries' defaults):

- slimlm: `quantize` stage, method gptq (common.StageBench, exactly as benchmarks/quantization.py's "gptq W4 g64").
  Grid: ggml Q4_0's rule, scale = (signed value of largest magnitude) / −8, codes −8..7, the extreme value exactly
  on −8; group scales set as GPTQ reaches each group (from the weights as updated so far); no act_order;
  true-sequential within each decoder layer; v_proj's Hessian weighted by the attention each token receives.
- llmcompressor (peer): `oneshot` with a GPTQModifier whose config_groups ask for int4, symmetric, strategy "group",
  group_size 64 (its W4A16 preset's group of 128 does not divide SmolLM2's hidden size 576), ignore lm_head,
  otherwise its defaults. Grid: compressed-tensors' symmetric int4, scale = max|w| / 7.5, codes round(w/scale)
  clamped to −8..7 (so +max|w| lands on 7, one half step short); group scales from the original weights before
  GPTQ (its static activation ordering, the default: columns visited by descending diag H); all Linears of a
  decoder layer calibrated in one pass.
- GPTQModel (peer): benchmarks/peer/gptqmodel_gptq.py, its settings in that script's docstring and the row's JSON.

Peak memory: "peak RSS" is the process's high-water mark (slimlm's benchmark process also holds the dense reference
model and its logits, so only the second column compares): "+ over model" is the peak above the RSS with the model
loaded (slimlm: during the stage; a peer: its whole process after loading the model).

llmcompressor pins an older transformers than slimlm, so it runs in a venv of its own, benchmarks/.peer-venv
(scripts/peer_venv.sh makes it when it is missing), through benchmarks/peer/llmcompressor_gptq.py in a subprocess
on CPU. That script receives the dense model as a plain HF folder (slimlm's save_model) and the calibration
windows as a safetensors file, and hands back the dequantized (fake-quantized) decoder Linear weights; they are
loaded into a copy of the dense model here and evaluated with the same StageBench.measure as slimlm's row
(WikiText-2 test @2048, KL and top-1 against the dense model).

Timings: "quantize s" (wall) and "CPU s" (process CPU time, all threads) are the quantization call alone on each
side (slimlm's stage; llmcompressor's `oneshot`, which includes building its dataloader and tracing the model;
GPTQModel's `quantize`); the peer's total, with its imports, data set and model load and quantization (not the
weight checks and file writing that follow), is reported beside it. Both sides run
with the same torch thread count. On a machine shared with other work the wall times measure that work too (the
"load" column is the 1-minute load average after the row): the CPU-time ratio, with one torch thread
(OMP_NUM_THREADS=1), is then the better comparison, and an idle machine gives the wall-time one.

    python benchmarks/peer_llmcompressor.py [--calib-samples 4] [--peers llmcompressor,gptqmodel] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from common import StageBench, add_common_arguments, fmt, mib
from slimlm.models import save_model
from slimlm.report import atomic_write

ROOT = Path(__file__).resolve().parent.parent
SLIMLM_LABEL = "slimlm gptq W4 g64"
SLIMLM_STAGES = [("quantize", {"method": "gptq", "bits": 4, "group_size": 64, "sym": True})]
SLIMLM_GRID = (
    "ggml Q4_0 rule: scale = signed max / -8 per group of 64, codes -8..7; group scales set as GPTQ "
    "reaches each group; no act_order; true-sequential within a layer"
)
TIME_GOAL = 0.5  # slimlm's quantize time at most this fraction of each peer's, at equal or better perplexity


@dataclass(frozen=True)
class Peer:
    """A GPTQ implementation run in a venv of its own through a script with llmcompressor_gptq.py's interface."""

    name: str
    label: str
    setup: Path  # idempotent script that makes the venv
    venv: Path
    script: Path
    grid: str

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


PEERS = {
    "llmcompressor": Peer(
        "llmcompressor",
        "llmcompressor gptq W4 g64",
        ROOT / "scripts" / "peer_venv.sh",
        ROOT / "benchmarks" / ".peer-venv",
        ROOT / "benchmarks" / "peer" / "llmcompressor_gptq.py",
        "compressed-tensors int4 symmetric: scale = max|w| / 7.5 per group of 64 from the original weights, "
        "codes round(w/scale) clamped to -8..7; static act order; one calibration pass per layer",
    ),
    "gptqmodel": Peer(
        "gptqmodel",
        "gptqmodel gptq W4 g64",
        ROOT / "scripts" / "peer_gptqmodel_venv.sh",
        ROOT / "benchmarks" / ".peer-gptqmodel-venv",
        ROOT / "benchmarks" / "peer" / "gptqmodel_gptq.py",
        "GPTQModel int4 symmetric: scale = max|w|/7.5 per group of 64, codes -8..7; group scales set as GPTQ "
        "reaches each group; natural order (desc_act/act_group_aware off); true-sequential",
    ),
}


def ensure_peer_venv(peer: Peer) -> str | None:
    """The peer's setup script is idempotent (a no-op once its venv is built); returns why it is unusable, if so."""
    result = subprocess.run(["bash", str(peer.setup)], capture_output=True, text=True)
    if result.returncode != 0 or not peer.python.exists():
        return f"{peer.setup.name} failed: {(result.stderr.strip().splitlines() or ['no output'])[-1]}"
    return None


def run_peer(peer: Peer, bench: StageBench, scratch: Path) -> tuple[dict, dict]:
    """The dense model as an HF folder and the windows as a file, the peer's GPTQ in its venv; returns its
    dequantized weights and its JSON summary."""
    folder = scratch / "dense"
    if not folder.exists():
        save_model(bench.dense, bench.tokenizer, folder)
    windows = scratch / "windows.safetensors"
    save_file({"input_ids": bench.windows.to(torch.int64).contiguous()}, str(windows))
    out = scratch / f"{peer.name}_weights.safetensors"
    summary_path = scratch / f"{peer.name}.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # nothing of slimlm's venv may leak into the peer's
    command = [str(peer.python), str(peer.script), str(folder), str(windows), str(out), "--json", str(summary_path)]
    command += ["--threads", str(torch.get_num_threads())]
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
        "quantize_cpu_seconds": ratio(slimlm.get("cpu_seconds"), peer.get("cpu_seconds")),
    }


def verdict(value: float | None, goal: float) -> str | None:
    return None if value is None else ("met" if value <= goal else "missed")


def extra_rss(row: dict) -> int | None:
    """Peak RSS above the loaded model: slimlm's stage in the benchmark process, the peer's whole process."""
    if row.get("peak_extra_rss_bytes") is not None:
        return row["peak_extra_rss_bytes"]
    peer = row.get("peer", {})
    if peer.get("peak_rss_bytes") is None or peer.get("rss_after_load_bytes") is None:
        return None
    return peer["peak_rss_bytes"] - peer["rss_after_load_bytes"]


def print_table(results: dict, comparison: dict, description: str) -> None:
    title = "GPTQ W4 g64 side by side — SmolLM2-135M, WikiText-2 test @2048"
    table = Table(title=title, caption=description)
    columns = (
        "row",
        "ppl",
        "KL",
        "top-1",
        "quantize s",
        "CPU s",
        "load",
        "peak RSS MiB",
        "+ over model MiB",
        "total s",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for label, row in results.items():
        table.add_row(
            label,
            fmt(row.get("perplexity"), ".3f"),
            fmt(row.get("kl_divergence"), ".4f"),
            fmt(row.get("top1_agreement"), ".3f"),
            fmt(row.get("seconds"), ".1f"),
            fmt(row.get("cpu_seconds"), ".1f"),
            fmt(row.get("load_average"), ".1f"),
            mib(row.get("peak_rss_bytes") or row.get("peer", {}).get("peak_rss_bytes")),
            mib(extra_rss(row)),
            fmt(row.get("peer", {}).get("total_seconds"), ".1f"),
        )
    for name, entry in comparison["peers"].items():
        r = entry["ratios"]
        table.add_row(
            f"slimlm / {name}",
            fmt(r["perplexity"], ".4f"),
            "",
            "",
            fmt(r["quantize_seconds"], ".3f"),
            fmt(r["quantize_cpu_seconds"], ".3f"),
        )
    Console(width=200).print(table)
    for name, entry in comparison["peers"].items():
        goal = entry["goal"]
        print(
            f"goal vs {name} (time ratio ≤ {TIME_GOAL} at ppl ratio ≤ 1): wall time {goal['time']}, "
            f"CPU time {goal['cpu_time']}, perplexity {goal['perplexity']}",
            file=sys.stderr,
        )


def _check_reused_row(args) -> dict:
    previous = json.loads(args.out.read_text()) if args.out.exists() else None
    if previous is None or SLIMLM_LABEL not in previous.get("rows", {}):
        sys.exit(f"--skip-slimlm: no '{SLIMLM_LABEL}' row in {args.out}")
    wanted = {
        "calibration": {"data": "c4", "samples": args.calib_samples, "seq_len": args.calib_seq_len, "seed": 0},
        "evaluation": {"data": "wikitext2 test", "seq_len": 2048, "windows": args.eval_windows},
    }
    for key, value in wanted.items():
        if previous.get(key) != value:
            sys.exit(f"--skip-slimlm: {args.out} was measured with {key} {previous.get(key)}, not {value}")
    return previous["rows"][SLIMLM_LABEL]


def _peer_row(peer: Peer, bench: StageBench, scratch: Path) -> None:
    problem = ensure_peer_venv(peer)
    if problem is not None:
        bench.results[peer.label] = {"unavailable": problem}
        bench.save()
        print(f"{peer.label}: unavailable ({problem})", file=sys.stderr)
        return
    weights, summary = run_peer(peer, bench, scratch)
    extra = {
        "grid": summary.get("grid", peer.grid),
        "peer": summary,
        "torch_threads": summary.get("torch_threads"),
        "cpu_seconds": summary.get("oneshot_cpu_seconds"),
    }
    bench.measure(peer.label, peer_model(bench, weights), summary["oneshot_seconds"], None, extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "peer_llmcompressor.json")
    parser.set_defaults(speed_runs=0)
    for action in parser._actions:  # all rows, always: --only and --resume mean nothing here (see --skip-slimlm)
        if action.dest in ("only", "resume"):
            action.help = argparse.SUPPRESS
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    parser.add_argument(
        "--skip-slimlm",
        action="store_true",
        help=f"reuse the '{SLIMLM_LABEL}' row of --out (same calibration and evaluation settings)",
    )
    args = parser.parse_args()
    args.only, args.resume = None, False
    peers = [PEERS[name] for name in args.peers.split(",") if name]
    reused = _check_reused_row(args) if args.skip_slimlm else None

    bench = StageBench(args)
    if reused is not None:
        bench.results[SLIMLM_LABEL] = reused
        print(f"reusing {SLIMLM_LABEL} from {args.out}", file=sys.stderr)
    else:  # each side alone: slimlm in this process first, then each peer in a process of its own
        bench.run_stages(SLIMLM_LABEL, SLIMLM_STAGES)
        bench.results[SLIMLM_LABEL].update(grid=SLIMLM_GRID, torch_threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="slimlm-peer-") as scratch:
        for peer in peers:
            _peer_row(peer, bench, Path(scratch))

    slimlm_row = bench.results[SLIMLM_LABEL]
    comparison = {"peers": {}, "time_goal": TIME_GOAL, "grids": {SLIMLM_LABEL: SLIMLM_GRID}}
    for peer in peers:
        row = bench.results[peer.label]
        if "unavailable" in row:
            continue
        r = ratios(slimlm_row, row)
        comparison["peers"][peer.name] = {
            "ratios": r,
            "goal": {
                "time": verdict(r["quantize_seconds"], TIME_GOAL),
                "cpu_time": verdict(r["quantize_cpu_seconds"], TIME_GOAL),
                "perplexity": verdict(r["perplexity"], 1.0),
            },
            "versions": row["peer"].get("versions"),
        }
        comparison["grids"][peer.label] = row.get("grid")
    comparison["ratio_definition"] = (
        "slimlm / peer; perplexity on the evaluation windows, quantize seconds = slimlm's quantize stage vs the "
        "peer's quantization call (model already loaded)"
    )
    payload = json.loads(args.out.read_text())
    payload["comparison"] = comparison
    payload["load_average"] = os.getloadavg()
    atomic_write(args.out, json.dumps(payload, indent=2, default=str).encode())
    print_table(bench.results, comparison, bench.description)
    print(f"wrote {args.out}; load average {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
