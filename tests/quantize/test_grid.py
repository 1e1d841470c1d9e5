import math

import numpy as np
import pytest
import torch

from slimlm.quantize.grid import (
    QuantGrid,
    decode,
    encode,
    fake_quantize,
    fake_quantize_ste,
    grid_params,
    quantize_codes,
)


def test_symmetric_four_bit_by_hand():
    # extreme -1.0 (the first of ±1.0): Δ = -1/-8 = 0.125; 1.0 would be +8 and clips to code 15 (0.875)
    weight = torch.tensor([[0.5, -1.0, 0.25, 0.0, 0.3, -0.06, 1.0, 0.875]])
    quantized = quantize_codes(weight, QuantGrid(bits=4, sym=True))
    assert quantized.codes.tolist() == [[12, 0, 10, 8, 10, 8, 15, 15]]
    assert quantized.scale.tolist() == [[0.125]] and quantized.zero.tolist() == [[8]]
    assert quantized.dequantize().tolist() == [[0.5, -1.0, 0.25, 0.0, 0.25, 0.0, 0.875, 0.875]]


def test_a_positive_extreme_gets_a_negative_scale_and_the_extra_level():
    weight = torch.tensor([[2.0, -1.0, 0.5, -1.75]])
    quantized = quantize_codes(weight, QuantGrid(bits=4, sym=True))
    assert quantized.scale.tolist() == [[-0.25]]
    assert quantized.codes.tolist() == [[0, 12, 6, 15]]
    assert quantized.dequantize().tolist() == weight.tolist()  # all four lie on the grid: no error


def test_asymmetric_zero_point_and_clamping_by_hand():
    grid = QuantGrid(bits=2, sym=False)
    # min -1, max 2: Δ = 3/3 = 1, z = 1; 0.5 and 1.2 round to 1.0 (half up)
    quantized = quantize_codes(torch.tensor([[-1.0, 0.5, 2.0, 1.2]]), grid)
    assert quantized.scale.tolist() == [[1.0]] and quantized.zero.tolist() == [[1]]
    assert quantized.codes.tolist() == [[0, 2, 3, 2]]
    assert quantized.dequantize().tolist() == [[-1.0, 1.0, 2.0, 1.0]]
    # all positive: min is clamped to 0 so that 0 stays representable (z = 0)
    scale, zero = grid_params(torch.tensor([[1.0, 2.0, 3.0]]), grid)
    assert scale.tolist() == [1.0] and zero.tolist() == [0.0]
    # all negative: max clamped to 0, z = 3
    scale, zero = grid_params(torch.tensor([[-3.0, -1.0, -2.0]]), grid)
    assert scale.tolist() == [1.0] and zero.tolist() == [3.0]
    # values beyond the range clamp to the end codes
    assert encode(torch.tensor([-5.0, 5.0]), torch.tensor(1.0), torch.tensor(1.0), grid).tolist() == [0.0, 3.0]


def test_groups_have_their_own_scales():
    weight = torch.tensor([[4.0, 2.0, 3.0, 1.0, 0.4, 0.1, 0.2, 0.3]])
    per_channel = quantize_codes(weight, QuantGrid(bits=4, group_size=None))
    per_group = quantize_codes(weight, QuantGrid(bits=4, group_size=4))
    assert per_channel.scale.shape == (1, 1) and per_group.scale.shape == (1, 2)
    assert per_group.scale[0].tolist() == pytest.approx([-0.5, -0.05], rel=1e-3)
    # one step of 0.5 for the whole row: the small half rounds to 0 or 0.5
    assert per_channel.dequantize()[0, 4:].tolist() == [0.5, 0.0, 0.0, 0.5]
    assert per_group.dequantize()[0, 4:].tolist() == pytest.approx([0.4, 0.1, 0.2, 0.3], abs=1e-3)


@pytest.mark.parametrize("grid", [QuantGrid(4, True, 4), QuantGrid(8, True, 4), QuantGrid(3, False, 4)])
def test_an_all_zero_group_gets_scale_one_and_reads_back_zero(grid):
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 3.0, 0.5]])
    quantized = quantize_codes(weight, grid)
    assert quantized.scale[0, 0].item() == 1.0
    assert quantized.codes[0, :4].tolist() == [quantized.zero[0, 0].item()] * 4
    values = quantized.dequantize()
    assert torch.isfinite(values).all() and values[0, :4].tolist() == [0.0] * 4


def test_scales_are_stored_in_float16_and_values_read_back_with_them():
    weight = torch.tensor([[1.0, -0.3, 0.7, 0.01]])
    quantized = quantize_codes(weight, QuantGrid(bits=8, sym=True))
    assert quantized.scale.dtype == torch.float16 and quantized.codes.dtype == torch.uint8
    stored = torch.tensor(1.0 / 127).half()
    assert quantized.scale.item() == stored.item() != 1.0 / 127
    assert quantized.codes.tolist() == [[255, 90, 217, 129]]
    expected = stored.float() * (quantized.codes.float() - 128)
    assert torch.equal(quantized.dequantize(), expected)
    assert quantized.dequantize()[0, 0].item() != 1.0  # the float16 scale, not the exact one


