"""The CPU low-bit kernels: which formats get one, and that the kernel multiplies by exactly slimlm's grid values
(up to the bfloat16 rounding the kernels work in)."""

import pytest
import torch
from torch.nn import functional as F

from slimlm.quantize import kernels
from slimlm.quantize.grid import QuantGrid, QuantizedWeight, quantize_codes
from slimlm.quantize.packed import QuantizedLinear

needs_int4 = pytest.mark.skipif(not kernels.available("int4pack"), reason="torch lacks the int4pack CPU kernel")
needs_int8 = pytest.mark.skipif(not kernels.available("int8pack"), reason="torch lacks the int8pack CPU kernel")


@pytest.mark.parametrize(
    ("bits", "sym", "width", "shape", "expected"),
    [
        (4, True, 32, (64, 128), "int4pack"),
        (4, False, 64, (64, 128), "int4pack"),
        (4, True, 128, (48, 128), "int4pack"),  # one scale per channel of 128 columns
        (4, True, 96, (64, 192), "int4pack"),  # 96-column groups tiled by kernel groups of 32
        (4, True, 16, (64, 128), "dequantized"),  # narrower than the kernel's smallest group
        (4, True, 32, (24, 128), "dequantized"),  # out_features not a multiple of 16
        (8, True, 128, (24, 128), "int8pack"),
        (8, True, 32, (64, 128), "dequantized"),  # int8pack has one scale per row
        (8, False, 128, (64, 128), "dequantized"),  # and no zero point
        (3, True, 32, (64, 128), "dequantized"),
    ],
)
def test_each_format_gets_the_kernel_that_computes_it(bits, sym, width, shape, expected):
    if expected != "dequantized" and not kernels.available(expected):
        pytest.skip(f"torch lacks {expected}")
    out_features, in_features = shape
    assert kernels.choose_kernel(bits, sym, width, in_features, out_features) == expected


def _random_grid_weight(grid: QuantGrid, out_features: int, in_features: int, seed: int = 0) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(seed)
    return quantize_codes(torch.randn(out_features, in_features, generator=generator) * 0.05, grid)


def _kernel_weight(kernel: str, tensors: tuple, in_features: int) -> torch.Tensor:
    """The weight [out, in] a kernel applies, read back by multiplying the identity (exact but for bf16 output)."""
    return kernels.run_kernel(kernel, torch.eye(in_features), tensors).float().T


def _bf16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).float()


@needs_int4
@pytest.mark.parametrize(("sym", "group_size"), [(True, 32), (True, 64), (False, 32), (True, None), (False, None)])
def test_int4pack_applies_the_grid_values(sym, group_size):
    grid = QuantGrid(4, sym, group_size)
    quantized = _random_grid_weight(grid, 32, 128)
    width = grid.group_width(128)
    tensors = kernels.int4pack_tensors(quantized.codes, quantized.scale, quantized.zero, width)
    applied = _kernel_weight("int4pack", tensors, 128)
    # the kernel's own rule w = (q − 8)·s + o with s = Δ and o = Δ·(8 − z), each rounded to bfloat16
    scale = quantized.scale.float().repeat_interleave(width, dim=1)
    zero = quantized.zero.float().repeat_interleave(width, dim=1)
    expected = (quantized.codes.float() - 8) * _bf16(scale) + _bf16(scale * (8 - zero))
    assert torch.equal(applied, _bf16(expected))
    # ... which is the grid value up to bfloat16 rounding of the scale (a fraction of a step)
    assert torch.allclose(applied, quantized.dequantize(), rtol=2**-7, atol=scale.max().item() / 16)


@needs_int8
def test_int8pack_applies_the_grid_values():
    quantized = _random_grid_weight(QuantGrid(8, True, None), 24, 96)
    applied = _kernel_weight("int8pack", kernels.int8pack_tensors(quantized.codes, quantized.scale), 96)
    expected = (quantized.codes.float() - 128) * _bf16(quantized.scale.float())
    assert torch.equal(applied, _bf16(expected))


@pytest.mark.parametrize(
    ("bits", "group_size"),
    [
        pytest.param(4, 32, marks=needs_int4),
        pytest.param(4, None, marks=needs_int4),
        pytest.param(8, None, marks=needs_int8),
    ],
)
def test_a_kernel_forward_matches_the_dequantized_matmul_to_bfloat16_precision(bits, group_size):
    grid = QuantGrid(bits, True, group_size)
    linear = torch.nn.Linear(128, 64, bias=True)
    quantized = quantize_codes(linear.weight, grid)
    module = QuantizedLinear.from_linear(linear, quantized)
    assert module.kernel == ("int4pack" if bits == 4 else "int8pack")
    x = torch.randn(2, 5, 128)
    reference = F.linear(x, quantized.dequantize(), linear.bias)
    out = module(x)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert (out - reference).abs().max() < 0.02 * reference.abs().max()
    slow = QuantizedLinear.from_linear(linear, quantized, kernel="dequantized")
    assert torch.equal(slow(x), reference)


def test_a_kernel_that_cannot_run_the_format_is_refused():
    with pytest.raises(ValueError, match="cannot run"):
        QuantizedLinear(128, 64, QuantGrid(3, True, 32), kernel="int4pack")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.run_kernel("int2pack", torch.zeros(1, 4), ())


@needs_int4
def test_gradients_flow_through_the_dequantized_matmul():
    """torch's low-bit kernels have no backward: training through a packed Linear takes the dequantized path."""
    linear = torch.nn.Linear(64, 32)
    quantized = quantize_codes(linear.weight, QuantGrid(4, True, 32))
    module = QuantizedLinear.from_linear(linear, quantized)
    x = torch.randn(2, 64, requires_grad=True)
    module(x).pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    F.linear(reference, quantized.dequantize(), linear.bias).pow(2).sum().backward()
    assert torch.equal(x.grad, reference.grad) and module.bias.grad is not None
    assert module.runs_kernel(x.detach())
