"""Real low-bit matmul kernels for packed quantized Linears on CPU: torch's own weight-only operators.

What is real: the matmul reads the low-bit weights and dequantizes them inside the kernel, so a decode step moves
4 (or 8) bits per weight through memory instead of 32. What is not exact: both kernels take bfloat16 activations,
scales and outputs, so a kernel's result equals the dequantized matmul only up to bfloat16 rounding (the float32
and float16 variants of these operators exist but run a scalar fallback 20-30× slower than a float32 F.linear,
measured by benchmarks/kernels.py; activations are therefore cast to bfloat16 and the output back).

- ``int4pack``: ``torch._weight_int4pack_mm_for_cpu`` (the gpt-fast/torchao "tinygemm" layout for CPU). Codes
  0..15, one scale s and one float offset o per group of 32/64/128/256 input columns, w = (q − 8)·s + o. slimlm's
  grid w = Δ·(q − z) maps onto it with s = Δ and o = Δ·(8 − z): o = 0 for symmetric grids (z = 8), and Δ, o are
  rounded to bfloat16. A wider group (or one scale per output channel) is the same scale repeated over kernel
  groups. Needs out_features divisible by 16 and a group width divisible by 32.
- ``int8pack``: ``torch._weight_int8pack_mm``: int8 weights (code − 128) with one bfloat16 scale per output row;
  symmetric 8-bit per-channel grids only.

Every other format (2/3/5/6/7 bits, 8-bit groups or zero points, shapes the kernels refuse) is ``dequantized``:
the packed weight is expanded to the activations' dtype and multiplied by F.linear: smaller files, no speedup.
"""

from __future__ import annotations

import torch

DEQUANTIZED = "dequantized"
# kernel name -> the operator that runs it, as speed records name it
KERNEL_OPS = {
    "int4pack": "torch._weight_int4pack_mm_for_cpu",
    "int8pack": "torch._weight_int8pack_mm",
    DEQUANTIZED: "F.linear on the dequantized weight",
}
INT4_GROUPS = (256, 128, 64, 32)  # the group widths _weight_int4pack_mm_for_cpu accepts, widest first
KERNEL_DTYPE = torch.bfloat16
_OPERATORS = {
    "int4pack": ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"),
    "int8pack": ("_weight_int8pack_mm",),
}


def available(kernel: str) -> bool:
    """Whether this torch build has the kernel's operators (they are private and come and go between versions)."""
    return all(hasattr(torch.ops.aten, op) for op in _OPERATORS.get(kernel, ()))


def int4_group(group_width: int) -> int | None:
    """The widest kernel group that tiles a slimlm group of `group_width` columns, or None."""
    return next((group for group in INT4_GROUPS if group_width % group == 0), None)


def choose_kernel(bits: int, sym: bool, group_width: int, in_features: int, out_features: int) -> str:
    """The fastest kernel that computes this format; ``dequantized`` where no real low-bit kernel applies."""
    if bits == 4 and out_features % 16 == 0 and int4_group(group_width) and available("int4pack"):
        return "int4pack"
    if bits == 8 and sym and group_width == in_features and available("int8pack"):
        return "int8pack"
    return DEQUANTIZED


def int4pack_tensors(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_width: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed weight, scales_and_zeros [groups, out, 2] bfloat16, kernel group) for codes [out, in] in 0..15,
    scale float16 [out, groups] and zero points [out, groups]."""
    group = int4_group(group_width)
    repeat = group_width // group
    scale = scale.float().repeat_interleave(repeat, dim=1)
    offset = scale * (8 - zero.float().repeat_interleave(repeat, dim=1))  # exact in float32: Δ₁₆ times a small int
    scales_and_zeros = torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return packed, scales_and_zeros, group


def int8pack_tensors(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [out, in], bfloat16 scale [out]) of a symmetric 8-bit per-channel grid (zero point 128)."""
    return (codes.to(torch.int16) - 128).to(torch.int8).contiguous(), scale[:, 0].to(KERNEL_DTYPE).contiguous()


def run_kernel(kernel: str, rows: torch.Tensor, tensors: tuple) -> torch.Tensor:
    """rows [m, in] times the packed weight, in bfloat16 (see the module docstring); `tensors` from *_tensors."""
    rows = rows.to(KERNEL_DTYPE).contiguous()
    if kernel == "int4pack":
        packed, scales_and_zeros, group = tensors
        return torch._weight_int4pack_mm_for_cpu(rows, packed, group, scales_and_zeros)
    if kernel == "int8pack":
        weight, scale = tensors
        return torch._weight_int8pack_mm(rows, weight, scale)
    raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNEL_OPS)}")