def test_group_size_must_divide_the_input_dimension():
    with pytest.raises(ValueError, match="group size 48 does not divide the input dimension 64"):
        quantize_codes(torch.randn(4, 64), QuantGrid(group_size=48))
    with pytest.raises(ValueError, match=r"bits must be in 2\.\.8"):
        QuantGrid(bits=9)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="group size must be a positive number"):
            QuantGrid(group_size=bad)


# --- ggml's legacy types, transcribed from ggml-quants.c (quantize_row_q4_0_ref, quantize_row_q8_0_ref) -------------


def _ggml_q4_0(block: np.ndarray) -> tuple[np.float16, list[int]]:
    amax, vmax = np.float32(0), np.float32(0)
    for v in block:
        if amax < abs(v):  # strict: the first of equal magnitudes
            amax, vmax = abs(v), v
    d = np.float32(vmax / np.float32(-8))
    inv = np.float32(np.float32(1) / d) if d else np.float32(0)
    # MIN(15, (int8_t)(x*id + 8.5f)): float32 product and sum, truncation toward zero
    return np.float16(d), [min(15, int(np.float32(np.float32(x * inv) + np.float32(8.5)))) for x in block]


def _ggml_q8_0(block: np.ndarray) -> tuple[np.float16, list[int]]:
    amax = np.float32(max(abs(v) for v in block))
    d = np.float32(amax / np.float32(127))
    inv = np.float32(np.float32(1) / d) if d else np.float32(0)
    roundf = [math.copysign(math.floor(abs(float(np.float32(x * inv))) + 0.5), float(x)) for x in block]
    return np.float16(d), [int(q) for q in roundf]


def _ggml_blocks() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 32 * 8, generator=generator) * torch.logspace(-4, 1, 64).unsqueeze(1)
    heavy = torch.distributions.StudentT(2.0).sample((32, 32 * 8))
    below_half = float(np.nextafter(np.float32(0.5), np.float32(0)))  # ⌊x + ½⌋ in float32 gives 1, roundf 0
    below_six_and_half = float(np.nextafter(np.float32(6.5), np.float32(0)))  # x + 8.5 rounds up to 15 in float32
    ties = torch.tensor(
        [
            [-8.0, 8.0, 2.5, -2.5, 0.5, -0.5, 7.5, below_six_and_half] * 4,  # Q4_0 with d = 1
            [127.0, -127.0, 2.5, -2.5, below_half, -below_half, 126.5, -126.5] * 4,
        ]
    )  # Q8_0, d = 1
    return normal, heavy.float(), ties.repeat(1, 8)


@pytest.mark.parametrize(("bits", "reference", "offset"), [(4, _ggml_q4_0, 0), (8, _ggml_q8_0, 128)])
def test_symmetric_groups_of_32_are_ggml_q4_0_and_q8_0_exactly(bits, reference, offset):
    for weight in _ggml_blocks():
        quantized = quantize_codes(weight, QuantGrid(bits=bits, sym=True, group_size=32))
        blocks = weight.numpy().reshape(-1, 32)
        expected = [reference(block) for block in blocks]
        scales = np.array([scale for scale, _ in expected], dtype=np.float16)
        codes = np.array([block for _, block in expected]) + offset
        assert np.array_equal(quantized.scale.numpy().reshape(-1), scales)
        assert np.array_equal(quantized.codes.numpy().reshape(-1, 32), codes)
        # and the values read back are ggml's dequantize_row: d16 · (q − z)
        dequantized = scales.astype(np.float32)[:, None] * (codes - quantized.zero[0, 0].item()).astype(np.float32)
        assert np.array_equal(quantized.dequantize().numpy().reshape(-1, 32), dequantized)


def test_rerounding_dequantized_values_with_the_stored_parameters_gives_the_same_codes():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    for grid in (QuantGrid(3, True, 16), QuantGrid(4, False, 32), QuantGrid(8, True, None)):
        quantized = quantize_codes(weight, grid)
        groups = grid.group_view(quantized.dequantize())
        again = encode(groups, quantized.scale.float().unsqueeze(-1), quantized.zero.float().unsqueeze(-1), grid)
        assert torch.equal(again.reshape(weight.shape).to(torch.uint8), quantized.codes)
        assert torch.equal(decode(again, quantized.scale.unsqueeze(-1), quantized.zero.unsqueeze(-1)), groups)


def test_straight_through_estimator_has_an_identity_gradient():
    grid = QuantGrid(bits=3, sym=False, group_size=8)
    weight = torch.randn(4, 16, requires_grad=True)
    output = fake_quantize_ste(weight, grid)
    assert torch.equal(output, fake_quantize(weight.detach(), grid))
    assert not torch.equal(output, weight)
    upstream = torch.randn(4, 16)
    (output * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)


def test_fake_quantize_keeps_the_dtype():
    weight = torch.randn(4, 32).to(torch.bfloat16)
    assert fake_quantize(weight, QuantGrid(bits=4, group_size=32)).dtype == torch.bfloat16
