"""llmcompressor's GPTQ (4-bit symmetric int, groups of 64) on an HF model folder, on given calibration windows.

Runs INSIDE the peer venv (benchmarks/.peer-venv, made by scripts/peer_venv.sh), never in slimlm's: it imports
nothing from slimlm. benchmarks/peer_llmcompressor.py calls it as a subprocess.

    python llmcompressor_gptq.py MODEL_FOLDER WINDOWS.safetensors OUT.safetensors [--json OUT.json]

MODEL_FOLDER: a plain Hugging Face folder (config, safetensors, tokenizer). WINDOWS: int64 token ids [N, seq_len]
under the key "input_ids" (a .safetensors file, or a .pt holding that tensor or a dict with that key). Every window
is used exactly once, in full: num_calibration_samples = N, max_seq_length = seq_len, no shuffling, batch size 1.

Writes OUT: every decoder Linear's weight after GPTQ, dequantized (fake-quantized: the values the quantized model
computes with), keyed by its Hugging Face parameter name ("model.layers.0.self_attn.q_proj.weight"), float32; and
the JSON (default: OUT with .json): wall times (the oneshot call alone, and the total with model load), the recipe,
the grid, the versions, and the checks on the weights (each group of 64 holds at most 16 distinct values, and the
weights are exactly scale · code with integer codes in −8..7 from llmcompressor's own weight_scale).

CPU only: CUDA_VISIBLE_DEVICES is emptied before torch is imported.
"""

from __future__ import annotations

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

GROUP_SIZE = 64
BITS = 4
SCHEME = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": BITS, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP_SIZE},
    }
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_windows(path: Path) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        windows = load_file(str(path))["input_ids"]
    else:
        loaded = torch.load(path, weights_only=True)
        windows = loaded["input_ids"] if isinstance(loaded, dict) else loaded
    if windows.dtype != torch.int64 or windows.dim() != 2:
        sys.exit(f"{path}: expected int64 token ids [N, seq_len], got {windows.dtype} {tuple(windows.shape)}")
    return windows


def memory_status(field: str) -> int | None:
    """A field of /proc/self/status in bytes (VmRSS: now; VmHWM: the peak so far); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def versions() -> dict:
    from importlib.metadata import version

    names = ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate", "datasets")
    return {name: version(name) for name in names} | {"python": platform.python_version()}


def decoder_linears(model) -> dict[str, torch.nn.Module]:
    """HF parameter prefix -> module for every decoder projection (lm_head and embeddings excluded)."""
    return {
        name: module
        for name, module in model.named_modules()
        if ".layers." in name and name.rsplit(".", 1)[-1] in PROJECTIONS
    }


@torch.no_grad()
def check_grid(name: str, module) -> dict:
    """The weight is on llmcompressor's grid: codes = weight / weight_scale are integers in −8..7 (zero point 0),
    and every group of 64 holds at most 2^4 distinct values."""
    weight = module.weight.detach().float()
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    ordered = groups.reshape(-1, GROUP_SIZE).sort(dim=1).values
    distinct = int(((ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1).max())
    report = {"max_distinct_per_group": distinct}
    scale = getattr(module, "weight_scale", None)
    if scale is not None:
        scale = scale.detach().float().reshape(out_features, in_features // GROUP_SIZE, 1)
        codes = groups / scale
        rounded = codes.round()
        report.update(
            max_code_residual=float((codes - rounded).abs().max()),
            code_min=int(rounded.min()),
            code_max=int(rounded.max()),
            max_reconstruction_error=float((rounded * scale - groups).abs().max()),
        )
        zero_point = getattr(module, "weight_zero_point", None)
        if zero_point is not None:
            report["zero_point_all_zero"] = bool((zero_point == 0).all())
    if distinct > 2**BITS:
        raise SystemExit(
            f"{name}: a group of {GROUP_SIZE} holds {distinct} distinct values, more than {2**BITS}: "
            "the weight is not the fake-quantized one"
        )
    return report


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

    total_start = time.perf_counter()
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = load_windows(args.windows)
    samples, seq_len = windows.shape
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_seconds = time.perf_counter() - total_start
    rss_after_load = memory_status("VmRSS")

    recipe = GPTQModifier(config_groups=SCHEME, ignore=["lm_head"])
    start, cpu_start = time.perf_counter(), time.process_time()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=samples,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    oneshot_seconds, oneshot_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    total_seconds = time.perf_counter() - total_start  # imports, data set, model load and oneshot
    peak_rss = memory_status("VmHWM")  # before the checks and the file writing below

    linears = decoder_linears(model)
    if not linears:
        sys.exit("no decoder Linear found in the model")
    checks = {name: check_grid(name, module) for name, module in linears.items()}
    tensors = {f"{name}.weight": module.weight.detach().float().contiguous() for name, module in linears.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out))

    first = next(iter(linears.values()))
    scheme = getattr(first, "quantization_scheme", None)
    summary = {
        "oneshot_seconds": oneshot_seconds,
        "oneshot_cpu_seconds": oneshot_cpu_seconds,
        "load_seconds": load_seconds,
        "total_seconds": total_seconds,
        "total_includes": "interpreter already started: imports of datasets/llmcompressor/transformers, the "
        "calibration data set, model and tokenizer load, oneshot",
        "calibration": {"samples": samples, "seq_len": seq_len, "shuffle": False, "batch_size": 1},
        "recipe": {
            "modifier": "GPTQModifier",
            "config_groups": SCHEME,
            "ignore": ["lm_head"],
            "block_size": recipe.block_size,
            "dampening_frac": recipe.dampening_frac,
            "actorder": None if scheme is None else getattr(scheme.weights.actorder, "value", scheme.weights.actorder),
            "observer": None if scheme is None else scheme.weights.observer,
            "pipeline": "default (independent: sequential per decoder layer for GPTQ)",
        },
        "grid": "compressed-tensors int4 symmetric: scale = max|w| / 7.5 per group of 64 (from the original weights, "
        "before GPTQ), zero point 0, codes round(w/scale) clamped to -8..7",
        "linears": len(linears),
        "weight_checks": {
            "max_distinct_per_group": max(c["max_distinct_per_group"] for c in checks.values()),
            "max_code_residual": max(c.get("max_code_residual", 0.0) for c in checks.values()),
            "code_range": [
                min(c.get("code_min", 0) for c in checks.values()),
                max(c.get("code_max", 0) for c in checks.values()),
            ],
            "zero_point_all_zero": all(c.get("zero_point_all_zero", True) for c in checks.values()),
        },
        "torch_threads": torch.get_num_threads(),
        "peak_rss_bytes": peak_rss,
        "rss_after_load_bytes": rss_after_load,
        "device": str(first.weight.device),
        "versions": versions(),
    }
    json_path = args.json or args.out.with_suffix(".json")
    json_path.write_text(json.dumps(summary, indent=2, default=str))
    print(
        f"llmcompressor gptq: oneshot {oneshot_seconds:.1f} s, total {total_seconds:.1f} s, "
        f"{len(linears)} Linears, at most {summary['weight_checks']['max_distinct_per_group']} values per group; "
        f"wrote {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
