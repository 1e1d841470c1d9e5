"""Packed quantized Linears: the codes, float16 scales and zero points of a QuantizedWeight, stored at their size.

What is stored (buffers, saved by save_model as they are):

- ``qweight`` uint8 [out, ⌈in/k⌉·m]: each row's b-bit codes as one little-endian bit stream along the input
  dimension, code j at bits j·b .. j·b + b − 1 (k codes fill m = k·b/8 whole bytes). 4-bit: two codes per byte, the
  first in the low nibble; 8-bit: one code per byte; 2/3/5/6/7-bit: 4/8/8/4/8 codes in 1/3/5/3/7 bytes. A row whose
  length is not a multiple of k is padded with zero codes.
- ``scales`` float16 [out, groups] (kept float16 when the model is cast to another dtype).
- ``zeros`` uint8 [out, groups] for asymmetric grids only; symmetric grids have the implicit zero point 2^(b−1).
- ``bias`` (a parameter in the model's dtype) when the Linear had one.

The forward pass runs a real low-bit kernel where one exists for the format (kernels.py: ``int4pack``,
``int8pack``; bfloat16 inside, so equal to the dequantized matmul up to bfloat16 rounding) and otherwise expands
the weight and multiplies (``dequantized``: exactly the fake-quantized Linear's output, no speedup). The module's
``kernel`` says which; `slimlm.storage.kernel_summary` sums it up for the speed records. In memory, a kernel also
keeps the codes in its own layout beside the buffers (as many bytes again as ``qweight`` for int4pack, one byte per
weight for int8pack); only the buffers are saved. The kernels have no backward pass: when a gradient must flow
through the input (recovery training), the forward takes the dequantized path. QuantizedLinear is not an nn.Linear
on purpose: code that edits Linear weights in place (pruning, quantization) must not mistake it for a dense matrix.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from slimlm.quantize import kernels
from slimlm.quantize.grid import QUANTIZED_ATTRIBUTE, QuantGrid, QuantizedWeight
from slimlm.storage import StoredModule, empty_module_args, replace_linears

SCALE_DTYPE = torch.float16


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte run of b-bit codes."""
    codes = 8 // math.gcd(bits, 8)
    return codes, codes * bits // 8


