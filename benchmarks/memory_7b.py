"""Memory at scale: Wanda, GPTQ and AWQ on a model with LLaMA-2-7B's shapes in bfloat16, streamed layer by layer.

1. Writes a randomly initialised checkpoint with LLaMA-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000,
   untied head; 32 layers, about 13.5 GB of bf16, or `--layers N` of them) as a sharded safetensors folder, one layer
   at a time (the writer never holds more than one layer). Random weights: no real 7B model is needed to measure
   memory and time, and the quality of the result means nothing. Peak memory is per layer, so 2-4 layers show it.
2. For each row, in a fresh process: `slimlm.streaming.load_streamed` (embeddings, norm and head read; decoder layers
   left on the meta device), then the ordinary stage on seeded random token windows: `prune` (Wanda 50 %),
   `quantize` GPTQ (W4 g128 symmetric; v_proj with the plain Hessian, or attention-weighted: `gptq_weighted_v`) or
   AWQ (W4 g128 asymmetric); the calibration walk
   reads each layer from the memory-mapped safetensors, compresses, packs and writes it.
3. Reports that process's peak RSS over its whole life (VmHWM, imports included), the wall time of each layer (load to
   written) and checks the written checkpoint: Wanda's Linears at 50 % zeros; the quantized folder reloads with
   slimlm's loader (finite logits) and one layer's stored codes and scales decode onto the 4-bit grid.
4. Extrapolates the time per layer to LLaMA-2-70B's shapes (80 layers, hidden 8192, MLP 28672, 8 KV heads) by the ratio
   of a per-layer cost model (`layer_flops`: the calibration forwards, Hessians and GPTQ solves, or AWQ's grid
   search), and times one layer's forward in bfloat16 and float32 (is upcasting the streamed layer worth it here?).

    python benchmarks/memory_7b.py [--layers 2] [--methods gptq,awq] [--samples 4] [--seq-len 512] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama2_shapes import LLAMA2_7B, LLAMA2_70B, extrapolate_70b, layer_forward_by_dtype, write_random_checkpoint

ROWS = {  # row -> (stage, options)
    "wanda": ("prune", {"method": "wanda", "sparsity": 0.5}),
    # v_proj's plain Hessian: the attention-weighted one holds kv_heads x hidden² float32 Hessians (2 GiB at 7B's
    # 32 KV heads) and as much again for their inverse factors; with the copies gptq.py/value_hessian.py made before
    # they were removed it reached 10.6 GiB RSS (OOM-killed here); not rerun since
    "gptq": ("quantize", {"method": "gptq", "bits": 4, "group_size": 128, "sym": True, "attention_weighted_v": False}),
    "gptq_weighted_v": ("quantize", {"method": "gptq", "bits": 4, "group_size": 128, "sym": True}),
    "awq": ("quantize", {"method": "awq", "bits": 4, "group_size": 128, "sym": False}),
}
GIB = 2**30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def streamed_row(row: str, dense: Path, out: Path, samples: int, seq_len: int) -> dict:
    """Runs in its own process: one row's stage on a layer-streamed model; peak RSS and per-layer time."""
    import tempfile

    from slimlm.calibration import Calibration
    from slimlm.registry import StageContext, get_stage
    from slimlm.streaming import load_streamed

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    model = load_streamed(dense, out, dtype=torch.bfloat16)
    loaded_rss = _status_kib("VmRSS") * 1024
    _report_layers(model.slimlm_layer_stream, row)
    windows = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    name, options = ROWS[row]
    spec = get_stage(name)
    with tempfile.TemporaryDirectory() as scratch:
        context = StageContext(None, Calibration(None, windows=windows), Path(scratch))
        spec.apply(model, spec.options_model(options).model_validate(options), context)
    stream = model.slimlm_layer_stream
    stream.finish()
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": _status_kib("VmHWM") * 1024,
        "rss_after_load_bytes": loaded_rss,
        "largest_layer_bytes": stream.peak_layer_bytes,
        "layer_seconds": [stream.layer_seconds[i] for i in sorted(stream.layer_seconds)],
        "threads": torch.get_num_threads(),
        "notes": context.notes,
    }


def _report_layers(stream, row: str) -> None:
    """Print each layer's time and the RSS so far as it is written (a long run shows where it is)."""
    release = stream.release

    def release_and_report(index: int) -> None:
        release(index)
        peak = _status_kib("VmHWM") / 2**20
        print(f"{row} layer {index}: {stream.layer_seconds[index]:.1f} s, peak RSS {peak:.2f} GiB", file=sys.stderr)

    stream.release = release_and_report


