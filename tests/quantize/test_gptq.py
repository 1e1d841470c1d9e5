import pytest
import torch

from reference_gptq import ReferenceGPTQ
from slimlm.quantize.gptq import GPTQ, GPTQOptions, stacked_solve
from slimlm.quantize.grid import QuantGrid, decode, encode, grid_params, quantize_codes


def _hessian(inputs: torch.Tensor) -> torch.Tensor:
    return 2 * inputs.T @ inputs / inputs.shape[0]


def _correlated_problem(seed: int = 0, tokens: int = 512, columns: int = 64, rows: int = 48):
    """Inputs X = Z·A with correlated channels of uneven scale (as activations are), and a weight to quantize."""
    generator = torch.Generator().manual_seed(seed)
    channel_scales = torch.logspace(-1, 0.5, columns)[torch.randperm(columns, generator=generator)]
    mixing = torch.randn(columns, columns, generator=generator) * channel_scales
    inputs = torch.randn(tokens, columns, generator=generator) @ mixing
    weight = torch.randn(rows, columns, generator=generator) * 0.05
    return inputs, weight


def _output_error(inputs, weight, quantized) -> float:
    return (inputs @ (weight - quantized).T).norm().item()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [16, None])
def test_gptq_reconstructs_the_outputs_better_than_round_to_nearest(bits, act_order, group_size):
    inputs, weight = _correlated_problem()
    grid = QuantGrid(bits, sym=True, group_size=group_size)
    gptq = GPTQ(weight, _hessian(inputs), grid, act_order=act_order).quantize(blocksize=32).dequantize()
    rtn = quantize_codes(weight, grid).dequantize()
    ours, baseline = _output_error(inputs, weight, gptq), _output_error(inputs, weight, rtn)
    # act_order quantizes the largest inputs first, while the most columns remain to absorb their error
    assert ours < (0.7 if act_order else 0.85) * baseline, (ours, baseline)


@pytest.mark.parametrize(
    "grid", [QuantGrid(4, True, 16), QuantGrid(3, False, 32), QuantGrid(4, False, None), QuantGrid(8, True, 16)]
)
@pytest.mark.parametrize("act_order", [False, True])
def test_the_result_lies_exactly_on_the_stored_grid(grid, act_order):
    inputs, weight = _correlated_problem(seed=1)
    quantized = GPTQ(weight, _hessian(inputs), grid, act_order=act_order).quantize(blocksize=24)
    values = grid.group_view(quantized.dequantize())
    scale, zero = quantized.scale.unsqueeze(-1), quantized.zero.unsqueeze(-1)
    # one scale and zero point per original group of columns describe every value: re-rounding changes nothing
    again = encode(values, scale.float(), zero.float(), grid)
    assert torch.equal(again.reshape(weight.shape).to(torch.uint8), quantized.codes)
    assert torch.equal(decode(again, scale, zero), values)
    assert torch.isfinite(values).all() and int(quantized.codes.max()) <= grid.max_code


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid", [QuantGrid(4, True, 16), QuantGrid(3, False, None)])
def test_a_diagonal_hessian_leaves_nothing_to_compensate_so_gptq_is_round_to_nearest(act_order, grid):
    # uneven diagonal: act_order really permutes the columns, and the codes must still land in their original place
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    hessian = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.1)
    quantized = GPTQ(weight, hessian, grid, act_order=act_order).quantize(blocksize=24)
    expected = quantize_codes(weight, grid)
    assert torch.equal(quantized.codes, expected.codes)
    assert torch.equal(quantized.scale, expected.scale) and torch.equal(quantized.zero, expected.zero)


def test_groups_starting_inside_a_block_see_the_updates_made_so_far():
    # blocks of 64 hold four groups of 16; cutting them per group must give the same parameters and codes
    # (up to float rounding): both see the up-to-date weights when a group starts
    inputs, weight = _correlated_problem(seed=4)
    grid = QuantGrid(4, True, 16)
    whole = GPTQ(weight, _hessian(inputs), grid).quantize(blocksize=64)
    per_group = GPTQ(weight, _hessian(inputs), grid).quantize(blocksize=16)
    assert torch.allclose(whole.scale.float(), per_group.scale.float(), rtol=2e-3)
    assert (whole.codes != per_group.codes).float().mean() < 0.01
    # blocks of 24 are cut back to 16 so that no group straddles a block end: the very same computation
    straddling = GPTQ(weight, _hessian(inputs), grid).quantize(blocksize=24)
    assert torch.equal(straddling.codes, per_group.codes) and torch.equal(straddling.scale, per_group.scale)


def test_a_singular_hessian_with_a_dead_input_gives_finite_weights():
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(8, 64, generator=generator)  # 8 tokens for 64 inputs: H has rank 8
    inputs[:, 5] = 0
    weight = torch.randn(32, 64, generator=generator)
    for act_order in (False, True):
        solver = GPTQ(weight, _hessian(inputs), QuantGrid(4, True, 16), act_order=act_order)
        values = solver.quantize(blocksize=16).dequantize()
        assert solver.dead_inputs == [1] and solver.damp_used[0] is not None
        assert torch.isfinite(values).all() and (values[:, 5] == 0).all()


