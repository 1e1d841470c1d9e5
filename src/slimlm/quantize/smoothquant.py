"""SmoothQuant W8A8 (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for LLMs").

Activations have outlier channels that per-token int8 cannot hold; weights do not. SmoothQuant moves difficulty
from activations to weights with per-input-channel scales s_j = max|X_j|^α / max|W_:,j|^(1−α) (α = migration
strength), folded into the RMSNorm before q/k/v and before gate/up (the paper's LLaMA map; o_proj and down_proj
inputs are not smoothed). Then every decoder Linear becomes a `W8A8Linear`: weights int8 per output channel
(symmetric, the shared grid's 8-bit rule), activations int8 per token, quantized dynamically at run time.

`W8A8Linear` multiplies int8 × int8 → int32 with torch's `_int_mm` (a real integer GEMM) when `kernel="int_mm"`;
`kernel="simulated"` does the same arithmetic in float32 (identical integers, no integer speedup). Which one ran is
on the module (`kernel`) for the speed records.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimlm.calibrate import observe_layer, walk_layers
from slimlm.modules import NORM_FED_GROUPS, layer_linears
from slimlm.quantize.stage import QuantizeTargets, register_quant_method
from slimlm.quantize.w8a8 import KERNELS, W8A8Linear
from slimlm.storage import replace_linears
from slimlm.surgery import fold_channel_scales


class SmoothQuantOptions(QuantizeTargets):
    # W8A8 with one weight scale per output channel: fixed, and accepted so that a recipe may spell them out
    bits: Literal[8] = 8
    group_size: None = None
    alpha: float = Field(0.5, ge=0, le=1)  # migration strength: 0 leaves activations as they are, 1 moves it all
    kernel: Literal[KERNELS] = "int_mm"  # simulated: the same integers in float32 (no integer speedup)


def smoothing_scales(activation_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_:,j|^(1−α), the max over every Linear reading X (float32)."""
    weight_max = torch.stack([w.abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    scales = activation_max.float().clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=1e-5)


def replace_with_w8a8(layer: nn.Module, names: list[str], kernel: str) -> None:
    linears = layer_linears(layer)
    replace_linears(
        layer, [(name, linears[name]) for name in names], lambda linear: W8A8Linear.from_linear(linear, kernel)
    )


@register_quant_method("smoothquant", SmoothQuantOptions, streams=True)
@torch.no_grad()
def smoothquant_quantize(model, options: SmoothQuantOptions, context) -> None:
    """Smooth the norm-fed groups with migration strength α, then W8A8 every target Linear, layer by layer."""
    targets, alpha, kernel = options.layer_targets(), options.alpha, options.kernel

    def quantize_layer(index: int, layer: nn.Module, inputs) -> None:
        linears = layer_linears(layer)
        groups = [(p, c) for p, c in NORM_FED_GROUPS if all(name in targets for name in c)]
        stats = observe_layer(layer, inputs, [c[0] for _, c in groups])
        for producer, consumers in groups:
            scales = smoothing_scales(stats[consumers[0]].abs_max, [linears[n].weight for n in consumers], alpha)
            fold_channel_scales(layer.get_submodule(producer), [linears[n] for n in consumers], scales)
        replace_with_w8a8(layer, [name for name in targets if name in linears], kernel)

    walk_layers(model, context.calibration.windows(model, context.notes), quantize_layer, description="smoothquant")
    context.notes.append(
        f"smoothquant: α = {alpha}, scales folded into input_layernorm (q/k/v) and post_attention_layernorm "
        f"(gate/up); weights int8 per output channel, activations int8 per token (dynamic); matmul kernel "
        f"{'torch._int_mm (int8 × int8 → int32)' if kernel == 'int_mm' else 'simulated in float32'}"
    )