def _weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def _read(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    shards = _weight_map(folder)
    tensors = {}
    for name in names:
        with safe_open(folder / shards[name], framework="pt") as handle:
            tensors[name] = handle.get_tensor(name)
    return tensors


def check_pruned(dense: Path, out: Path) -> dict:
    """Every decoder Linear of the output at 50 % zeros; embeddings, norms and head as written."""
    names = list(_weight_map(out))
    written, original = _read(out, names), _read(dense, names)
    sparsities = [float((t == 0).float().mean()) for n, t in written.items() if n.endswith("proj.weight")]
    unchanged = all(torch.equal(original[n], t) for n, t in written.items() if not n.endswith("proj.weight"))
    return {
        "linears": len(sparsities),
        "min_sparsity": min(sparsities),
        "max_sparsity": max(sparsities),
        "other_tensors_unchanged": unchanged,
    }


@torch.no_grad()
def check_quantized(out: Path, layers: int) -> dict:
    """The folder reloads with slimlm's loader (load_stored_model, as models.load_model; finite logits); every
    decoder Linear is a packed 4-bit g128 module in config.json; the last layer's codes and scales decode onto the
    grid."""
    from slimlm.quantize.grid import QuantGrid
    from slimlm.quantize.packed import unpack_codes
    from slimlm.storage import kernel_summary, load_stored_model, read_config

    section = json.loads((out / "config.json").read_text())["slimlm_storage"]
    packed = [m for m in section["modules"] if m["kind"] == "packed" and m["bits"] == 4 and m["group_size"] == 128]
    prefix = f"model.layers.{layers - 1}."
    names = [n for n in _weight_map(out) if n.startswith(prefix) and "proj." in n]
    layer = _read(out, names)
    on_grid = True
    for name in [n for n in names if n.endswith(".qweight")]:
        module = name.removesuffix(".qweight")
        entry = next(m for m in section["modules"] if m["name"] == module)
        grid = QuantGrid(4, entry["sym"], 128)
        codes = unpack_codes(layer[name], 4, entry["in_features"])
        scales = layer[module + ".scales"].float()
        zeros = layer.get(module + ".zeros")
        # nonzero, not positive: the symmetric grid keeps the sign of each group's extreme in its scale (ggml Q4_0)
        on_grid &= bool(codes.max() <= grid.max_code) and bool((scales != 0).all() and torch.isfinite(scales).all())
        on_grid &= scales.shape[1] * 128 == entry["in_features"] and (zeros is None) == entry["sym"]
    model = load_stored_model(out, *read_config(out), torch.bfloat16)  # load_model's path, without a tokenizer
    logits = model(torch.arange(1, 17).unsqueeze(0)).logits
    return {
        "packed_linears": len(packed),
        "expected_linears": 7 * layers,
        "checked_layer": layers - 1,
        "codes_and_scales_on_grid": on_grid,
        "reloaded_with_load_stored_model": True,
        "reloaded_logits_finite": bool(torch.isfinite(logits).all()),
        "reloaded_kernels": kernel_summary(model),
    }


def _previous_rows(old: dict) -> dict:
    """Rows of an earlier run (the 32-layer Wanda row of the first version had its own layout)."""
    if not old or "rows" in old:
        return old.get("rows", {})
    row = {**old["streamed_wanda"], "check": old["check"], "layers": 32, "calibration": old["calibration"]}
    return {"streamed_wanda": row}


def _calibration(args) -> str:
    return f"{args.samples} windows x {args.seq_len} random token ids (seed 0)"


def run_row(row: str, args, dense: Path, checkpoint: dict) -> dict:
    output = args.workdir / row
    command = [
        sys.executable,
        __file__,
        "--child",
        row,
        "--workdir",
        str(args.workdir),
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
    ]
    load_before = _loadavg()
    environment = {**os.environ, "SLIMLM_NO_PROGRESS": "1"}
    # its stderr (a line per layer) goes through to ours
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment)
    if child.returncode:
        sys.exit(f"streamed {row} failed (exit {child.returncode}); its stderr is above")
    run = json.loads(child.stdout.strip().splitlines()[-1])
    per_layer = statistics.median(run["layer_seconds"])
    check = check_pruned(dense, output) if row == "wanda" else check_quantized(output, args.layers)
    return {
        "stage": ROWS[row][0],
        "options": ROWS[row][1],
        "layers": args.layers,
        "calibration": _calibration(args),
        "checkpoint_bytes": checkpoint["bytes"],
        **run,
        "median_layer_seconds": per_layer,
        "extrapolated_70b": extrapolate_70b(row, per_layer, args.samples * args.seq_len),
        "check": check,
        "loadavg_before_after": [load_before, _loadavg()],
    }


