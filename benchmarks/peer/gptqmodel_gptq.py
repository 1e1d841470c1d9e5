"""GPTQModel's GPTQ (4-bit symmetric int, groups of 64) on an HF model folder, on given calibration windows.

Runs INSIDE its own peer venv (benchmarks/.peer-gptqmodel-venv, made by scripts/peer_gptqmodel_venv.sh), never in
slimlm's: it imports nothing from slimlm. Same command line and outputs as llmcompressor_gptq.py beside it:

    python gptqmodel_gptq.py MODEL_FOLDER WINDOWS.safetensors OUT.safetensors [--json OUT.json] [--threads N]

MODEL_FOLDER: a plain Hugging Face folder (config, safetensors, tokenizer), loaded in float32. WINDOWS: int64 token ids
[N, seq_len] under the key "input_ids". Every window is one calibration sample, used once, in full, batch size 1, in
the given order (calibration_sort=None, no concatenation).

Settings, chosen to sit as close to slimlm's GPTQ as GPTQModel allows: bits 4, group_size 64, sym, damp_percent 0.01,
desc_act False and act_group_aware False (natural column order, like slimlm; GPTQModel's own default for GPTQ is
act_group_aware=True, its "GAR" group-aware reordering), static_groups False (each group's scale is set when GPTQ
reaches the group, from the weights as updated so far, as in slimlm), true_sequential True (q/k/v, then o, then
gate/up, then down within each layer), block size 128, mse 0 (no scale search), lm_head False, offload_to_disk False
(its default True only spills finished modules to disk, to save host memory), device cpu.

Grid (GPTQModel's Quantizer, sym): scale = 2·max|w| / 15 = max|w| / 7.5 per group of 64, zero point 8, stored codes
clamp(round(w/scale) + 8, 0, 15), so the signed codes are −8..7 and +max|w| lands on 7 — the same rule as
compressed-tensors' symmetric int4.

Writes OUT: every decoder Linear's weight after GPTQ, read back from GPTQModel's packed module (qweight, qzeros,
scales, g_idx; its own v1→v2 zero-point conversion and reference dequantizer): the stored float16 group scale times
the stored integer code, multiplied in float32 — keyed by the Hugging Face parameter name
("model.layers.0.self_attn.q_proj.weight"), float32, [out, in]; and the JSON (default: OUT with .json): wall and CPU
times, the settings, the grid, the versions, and the checks on the weights (codes integers in −8..7 from GPTQModel's
own scales, each group of 64 at most 16 distinct values).
The JSON keeps llmcompressor_gptq.py's keys: "oneshot_seconds" is here the `model.quantize(...)` call.

CPU only: CUDA_VISIBLE_DEVICES is emptied before torch is imported.
"""

from __future__ import annotations

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import inspect
import json
import platform
import sys
import time
from pathlib import Path

import torch

# the sibling peer script: the same windows file format, the same notion of "decoder Linear", the same memory figures
from llmcompressor_gptq import decoder_linears, load_windows, memory_status

GROUP_SIZE = 64
BITS = 4
SETTINGS = {
    "bits": BITS,
    "group_size": GROUP_SIZE,
    "sym": True,
    "desc_act": False,
    "act_group_aware": False,
    "static_groups": False,
    "true_sequential": True,
    "damp_percent": 0.01,
    "mse": 0.0,
    "lm_head": False,
    "offload_to_disk": False,
    "device": "cpu",
}
GRID = (
    "GPTQModel int4 symmetric: scale = 2*max|w|/15 = max|w|/7.5 per group of 64, zero point 8, codes "
    "clamp(round(w/scale)+8, 0, 15), i.e. signed codes -8..7; group scales set as GPTQ reaches each group "
    "(static_groups False); natural column order (desc_act and act_group_aware False)"
)


def versions() -> dict:
    from importlib.metadata import version

    names = ("gptqmodel", "transformers", "torch", "accelerate", "datasets", "torchao", "numpy")
    return {name: version(name) for name in names} | {"python": platform.python_version()}


