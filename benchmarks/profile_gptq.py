"""Where GPTQ's time goes: the `quantize` stage (method gptq) under cProfile on the built-in SmolLM2-135M.

Runs the stage on the first `--layers` decoder layers (the model cut after them: every layer costs the same, so a
few show the split) with `--calib-samples` C4 windows of `--calib-seq-len` tokens, and prints the time per layer
and the top entries by own time (tottime) and by cumulative time. The profile counts CPU time (time.process_time),
not wall time: on a shared 2-core machine wall time mostly measures the other processes, while CPU time stays close
to what a quiet machine shows; both totals are reported, with the load average. One torch thread by default
(--threads), so CPU time is not inflated by threads spinning for each other. Writes
benchmarks/results/profile_gptq.json.

    python benchmarks/profile_gptq.py [--layers 4] [--calib-samples 4] [--calib-seq-len 2048] [--group-size 64]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS
from slimlm.calibration import Calibration
from slimlm.data import calibration_windows, load_text
from slimlm.models import load_model
from slimlm.modules import decoder_layers
from slimlm.registry import StageContext, get_stage
from slimlm.report import atomic_write


def _top(profile: cProfile.Profile, key: str, count: int) -> list[dict]:
    stats = pstats.Stats(profile, stream=io.StringIO())
    stats.sort_stats(key)
    rows = []
    for func in stats.fcn_list[:count]:
        calls, _, own, cumulative, _ = stats.stats[func]
        file, line, name = func
        rows.append(
            {"function": f"{Path(file).name}:{line}({name})", "calls": calls, "tottime": own, "cumtime": cumulative}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="current", help="key of this run in the JSON (e.g. before / after)")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile_gptq.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    layers = decoder_layers(model)
    del layers[args.layers :]
    model.config.num_hidden_layers = args.layers
    windows = calibration_windows(tokenizer, load_text("c4"), args.calib_samples, args.calib_seq_len, 0)
    spec = get_stage("quantize")
    options = spec.options_model({"method": "gptq"}).model_validate(
        {"method": "gptq", "bits": 4, "group_size": args.group_size}
    )
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        context = StageContext(tokenizer, Calibration(None, tokenizer, windows=windows), Path(scratch))
        profile = cProfile.Profile(time.process_time)
        start, cpu_start = time.perf_counter(), time.process_time()
        profile.enable()
        spec.apply(model, options, context)
        profile.disable()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "layers": args.layers,
        "calibration": f"{args.calib_samples} × {args.calib_seq_len} tokens of c4",
        "group_size": args.group_size,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "seconds_per_layer": seconds / args.layers,
        "cpu_seconds": cpu_seconds,
        "cpu_seconds_per_layer": cpu_seconds / args.layers,
        "load_average_before": load,
        "load_average_after": os.getloadavg()[0],
        "by_tottime": _top(profile, "tottime", args.top),
        "by_cumtime": _top(profile, "cumulative", args.top),
    }
    print(
        f"gptq W4 g{args.group_size}, {args.layers} layers, {result['calibration']}, {args.threads} thread(s): "
        f"wall {seconds:.1f} s, CPU {cpu_seconds:.1f} s ({result['cpu_seconds_per_layer']:.2f} CPU s/layer), "
        f"load {load:.2f} → {result['load_average_after']:.2f}",
        file=sys.stderr,
    )
    for row in result["by_tottime"]:
        print(f"{row['tottime']:8.2f} {row['cumtime']:8.2f} {row['calls']:8d}  {row['function']}")
    payload = json.loads(args.out.read_text()) if args.out.exists() else {}
    payload[args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(payload, indent=2).encode())


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
