"""LLaMA-2-7B and -70B shapes for the memory benchmark (memory_7b.py): a random bf16 checkpoint with 7B's shapes,
written layer by layer, a per-layer cost model to extrapolate the time per layer to 70B, and one layer's forward
timed in bfloat16 and float32."""

from __future__ import annotations

import json
import shutil
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
LLAMA2_70B = {
    **LLAMA2_7B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
AWQ_GRID_POINTS = 20  # AWQOptions' default
GPTQ_SETS = [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]  # one Hessian and one solve each


def write_random_checkpoint(folder: Path, layers: int) -> dict:
    """LLaMA-2-7B-shaped bf16 weights with `layers` decoder layers, one shard per layer; returns timing and size."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers})
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


def _linears(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder Linear for these shapes."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    return {
        "q": (hidden, hidden),
        "k": (kv, hidden),
        "v": (kv, hidden),
        "o": (hidden, hidden),
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }


def layer_flops(config: dict, row: str, tokens: int) -> float:
    """Multiply-adds x2 of one layer's visit, the terms that grow with the shapes (attention scores, elementwise work,
    I/O and the Python column loop's fixed cost per column are left out). Every method runs the layer over the
    calibration tokens: Wanda twice, AWQ twice, GPTQ about twice (calibrate.true_sequential: one observation pass and
    the attention once). GPTQ adds, per set of Linears reading one input (q/k/v, o, gate/up, down), XᵀX (tokens·in²)
    and one stacked solve (2·Σrows·in² for the OBS updates + in³ for the inverse Hessian); with the attention-weighted
    v_proj also a Hessian and an inverse per KV head. AWQ adds its grid search, 20 x the group's outputs
    (tokens·in·Σout), v->o only without grouped-query attention."""
    linears = _linears(config)
    forward = 2 * tokens * sum(out * inp for out, inp in linears.values())
    if row == "wanda":
        return 2 * forward
    if row.startswith("gptq"):
        hessians = sum(2 * tokens * linears[s[0]][1] ** 2 for s in GPTQ_SETS)
        solves = sum(
            2 * sum(linears[n][0] for n in s) * linears[s[0]][1] ** 2 + linears[s[0]][1] ** 3 for s in GPTQ_SETS
        )
        per_head = config["num_key_value_heads"] * (2 * tokens + config["hidden_size"]) * config["hidden_size"] ** 2
        return 2 * forward + hessians + solves + (per_head if row == "gptq_weighted_v" else 0)
    groups = [("q", "k", "v"), ("gate", "up"), ("down",)]
    if linears["v"][0] == linears["o"][1]:
        groups.append(("o",))
    search = sum(2 * tokens * linears[g[0]][1] * sum(linears[n][0] for n in g) for g in groups)
    return 2 * forward + AWQ_GRID_POINTS * search


def extrapolate_70b(row: str, per_layer_seconds: float, tokens: int) -> dict:
    """70B time if the layer's time scales with its FLOPs (`layer_flops`); for GPTQ also the lower bound if it were
    all the column loop's fixed cost per column (input columns summed over the solves: 2.29x)."""
    ratio = layer_flops(LLAMA2_70B, row, tokens) / layer_flops(LLAMA2_7B, row, tokens)
    layers = LLAMA2_70B["num_hidden_layers"]
    result = {
        "flop_ratio_per_layer": ratio,
        "seconds_per_layer": per_layer_seconds * ratio,
        "seconds": per_layer_seconds * ratio * layers,
        "how": f"median 7B-shaped layer time x {ratio:.2f} (layer_flops 70B/7B, {tokens} tokens) x {layers} layers",
    }
    if row.startswith("gptq"):
        columns = [sum(_linears(c)[s[0]][1] for s in GPTQ_SETS) for c in (LLAMA2_70B, LLAMA2_7B)]
        result["column_ratio_per_layer"] = columns[0] / columns[1]
        result["seconds_if_column_loop_bound"] = per_layer_seconds * columns[0] / columns[1] * layers
    return result


@torch.no_grad()
def layer_forward_by_dtype(tokens: int) -> dict:
    """Seconds of one LLaMA-2-7B-shaped decoder layer's forward over `tokens` tokens, in bfloat16 and float32."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(**LLAMA2_7B)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).eval()
    hidden = torch.randn(1, tokens, config.hidden_size)
    rotary = LlamaRotaryEmbedding(config)(hidden, torch.arange(tokens).unsqueeze(0))
    seconds = {}
    for dtype in (torch.bfloat16, torch.float32):
        layer, x = layer.to(dtype), hidden.to(dtype)
        embeddings = tuple(t.to(dtype) for t in rotary)
        layer(x, position_embeddings=embeddings)  # warm-up
        start = time.perf_counter()
        layer(x, position_embeddings=embeddings)
        seconds[str(dtype).removeprefix("torch.")] = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "float32_over_bfloat16": seconds["float32"] / seconds["bfloat16"]}
