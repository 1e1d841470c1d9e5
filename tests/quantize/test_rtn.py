import pytest
import torch

from slimlm.quantize.grid import QuantGrid, grid_params, quantize_codes


@pytest.mark.parametrize(
    "grid",
    [
        QuantGrid(2, True, 16),
        QuantGrid(3, False, 32),
        QuantGrid(4, True, 32),
        QuantGrid(4, False, None),
        QuantGrid(8, True, 64),
        QuantGrid(8, False, 16),
    ],
)
def test_round_to_nearest_is_within_half_a_step(grid):
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(grid.bits)) * 0.02
    quantized = quantize_codes(weight, grid)
    step = grid.group_view(torch.ones_like(weight)) * quantized.scale.float().abs().unsqueeze(-1)
    error = grid.group_view((weight - quantized.dequantize()).abs())
    # codes are chosen with the float32 scale and read back with its float16 rounding (relative error ≤ 2⁻¹¹),
    # which moves a value by at most |q − z|·2⁻¹¹ steps
    slack = step * (grid.max_code * 2**-11)
    beyond = error > step / 2 + slack
    if grid.sym and grid.bits < 8:
        # Q4_0-style: the side opposite the extreme reaches only 2^(b−1) − 1 steps, so values in its last half step
        # (at most the extreme's magnitude) clip to the top code, up to one step away
        codes = grid.group_view(quantized.codes)
        assert (codes[beyond] == grid.max_code).all() and (error <= step + slack).all()
        assert beyond.float().mean() < 0.05
    else:
        assert not beyond.any()
    assert (error > 0.4 * step).any()  # the bound is tight: rounding does cost up to half a step
    assert int(quantized.codes.max()) <= grid.max_code
    assert quantized.codes.dtype == torch.uint8 and quantized.zero.dtype == torch.uint8
    assert quantized.scale.shape == (32, 128 // (grid.group_size or 128))


def test_symmetric_codes_use_the_signed_range():
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    four = quantize_codes(weight, QuantGrid(4, True, 32))
    assert four.codes.min() == 0 and four.codes.max() == 15 and (four.zero == 8).all()
    eight = quantize_codes(weight, QuantGrid(8, True, 32))
    assert eight.codes.min() == 1 and eight.codes.max() == 255 and (eight.zero == 128).all()  # Q8_0: ±127


def test_asymmetric_zero_points_are_codes_and_zero_is_exact():
    weight = torch.rand(16, 64, generator=torch.Generator().manual_seed(2)) - 0.3
    weight[:, ::7] = 0
    grid = QuantGrid(3, False, 16)
    quantized = quantize_codes(weight, grid)
    assert int(quantized.zero.max()) <= 7
    assert (quantized.dequantize()[:, ::7] == 0).all()
    scale, zero = grid_params(grid.group_view(weight), grid)
    assert torch.equal(zero.to(torch.uint8), quantized.zero) and torch.equal(scale.half(), quantized.scale)