def test_non_finite_statistics_fall_back_to_round_to_nearest():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(6))
    broken = torch.eye(32)
    broken[3, 3] = float("nan")
    solver = GPTQ(weight, broken, QuantGrid(4, True, 16))
    quantized = solver.quantize()
    assert solver.damp_used == [None]
    assert torch.equal(quantized.codes, quantize_codes(weight, QuantGrid(4, True, 16)).codes)


def test_the_arguments_are_not_modified():
    inputs, weight = _correlated_problem(seed=7)
    hessian = _hessian(inputs)
    weight_before, hessian_before = weight.clone(), hessian.clone()
    GPTQ(weight, hessian, QuantGrid(4, True, 16), act_order=True).quantize()
    assert torch.equal(weight, weight_before) and torch.equal(hessian, hessian_before)


def _textbook_gptq(weight, hessian, grid, damp=0.01):
    """The OBS column loop written the slow, obvious way (float64, the full inverse Hessian downdated after every
    column, no Cholesky, no blocks), for one scale per output channel."""
    weight = weight.double().clone()
    hessian = hessian.double()
    hinv = torch.linalg.inv(hessian + damp * hessian.diagonal().mean() * torch.eye(hessian.shape[0]))
    scale, zero = grid_params(weight, grid)
    for i in range(weight.shape[1]):
        rounded = decode(encode(weight[:, i], scale, zero, grid), scale, zero).double()
        weight[:, i:] -= torch.outer((weight[:, i] - rounded) / hinv[i, i], hinv[i, i:])
        weight[:, i] = rounded
        hinv -= torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]  # column i is now fixed: drop it from H
    return weight.float()


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_matches_the_textbook_obs_loop(bits):
    inputs, weight = _correlated_problem(seed=8)
    grid = QuantGrid(bits, sym=False, group_size=None)
    ours = GPTQ(weight, _hessian(inputs), grid).quantize(blocksize=16).dequantize()
    textbook = _textbook_gptq(weight, _hessian(inputs), grid)
    assert (ours != textbook).float().mean() < 0.01
    assert _output_error(inputs, weight, ours) == pytest.approx(_output_error(inputs, weight, textbook), rel=0.01)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid", [QuantGrid(4, True, 16), QuantGrid(3, False, None), QuantGrid(8, True, 32)])
def test_the_solver_matches_the_previous_per_matrix_solver(grid, act_order):
    """The batched column loop and the triangular-solve factor change float rounding only: the codes agree with the
    previous solver (tests/quantize/reference_gptq.py) on all but a few near-ties, the weights to float32 rounding."""
    inputs, weight = _correlated_problem(seed=9, tokens=1024, rows=96)
    new = GPTQ(weight, _hessian(inputs), grid, act_order=act_order).quantize(blocksize=32)
    old = ReferenceGPTQ(weight, _hessian(inputs), grid, act_order=act_order).quantize(blocksize=32)
    assert (new.codes != old.codes).float().mean() <= 1e-3
    torch.testing.assert_close(new.scale, old.scale, rtol=1e-3, atol=0)
    assert _output_error(inputs, weight, new.dequantize()) == pytest.approx(
        _output_error(inputs, weight, old.dequantize()), rel=1e-3
    )


def test_matrices_sharing_a_hessian_are_solved_as_one_stack_of_rows():
    inputs, weight = _correlated_problem(seed=10, rows=48)
    grid, options = QuantGrid(4, True, 16), GPTQOptions(method="gptq", blocksize=16, group_size=16)
    parts, _ = stacked_solve([weight[:32], weight[32:]], _hessian(inputs), grid, options)
    for part, rows in zip(parts, (weight[:32], weight[32:]), strict=True):
        alone = GPTQ(rows, _hessian(inputs), grid).quantize(blocksize=16)
        assert part.codes.shape == rows.shape
        assert (part.codes != alone.codes).float().mean() <= 1e-3  # rows are independent given H
        torch.testing.assert_close(part.dequantize(), alone.dequantize(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_a_stack_with_its_own_hessian_each_equals_separate_solves(act_order):
    problems = [_correlated_problem(seed=11 + i, rows=16) for i in range(3)]
    weights = torch.stack([w for _, w in problems])
    hessians = torch.stack([_hessian(x) for x, _ in problems])
    grid = QuantGrid(4, True, 16)
    stacked = GPTQ(weights, hessians, grid, act_order=act_order).quantize_stack(blocksize=16)
    for part, weight, hessian in zip(stacked, weights, hessians, strict=True):
        alone = ReferenceGPTQ(weight, hessian, grid, act_order=act_order).quantize(blocksize=16)
        assert (part.codes != alone.codes).float().mean() <= 1e-3
