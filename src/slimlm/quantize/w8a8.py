"""W8A8 Linears (SmoothQuant's storage and kernel): int8 weights, one scale per output channel, × int8 activations
quantized per token at run time.

`W8A8Linear` multiplies int8 × int8 → int32 with torch's `_int_mm` (a real integer GEMM) when `kernel="int_mm"`;
`kernel="simulated"` does the same arithmetic in float32 (identical integers, no integer speedup). Which one ran is
on the module (`kernel`) for the speed records. Saved tensors: ``weight_int8`` int8 [out, in], ``weight_scale``
float16 [out], ``bias`` float32 [out] when the Linear had one.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.quantize.grid import QuantGrid, quantize_codes
from slimlm.storage import StoredModule, empty_module_args

INT8_MAX = 127
KERNELS = ("int_mm", "simulated")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (token): codes in [−127, 127] and the float32 scale of each row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / INT8_MAX
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


class W8A8Linear(StoredModule, kind="w8a8"):
    """int8 weights (per output channel) × int8 activations (per token, dynamic) → int32, rescaled to float."""

    fixed_dtype_buffers = ("weight_scale", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool, kernel: str = "int_mm", device=None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, kernel: str = "int_mm") -> W8A8Linear:
        quantized = quantize_codes(linear.weight, QuantGrid(8, True, None))
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        module.weight_int8.copy_((quantized.codes.int() - quantized.zero.int()).to(torch.int8))
        module.weight_scale.copy_(quantized.scale.reshape(-1))
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module.to(linear.weight.device)

    def storage_entry(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "kernel": self.kernel,
        }

    @classmethod
    def from_entry(cls, entry: dict, current: nn.Module) -> W8A8Linear:
        # built where `current` is (meta for a streamed model: no int8 weight allocated for a placeholder)
        device = empty_module_args(current)["device"]
        return cls(entry["in_features"], entry["out_features"], entry["bias"], entry["kernel"], device)

    def weights_in_buffers(self) -> int:
        return self.in_features * self.out_features

    def kernel_label(self) -> str:
        return "W8A8 int8×int8 (torch._int_mm)" if self.kernel == "int_mm" else "W8A8 simulated in float32"

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
