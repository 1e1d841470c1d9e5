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

import torch
from torch import nn

from slimlm.calibrate import observe_layer, walk_layers
from slimlm.errors import SlimlmError
from slimlm.modules import layer_linears
from slimlm.prune.unstructured import calibration_windows
from slimlm.quantize.grid import QuantGrid, quantize_codes
from slimlm.quantize.stage import QuantizeOptions, register_quant_method
from slimlm.surgery import fold_channel_scales

SMOOTH_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
INT8_MAX = 127
KERNELS = ("int_mm", "simulated")


def smoothing_scales(activation_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_:,j|^(1−α), the max over every Linear reading X (float32)."""
    weight_max = torch.stack([w.abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    scales = activation_max.float().clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=1e-5)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (token): codes in [−127, 127] and the float32 scale of each row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / INT8_MAX
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


class W8A8Linear(nn.Module):
    """int8 weights (per output channel) × int8 activations (per token, dynamic) → int32, rescaled to float."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kernel: str = "int_mm"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, kernel: str = "int_mm") -> "W8A8Linear":
        quantized = quantize_codes(linear.weight, QuantGrid(8, True, None))
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        module.weight_int8.copy_((quantized.codes.int() - quantized.zero.int()).to(torch.int8))
        module.weight_scale.copy_(quantized.scale.reshape(-1))
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module.to(linear.weight.device)

    def dequantize_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale.float().unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        codes, row_scale = quantize_per_token(rows)
        if self.kernel == "int_mm":
            accumulated = torch._int_mm(codes, self.weight_int8.t()).float()
        else:
            accumulated = codes.float() @ self.weight_int8.float().t()
        out = accumulated * row_scale * self.weight_scale.float()
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def replace_with_w8a8(layer: nn.Module, names: list[str], kernel: str) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name)
        setattr(parent, child, W8A8Linear.from_linear(getattr(parent, child), kernel))


@register_quant_method("smoothquant")
@torch.no_grad()
def smoothquant_quantize(model, options: QuantizeOptions, context, alpha: float = 0.5,
                         kernel: str = "int_mm") -> None:
    """Smooth the norm-fed groups with migration strength α, then W8A8 every target Linear, layer by layer."""
    if options.bits != 8 or options.group_size is not None:
        raise SlimlmError("quantize: smoothquant is W8A8 with one weight scale per output channel; set bits: 8 and "
                          f"group_size: null (got bits {options.bits}, group_size {options.group_size})")
    targets = options.layer_targets()
    migrated: list[str] = []

    def quantize_layer(index: int, layer: nn.Module, inputs) -> None:
        linears = layer_linears(layer)
        groups = [(p, c) for p, c in SMOOTH_GROUPS if all(name in targets for name in c)]
        stats = observe_layer(layer, inputs, [c[0] for _, c in groups])
        for producer, consumers in groups:
            scales = smoothing_scales(stats[consumers[0]].abs_max, [linears[n].weight for n in consumers], alpha)
            fold_channel_scales(layer.get_submodule(producer), [linears[n] for n in consumers], scales)
            migrated.append(f"{index}.{producer}: max s {scales.max():.3g}")
        replace_with_w8a8(layer, [name for name in targets if name in linears], kernel)

    walk_layers(model, calibration_windows(model, context), quantize_layer, description="smoothquant")
    context.notes.append(
        f"smoothquant: α = {alpha}, scales folded into input_layernorm (q/k/v) and post_attention_layernorm "
        f"(gate/up); weights int8 per output channel, activations int8 per token (dynamic); matmul kernel "
        f"{'torch._int_mm (int8 × int8 → int32)' if kernel == 'int_mm' else 'simulated in float32'}"
    )