@torch.no_grad()
def library_dequantized(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [out, in], scale [out, in // 64]) of a packed GPTQModel Linear, from the packable base class's
    reference dequantizer (TorchQuantLinear's own override is wrapped in torch.compile, which this does not need).
    Right after quantize() the packed zero points are in GPTQ's v1 checkpoint layout (stored zero − 1: 7 for the
    symmetric grid's 8); the torch kernel converts them to v2 before computing, and so does this, with GPTQModel's
    own converter — dequantizing v1 as is would shift every code by one."""
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    if not isinstance(module, PackableQuantLinear):
        sys.exit(f"{type(module).__name__}: not a packed GPTQModel Linear, nothing to dequantize")
    if not torch.equal(module.g_idx.long().cpu(), torch.arange(module.in_features) // GROUP_SIZE):
        sys.exit("g_idx is not the natural order i // 64: a column reordering leaked into the packed module")
    if module.qzero_format() == 1:
        convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
    weight = PackableQuantLinear.dequantize_weight(module).float().t().contiguous()
    return weight, module.scales.float().t().contiguous()


@torch.no_grad()
def stored_weight(name: str, module) -> tuple[torch.Tensor, dict]:
    """The packed weight as float32 scale · code, and the checks that it is on GPTQModel's grid.

    GPTQModel stores each group's scale in float16 and its dequantizer multiplies in float16; the weight handed back
    is the same stored scale times the same integer code, multiplied in float32 (so no float16 rounding of the
    product: it differs from GPTQ's own float32 result only by the float16 rounding of the scale, ≤ 2^-11
    relative). Checks: codes = library weight / scale round to integers in −8..7 (the residual is float16 product
    rounding, far below 0.5), and every group of 64 holds at most 2^4 distinct values."""
    library, scale = library_dequantized(module)
    out_features, in_features = library.shape
    shape = (out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    codes = library.view(shape) / scale.unsqueeze(-1)
    rounded = codes.round()
    weight = (rounded * scale.unsqueeze(-1)).view(out_features, in_features)
    ordered = weight.view(-1, GROUP_SIZE).sort(dim=1).values
    distinct = int(((ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1).max())
    report = {
        "max_distinct_per_group": distinct,
        "max_code_residual": float((codes - rounded).abs().max()),
        "code_min": int(rounded.min()),
        "code_max": int(rounded.max()),
    }
    if distinct > 2**BITS or report["max_code_residual"] > 0.25 or rounded.min() < -8 or rounded.max() > 7:
        raise SystemExit(f"{name}: not on the 4-bit grid (codes -8..7, at most 16 values per group): {report}")
    return weight.contiguous(), report


def quantize_config():
    from gptqmodel import QuantizeConfig

    return QuantizeConfig(**SETTINGS)


def summarize(timings: dict, windows_shape, config, linears: dict, checks: dict, pack_extension: bool) -> dict:
    from gptqmodel.quantization.gptq import GPTQ

    samples, seq_len = windows_shape
    first = next(iter(linears.values()))
    return timings | {
        "oneshot_is": "GPTQModel's model.quantize(...) call (input capture, per-layer GPTQ, packing)",
        "total_includes": "interpreter already started: imports of gptqmodel/transformers, the calibration list, "
        "model and tokenizer load (GPTQModel.load), quantize",
        "calibration": {"samples": samples, "seq_len": seq_len, "sort": None, "concat": None, "batch_size": 1},
        "recipe": {
            "api": "GPTQModel.load(folder, QuantizeConfig(..., device='cpu'), dtype=float32).quantize(...)",
            "config_class": type(config).__name__,
            "settings": SETTINGS,
            "block_size": inspect.signature(GPTQ.quantize).parameters["blocksize"].default,
            "damp_auto_increment": config.damp_auto_increment,
            "fallback": str(config.fallback),
            "kernel": type(first).__name__,
            "pack": "pack_block_cpu C++ extension (JIT-built, cached; built before the timer)"
            if pack_extension
            else "Python pack_block (the C++ extension did not build)",
        },
        "grid": GRID,
        "linears": len(linears),
        "weight_checks": {
            "max_distinct_per_group": max(c["max_distinct_per_group"] for c in checks.values()),
            "max_code_residual": max(c["max_code_residual"] for c in checks.values()),
            "code_range": [min(c["code_min"] for c in checks.values()), max(c["code_max"] for c in checks.values())],
        },
        "torch_threads": torch.get_num_threads(),
        "gptqmodel_cpu_workers": int(os.environ["GPTQMODEL_CPU_WORKERS"]),
        "device": str(first.qweight.device),
        "versions": versions(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("windows", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--json", type=Path, help="default: OUT with the suffix .json")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # GPTQModel's device thread pool gives "cpu" (cores + 1) // 2 workers, but its model-loader sub-pool asks for 2:
    # on a machine of 2 or 3 cores it refuses to start ("requests 2 workers but parent 'cpu' only has 1"). 2 is the
    # fewest it accepts; its workers run modules side by side, so CPU use may exceed --threads (see *_cpu_seconds).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, args.threads or 0)))

    total_start = time.perf_counter()
    cpu_start = time.process_time()
    from gptqmodel import GPTQModel
    from gptqmodel import extension as gptqmodel_extension
    from safetensors.torch import save_file

    windows = load_windows(args.windows)
    calibration = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in windows]
    config = quantize_config()
    pack_extension = gptqmodel_extension.is_available("pack_block_cpu")  # JIT-built (cached) outside the timer
    model = GPTQModel.load(str(args.model), config, dtype=torch.float32)  # device: config.device
    load_seconds = time.perf_counter() - total_start
    rss_after_load = memory_status("VmRSS")

    start, cpu_quantize_start = time.perf_counter(), time.process_time()
    model.quantize(calibration, batch_size=1, calibration_sort=None)
    oneshot_seconds = time.perf_counter() - start
    oneshot_cpu_seconds = time.process_time() - cpu_quantize_start
    total_seconds = time.perf_counter() - total_start  # imports, calibration list, model load and quantize
    total_cpu_seconds = time.process_time() - cpu_start
    peak_rss = memory_status("VmHWM")  # before the checks and the file writing below

    linears = decoder_linears(model.model)
    if not linears:
        sys.exit("no decoder Linear found in the model")
    tensors, checks = {}, {}
    for name, module in linears.items():
        tensors[f"{name}.weight"], checks[name] = stored_weight(name, module)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out))

    timings = {
        "oneshot_seconds": oneshot_seconds,
        "oneshot_cpu_seconds": oneshot_cpu_seconds,
        "load_seconds": load_seconds,
        "total_seconds": total_seconds,
        "total_cpu_seconds": total_cpu_seconds,
        "peak_rss_bytes": peak_rss,
        "rss_after_load_bytes": rss_after_load,
    }
    summary = summarize(timings, windows.shape, config, linears, checks, pack_extension)
    json_path = args.json or args.out.with_suffix(".json")
    json_path.write_text(json.dumps(summary, indent=2, default=str))
    print(
        f"gptqmodel gptq: quantize {oneshot_seconds:.1f} s, total {total_seconds:.1f} s, "
        f"{len(linears)} Linears, at most {summary['weight_checks']['max_distinct_per_group']} values per group; "
        f"wrote {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