def _failures(check: dict) -> list[str]:
    """The names of the failed checks of a row."""
    failed = [name for name, value in check.items() if value is False]
    if "max_sparsity" in check and not check["min_sparsity"] == check["max_sparsity"] == 0.5:
        failed.append("sparsity")
    if check.get("packed_linears", 0) != check.get("expected_linears", 0):
        failed.append("packed_linears")
    return failed


def print_table(rows: dict, memory: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Streamed compression, LLaMA-2-7B shapes in bf16 (machine {memory / GIB:.1f} GiB)")
    columns = "row|layers|peak RSS|after load|largest layer|s/layer (median)|total|70B est.|check"
    for column in columns.split("|"):
        table.add_column(column, justify="left" if column in ("row", "check") else "right")
    for name, row in rows.items():
        per_layer = row.get("median_layer_seconds", row["seconds"] / row["layers"])
        estimate = row.get("extrapolated_70b", {}).get("seconds")
        failed = _failures(row["check"])
        table.add_row(
            name,
            str(row["layers"]),
            f"{row['peak_rss_bytes'] / GIB:.2f} GiB",
            f"{row['rss_after_load_bytes'] / GIB:.2f} GiB",
            f"{row['largest_layer_bytes'] / GIB:.2f} GiB",
            f"{per_layer:.1f} s",
            f"{row['seconds'] / 60:.1f} min",
            "-" if estimate is None else f"{estimate / 3600:.1f} h",
            "ok" if not failed else "FAILED: " + ", ".join(failed),
        )
    Console(width=150).print(table)


def _machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def write_results(path: Path, rows: dict, dtype_check: dict) -> None:
    from slimlm.evaluate.machine import machine_info
    from slimlm.report import atomic_write

    result = {
        "shapes": "LLaMA-2-7B (random weights, bf16)",
        "config": LLAMA2_7B,
        "extrapolated_to": LLAMA2_70B,
        "layer_forward_by_dtype": dtype_check,
        "rows": rows,
        "machine": machine_info(),
        "machine_memory_bytes": _machine_memory(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(result, indent=2, default=str).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slimlm-7b"))
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shaped checkpoint")
    parser.add_argument("--methods", default="wanda,gptq,awq", help=f"rows to run, of {', '.join(ROWS)}")
    parser.add_argument("--samples", type=int, default=4, help="calibration windows (random token ids)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_7b.json")
    parser.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dense = args.workdir / "dense"
    if args.child:
        print(json.dumps(streamed_row(args.child, dense, args.workdir / args.child, args.samples, args.seq_len)))
        return
    methods = [method for method in args.methods.split(",") if method]  # none: refresh the derived figures only
    if unknown := set(methods) - set(ROWS):
        sys.exit(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    dtype_check = previous.get("layer_forward_by_dtype")
    if methods:
        config = dense / "config.json"
        reuse = config.exists() and json.loads(config.read_text())["num_hidden_layers"] == args.layers
        checkpoint = {"reused": str(dense)} if reuse else write_random_checkpoint(dense, args.layers)
        checkpoint["bytes"] = sum(f.stat().st_size for f in dense.glob("*.safetensors"))
        print(f"checkpoint: {json.dumps(checkpoint)}", file=sys.stderr, flush=True)
        dtype_check = layer_forward_by_dtype(args.seq_len)  # the walk runs one window at a time
        print(f"one layer's forward: {json.dumps(dtype_check)}", file=sys.stderr, flush=True)
    rows = _previous_rows(previous)
    tokens = args.samples * args.seq_len
    for name, row in rows.items():  # a derived figure: earlier rows get the current cost model too
        if "median_layer_seconds" in row and row["calibration"] == _calibration(args):
            row["extrapolated_70b"] = extrapolate_70b(
                name.removeprefix("streamed_"), row["median_layer_seconds"], tokens
            )
    for row in methods:
        rows[f"streamed_{row}"] = run_row(row, args, dense, checkpoint)
        write_results(args.out, rows, dtype_check)  # after every row: a stopped run keeps the rows it finished
    write_results(args.out, rows, dtype_check)
    print_table(rows, _machine_memory())
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
