"""The inverse-Hessian factor computed in place (one working copy, column-major) against the copy-per-step version
it replaced: the same float operations, so the same bits."""

import pytest
import torch

from slimlm.hessian import inverse_hessian_factor
from slimlm.quantize.gptq import GPTQ
from slimlm.quantize.grid import QuantGrid


def _copying_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float | None]:
    """The previous implementation, a new matrix at every step: H + λI, reversed, its lower Cholesky factor,
    reversed back (R), and U = R⁻¹ solved against a fresh identity."""
    size = hessian.shape[0]
    eye = torch.eye(size)
    mean_diagonal = hessian.diagonal().mean()
    if torch.isfinite(hessian).all() and mean_diagonal > 0:
        for attempt in range(6):
            relative = damp * 10**attempt
            reversed_lower, info = torch.linalg.cholesky_ex((hessian + relative * mean_diagonal * eye).flip(0, 1))
            if info.item() != 0:
                continue
            upper = torch.linalg.solve_triangular(reversed_lower.flip(0, 1), eye, upper=True)
            if torch.isfinite(upper).all():
                return upper, relative
    return eye, None


def _hessian(columns: int, seed: int, tokens: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 0.5, columns)
    inputs = torch.randn(tokens, columns, generator=generator) @ (
        torch.randn(columns, columns, generator=generator) * scales
    )
    return 2 * inputs.T @ inputs / tokens


@pytest.mark.parametrize("columns", [48, 200, 576])
def test_the_in_place_factor_is_bit_identical_to_the_copying_one_and_leaves_h_alone(columns):
    hessian = _hessian(columns, seed=columns)
    before = hessian.clone()
    upper, used = inverse_hessian_factor(hessian, 0.01)
    expected, expected_used = _copying_factor(hessian, 0.01)
    assert used == expected_used == 0.01
    assert torch.equal(upper, expected)
    assert torch.equal(hessian, before)


def test_escalated_damping_restarts_from_the_undamped_hessian():
    # rank 4 of 64, scaled up: 1e-9 relative damping fails, the retries must each damp H once, not cumulatively
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(64, 4, generator=generator)
    hessian = low_rank @ low_rank.T * 1e3
    upper, used = inverse_hessian_factor(hessian, 1e-9)
    expected, expected_used = _copying_factor(hessian, 1e-9)
    assert used == expected_used and used > 1e-9
    assert torch.equal(upper, expected)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_restores_the_diagonal_it_changes_for_dead_inputs(act_order):
    hessian = _hessian(64, seed=1)
    hessian[5, :] = hessian[:, 5] = 0  # an input that was always zero
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    before = hessian.clone()
    solver = GPTQ(weight, hessian, QuantGrid(4, True, 16), act_order=act_order)
    assert solver.dead_inputs == [1]
    assert torch.equal(hessian, before)  # not copied, but given back as it came
    # the same solve as on copies already prepared as the solver prepares its own: unit diagonal, weights zeroed
    prepared, zeroed = hessian.clone(), weight.clone()
    prepared[5, 5], zeroed[:, 5] = 1, 0
    again = GPTQ(zeroed, prepared, QuantGrid(4, True, 16), act_order=act_order)
    assert torch.equal(solver.hinv, again.hinv)
    assert torch.equal(solver.quantize().codes, again.quantize().codes)