def packed_columns(in_features: int, bits: int) -> int:
    codes, nbytes = _chunk(bits)
    return -(-in_features // codes) * nbytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [out, in] in 0..2^b − 1 -> the packed bytes [out, packed_columns(in, b)] (module docstring)."""
    if bits == 8:
        return codes.to(torch.uint8).clone()
    per_chunk, nbytes = _chunk(bits)
    rows = codes.shape[0]
    chunks = F.pad(codes.long(), (0, -codes.shape[1] % per_chunk)).view(rows, -1, per_chunk)
    # a chunk holds at most 56 bits: its codes shifted into place and summed (= or-ed) fit an int64
    value = (chunks << (torch.arange(per_chunk, device=codes.device) * bits)).sum(dim=-1, keepdim=True)
    return ((value >> (torch.arange(nbytes, device=codes.device) * 8)) & 0xFF).to(torch.uint8).view(rows, -1)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The inverse of pack_codes: uint8 codes [out, in_features]."""
    if bits == 8:
        return packed
    per_chunk, nbytes = _chunk(bits)
    rows, device = packed.shape[0], packed.device
    if nbytes == 1:  # 2 and 4 bits: whole codes in every byte, shifted out in uint8 (~10x faster than int64)
        value, dtype = packed.unsqueeze(-1), torch.uint8
    else:
        chunks = packed.long().view(rows, -1, nbytes)
        value = (chunks << (torch.arange(nbytes, device=device) * 8)).sum(dim=-1, keepdim=True)
        dtype = torch.int64
    codes = (value >> (torch.arange(per_chunk, device=device, dtype=dtype) * bits)) & (2**bits - 1)
    return codes.view(rows, -1)[:, :in_features].to(torch.uint8)


class QuantizedLinear(StoredModule, kind="packed"):
    """y = x·Wᵀ + bias with W = Δ·(q − z) held packed (module docstring); ``kernel`` names what computes it."""

    fixed_dtype_buffers = ("scales",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid: QuantGrid,
        bias: bool = False,
        kernel: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.grid = in_features, out_features, grid
        self.group_width = grid.group_width(in_features)
        groups = in_features // self.group_width
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_columns(in_features, grid.bits), dtype=torch.uint8, device=device),
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=SCALE_DTYPE, device=device))
        zeros = None if grid.sym else torch.zeros(out_features, groups, dtype=torch.uint8, device=device)
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.kernel = self._resolve_kernel(kernel)
        self._kernel_tensors: tuple = ()  # the kernel's own layout of the weight; rebuilt from the buffers

    def _resolve_kernel(self, kernel: str) -> str:
        best = kernels.choose_kernel(
            self.grid.bits, self.grid.sym, self.group_width, self.in_features, self.out_features
        )
        if kernel not in ("auto", best, kernels.DEQUANTIZED):
            raise ValueError(f"kernel {kernel!r} cannot run {self.grid}; use 'auto', {best!r} or 'dequantized'")
        return best if kernel == "auto" else kernel

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, quantized: QuantizedWeight, kernel: str = "auto") -> QuantizedLinear:
        """The packed form of a fake-quantized Linear: its codes, scales, zero points and bias."""
        grid = quantized.grid
        if grid.sym and not (quantized.zero == grid.mid_code).all():
            raise ValueError("a symmetric grid must have the zero point 2^(b-1) everywhere")
        module = cls(
            linear.in_features,
            linear.out_features,
            grid,
            linear.bias is not None,
            kernel,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        module.qweight.copy_(pack_codes(quantized.codes, grid.bits))
        module.scales.copy_(quantized.scale)
        if module.zeros is not None:
            module.zeros.copy_(quantized.zero)
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        module.prepare_kernel()
        return module

    def storage_entry(self) -> dict:
        return {
            "bits": self.grid.bits,
            "group_size": self.grid.group_size,
            "sym": self.grid.sym,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "kernel": self.kernel,
        }

    @classmethod
    def from_entry(cls, entry: dict, current: nn.Module) -> QuantizedLinear:
        grid = QuantGrid(entry["bits"], entry["sym"], entry["group_size"])
        return cls(entry["in_features"], entry["out_features"], grid, entry["bias"], **empty_module_args(current))

    def weights_in_buffers(self) -> int:
        return self.in_features * self.out_features

    def kernel_label(self) -> str:
        on_cpu = self.qweight.device.type in ("cpu", "meta")  # meta: a streamed layer between loads, run on CPU
        kernel = self.kernel if on_cpu else kernels.DEQUANTIZED
        return kernel if kernel == kernels.DEQUANTIZED else f"{kernel} ({kernels.KERNEL_OPS[kernel]})"

    def quantized_weight(self) -> QuantizedWeight:
        """The codes, scales and zero points as the quantization methods produce them."""
        zero = (
            self.zeros
            if self.zeros is not None
            else torch.full_like(self.scales, self.grid.mid_code, dtype=torch.uint8)
        )
        return QuantizedWeight(
            unpack_codes(self.qweight, self.grid.bits, self.in_features), self.scales, zero, self.grid
        )

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight Δ·(q − z) [out, in]."""
        return self.quantized_weight().dequantize()

    @torch.no_grad()
    def prepare_kernel(self) -> None:
        """Convert the buffers into the kernel's layout (after from_linear and after every load_state_dict)."""
        if self.kernel == kernels.DEQUANTIZED or self.qweight.device.type != "cpu":
            self._kernel_tensors = ()
            return
        quantized = self.quantized_weight()
        if self.kernel == "int4pack":
            self._kernel_tensors = kernels.int4pack_tensors(
                quantized.codes, quantized.scale, quantized.zero, self.group_width
            )
        else:
            self._kernel_tensors = kernels.int8pack_tensors(quantized.codes, quantized.scale)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.prepare_kernel()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # the float16 scales keep their dtype (fixed_dtype_buffers)
        if self.qweight.device.type != "cpu" or not self._kernel_tensors:
            self.prepare_kernel()
        return self

    def runs_kernel(self, x: torch.Tensor) -> bool:
        """Whether this forward runs the low-bit kernel: on CPU, and not when a gradient must flow back through x
        (torch's kernels have no backward; recovery training gets the dequantized matmul instead)."""
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        return (
            self.kernel != kernels.DEQUANTIZED
            and x.device.type == "cpu"
            and bool(self._kernel_tensors)
            and not needs_grad
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_kernel(x):
            return F.linear(x, self.dequantize_weight().to(x.dtype), self.bias)
        out = kernels.run_kernel(self.kernel, x.reshape(-1, self.in_features), self._kernel_tensors)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        group = "per channel" if self.grid.group_size is None else f"group_size={self.grid.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.grid.bits}, {group}, "
            f"sym={self.grid.sym}, kernel={self.kernel}"
        )


def quantized_linears(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    """Every QuantizedLinear of `model` with its full name, wherever it sits (inside a wrapper too)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]


def pack_model(model: nn.Module, kernel: str = "auto", layers: list[int] | None = None) -> int:
    """Replace every Linear carrying codes (``slimlm_quantized``) by its QuantizedLinear, in the decoder layers
    `layers` only when given (a streamed model packs each layer before writing it); the number replaced."""
    prefixes = None if layers is None else tuple(f"model.layers.{index}." for index in layers)
    carriers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and hasattr(module, QUANTIZED_ATTRIBUTE)
        and (prefixes is None or name.startswith(prefixes))
    ]
    return replace_linears(
        model,
        carriers,
        lambda linear: QuantizedLinear.from_linear(linear, getattr(linear, QUANTIZED_ATTRIBUTE), kernel),
    )


@torch.no_grad()
def unpack_model(model: nn.Module) -> int:
    """The inverse of pack_model: fake-quantized Linears (dequantized weight in the model's dtype, the codes kept as
    ``slimlm_quantized``), for stages that edit weights in place; the number replaced."""
    packed = quantized_linears(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, module in packed:
        linear = nn.Linear(
            module.in_features, module.out_features, module.bias is not None, device=module.qweight.device, dtype=dtype
        )
        quantized = module.quantized_weight()
        linear.weight.copy_(quantized.dequantize().to(dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        setattr(linear, QUANTIZED_ATTRIBUTE, quantized)
        model.set_submodule(name, linear)
    return len(packed)


def use_kernel(model: nn.Module, kernel: str) -> None:
    """Switch every packed Linear to `kernel` ("auto": the fastest that computes its format, or "dequantized")."""
    for _, module in quantized_linears(model):
        module.kernel = module._resolve_kernel(kernel)
        module.prepare_kernel()
