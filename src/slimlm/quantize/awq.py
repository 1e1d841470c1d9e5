"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

A few input channels carry much larger activations than the rest; their weights matter most. AWQ scales each input
channel j of a group of Linears that read the same input by s_j = mean|X_j|^α (normalised), quantizes W·diag(s) and
divides the activation by s, folding 1/s into the operation that produced X (an RMSNorm weight, or the rows of the
Linear before), so the full-precision function is unchanged and only the rounding moves. α ∈ [0, 1) is chosen per
group by grid search on the group's output error ‖X Wᵀ − (X/s) Q(W·s)ᵀ‖² (as llm-awq's auto_scale).

Groups (llm-awq's LLaMA map): input_layernorm → q/k/v; v_proj → o_proj (only when v's outputs line up with o's
inputs, i.e. no grouped-query attention — SmolLM2 and LLaMA-2-70B-style GQA skip it); post_attention_layernorm →
gate/up; up_proj → down_proj. A group is scaled only when all its Linears are targets. Differences from llm-awq,
said in the stage notes: the error is measured on the group's Linear outputs rather than through the whole attention
or MLP block, on a seeded subset of `search_tokens` calibration tokens; no weight clipping search; each layer is
quantized inside the walk, so the next layer is calibrated on quantized outputs (GPTQ-style), not full precision.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt
from torch import nn

from slimlm.calibrate import run_layer, walk_layers
from slimlm.modules import LINEAR_FED_GROUPS, NORM_FED_GROUPS, layer_linears
from slimlm.quantize.grid import QuantGrid, fake_quantize, quantize_codes
from slimlm.quantize.stage import QuantizeOptions, register_quant_method, store_quantized
from slimlm.surgery import fold_channel_scales

# (module producing the input, Linears reading it): llm-awq's LLaMA map. Searching the norm-fed groups first is
# llm-awq's order: q/k/v's search sees v_proj before v→o folds its scales into v's rows.
SCALE_GROUPS = NORM_FED_GROUPS + LINEAR_FED_GROUPS


class AWQOptions(QuantizeOptions):
    grid_points: int = Field(20, ge=2)  # α = 0, 1/n, …, (n−1)/n; llm-awq's 20
    search_tokens: PositiveInt = 2048  # calibration tokens per group in the search (CPU time grows linearly)


def capture_group_inputs(layer: nn.Module, inputs, names: list[str], tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """The input of each named Linear over the calibration windows: a seeded subset of `tokens` rows, float32."""
    linears = layer_linears(layer)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        linears[name].register_forward_pre_hook(lambda _m, args, n=name: seen[n].append(args[0].detach()))
        for name in names
    ]
    try:
        run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    generator = torch.Generator().manual_seed(seed)
    captured = {}
    for name, parts in seen.items():
        rows = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts]).float()
        if rows.shape[0] > tokens:
            rows = rows[torch.randperm(rows.shape[0], generator=generator)[:tokens].to(rows.device)]
        captured[name] = rows
    return captured


def group_error(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    scales: torch.Tensor,
    grids: list[QuantGrid],
    references: list[torch.Tensor],
) -> float:
    """Σ over the group of mean ‖X Wᵀ − (X/s) Q(W·s)ᵀ‖² per output, each W on its own grid."""
    scaled_x = x / scales
    return sum(
        (scaled_x @ fake_quantize(w * scales, grid).T - ref).pow(2).mean().item()
        for w, grid, ref in zip(weights, grids, references, strict=True)
    )


def search_scales(
    x: torch.Tensor, weights: list[torch.Tensor], grids: list[QuantGrid], grid_points: int = 20
) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scales with the lowest group error (each weight on its grid); returns (scales, α,
    error relative to α = 0)."""
    activation = x.abs().mean(dim=0)
    references = [x @ w.T for w in weights]
    best = (None, 0.0, float("inf"))
    baseline = None
    for point in range(grid_points):
        alpha = point / grid_points
        scales = activation.pow(alpha).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = group_error(x, weights, scales, grids, references)
        baseline = error if baseline is None else baseline
        if error < best[2]:
            best = (scales, alpha, error)
    return best[0], best[1], best[2] / baseline if baseline else 1.0


def _scalable(layer: nn.Module, producer_name: str, consumer_names: tuple[str, ...], targets: set[str]) -> bool:
    producer = layer.get_submodule(producer_name)
    width = producer.out_features if isinstance(producer, nn.Linear) else producer.weight.shape[0]
    linears = layer_linears(layer)
    return all(name in targets and linears[name].in_features == width for name in consumer_names)


def scale_layer(layer: nn.Module, inputs, options: AWQOptions, seed: int) -> list[str]:
    """Search and fold the AWQ scales of every eligible group in the layer; returns a line per group."""
    targets = set(options.layer_targets())
    groups = [(p, c) for p, c in SCALE_GROUPS if _scalable(layer, p, c, targets)]
    captured = capture_group_inputs(layer, inputs, [c[0] for _, c in groups], options.search_tokens, seed)
    linears = layer_linears(layer)
    lines = []
    for producer_name, consumer_names in groups:
        consumers = [linears[name] for name in consumer_names]
        scales, alpha, relative = search_scales(
            captured[consumer_names[0]],
            [c.weight.float() for c in consumers],
            [options.grid(name) for name in consumer_names],
            options.grid_points,
        )
        fold_channel_scales(layer.get_submodule(producer_name), consumers, scales)
        lines.append(
            f"{producer_name}→{'/'.join(n.rsplit('.', 1)[-1] for n in consumer_names)} α={alpha:.2f} "
            f"(error ×{relative:.2f})"
        )
    return lines


@register_quant_method("awq", AWQOptions, streams=True)
@torch.no_grad()
def awq_quantize(model, options: AWQOptions, context) -> None:
    """AWQ scales searched and folded layer by layer, then round-to-nearest on the scaled weights."""
    targets = set(options.layer_targets())
    seed = context.calibration.seed
    per_layer: list[str] = []

    def quantize_layer(index: int, layer: nn.Module, inputs) -> None:
        per_layer.append(f"layer {index}: " + ", ".join(scale_layer(layer, inputs, options, seed + index)))
        for name, linear in layer_linears(layer).items():
            if name in targets:
                store_quantized(linear, quantize_codes(linear.weight, options.grid(name)))

    walk_layers(model, context.calibration.windows(model, context.notes), quantize_layer, description="awq")
    context.notes.append(
        f"awq: α grid of {options.grid_points}, error on each group's Linear outputs over {options.search_tokens} "
        "sampled calibration tokens, scales folded into the norm or Linear before (v→o skipped where grouped-query "
        "attention makes the widths differ), no clipping search, then round-to-nearest; "
        + "; ".join(per_layer[:3])
        + (f"; … ({len(per_layer)} layers)" if len(per_layer) > 3 else "")
    )
