"""Memory at scale: Wanda on a model with LLaMA-2-7B's shapes in bfloat16, streamed layer by layer.

1. Writes a randomly initialised checkpoint with LLaMA-2-7B's shapes (32 layers, hidden 4096, MLP 11008, 32 heads,
   vocab 32000, untied head; about 13.5 GB of bf16) as a sharded safetensors folder, one layer at a time (the
   writer never holds more than one layer). Random weights: no real 7B model is needed to measure memory, and the
   perplexity of the result means nothing.
2. In a fresh process, loads it with `slimlm.streaming.load_streamed` (embeddings, norm and head read; decoder layers
   left on the meta device) and runs the ordinary `prune` stage (Wanda, 50 %) on seeded random token windows; the
   calibration walk reads each layer from the memory-mapped safetensors, prunes it and writes it out.
3. Reports that process's peak RSS over its whole life (VmHWM, imports included) next to the checkpoint size, and
   checks the written checkpoint: every Linear at 50 % sparsity, nothing else changed.

    python benchmarks/memory_7b.py [--workdir /tmp/slimlm-7b] [--samples 4] [--seq-len 512] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    architectures=["LlamaForCausalLM"],
)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def write_random_checkpoint(folder: Path) -> dict:
    """LLaMA-2-7B-shaped bf16 weights, one shard per decoder layer; returns timing and size."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    config = LlamaConfig(**LLAMA2_7B)
    with init_empty_weights():
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(f"model-{layer}.safetensors", {})[name] = shape
    weight_map = {}
    for shard, members in shards.items():
        tensors = {
            name: (
                torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * 0.02
            ).to(torch.bfloat16)
            for name, shape in members.items()
        }
        save_file(tensors, staging / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        del tensors
    total = sum(f.stat().st_size for f in staging.glob("*.safetensors"))
    (staging / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return {
        "seconds": time.perf_counter() - start,
        "bytes": total,
        "params": sum(torch.Size(s).numel() for s in shapes.values()),
    }


WANDA = {"method": "wanda", "sparsity": 0.5}


def streamed_wanda(dense: Path, out: Path, samples: int, seq_len: int) -> dict:
    """Runs in its own process: the `prune` stage (Wanda 50 %) on a layer-streamed model; peak RSS of this process."""
    import tempfile

    from slimlm.calibration import Calibration
    from slimlm.registry import StageContext, get_stage
    from slimlm.streaming import load_streamed

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    model = load_streamed(dense, out, dtype=torch.bfloat16)
    loaded_rss = _status_kib("VmRSS") * 1024
    windows = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    spec = get_stage("prune")
    with tempfile.TemporaryDirectory() as scratch:
        context = StageContext(None, Calibration(None, windows=windows), Path(scratch))
        spec.apply(model, spec.options_model(WANDA).model_validate(WANDA), context)
    stream = model.slimlm_layer_stream
    stream.finish()
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": _status_kib("VmHWM") * 1024,
        "rss_after_load_bytes": loaded_rss,
        "largest_layer_bytes": stream.peak_layer_bytes,
        "threads": torch.get_num_threads(),
        "notes": context.notes,
    }


def check_pruned(dense: Path, out: Path) -> dict:
    """Every decoder Linear of the output at 50 % zeros; embeddings, norms and head as written."""
    from safetensors import safe_open

    def weight_map(folder: Path) -> dict[str, str]:
        return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]

    def read(folder: Path, shard: str, name: str) -> torch.Tensor:
        with safe_open(folder / shard, framework="pt") as handle:
            return handle.get_tensor(name)

    dense_map = weight_map(dense)
    sparsities, unchanged = [], True
    for name, shard in weight_map(out).items():
        tensor = read(out, shard, name)
        if name.endswith("proj.weight"):
            sparsities.append(float((tensor == 0).float().mean()))
        else:
            unchanged &= torch.equal(read(dense, dense_map[name], name), tensor)
    return {
        "linears": len(sparsities),
        "min_sparsity": min(sparsities),
        "max_sparsity": max(sparsities),
        "other_tensors_unchanged": unchanged,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slimlm-7b"))
    parser.add_argument("--samples", type=int, default=4, help="calibration windows (random token ids)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (27 GB) afterwards")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_7b.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dense, pruned = args.workdir / "dense", args.workdir / "pruned"
    if args.child:
        print(json.dumps(streamed_wanda(dense, pruned, args.samples, args.seq_len)))
        return

    from slimlm.evaluate.machine import machine_info
    from slimlm.report import atomic_write

    write = write_random_checkpoint(dense) if not (dense / "config.json").exists() else {"reused": str(dense)}
    print(f"checkpoint: {json.dumps(write)}", file=sys.stderr, flush=True)
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "--workdir",
            str(args.workdir),
            "--samples",
            str(args.samples),
            "--seq-len",
            str(args.seq_len),
        ],
        capture_output=True,
        text=True,
    )
    if child.returncode:
        sys.exit(f"streamed Wanda failed:\n{child.stderr[-4000:]}")
    run = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "shapes": "LLaMA-2-7B (random weights, bf16)",
        "config": LLAMA2_7B,
        "checkpoint": write,
        "checkpoint_bytes": sum(f.stat().st_size for f in dense.glob("*.safetensors")),
        "calibration": f"{args.samples} windows x {args.seq_len} random token ids (seed 0)",
        "streamed_wanda": run,
        "check": check_pruned(dense, pruned),
        "machine": machine_info(),
        "machine_memory_bytes": _status_kib_meminfo(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2, default=str).encode())
    gib = 2**30
    print(
        f"checkpoint {result['checkpoint_bytes'] / gib:.2f} GiB; streamed Wanda 50 %: peak RSS "
        f"{run['peak_rss_bytes'] / gib:.2f} GiB (after loading the non-layer tensors "
        f"{run['rss_after_load_bytes'] / gib:.2f}"
        f" GiB; largest layer {run['largest_layer_bytes'] / gib:.2f} GiB) of {result['machine_memory_bytes'] / gib:.1f}"
        f" GiB; {run['seconds'] / 60:.1f} min; check {result['check']}"
    )
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


def _status_kib_meminfo() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
