"""The linear algebra of the lowrank stage, on synthetic matrices (float64 references)."""

import pytest
import torch
from torch import nn

from slimlm.lowrank.factorize import eora_factors, output_error, rank_from_options, singular_values, svd_factors
from slimlm.lowrank.layers import CompensatedLinear, LowRankLinear, effective_weight
from slimlm.quantize.grid import QuantGrid, fake_quantize


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_singular_values(values: list[float], out_features: int, in_features: int) -> torch.Tensor:
    """A float64 matrix [out, in] whose singular values are exactly `values` (then zeros)."""
    u, _ = torch.linalg.qr(torch.randn(out_features, len(values), generator=_generator(1), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, len(values), generator=_generator(2), dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def test_full_rank_svd_reproduces_the_linear():
    linear = nn.Linear(24, 40)
    nn.init.normal_(linear.weight, generator=_generator(3))
    nn.init.normal_(linear.bias, generator=_generator(4))
    a, b = svd_factors(linear.weight, 24)
    factors = LowRankLinear.from_factors(a, b, linear.bias, torch.float32)
    x = torch.randn(5, 24, generator=_generator(5))
    torch.testing.assert_close(factors(x), linear(x), rtol=1e-5, atol=1e-5)
    assert factors.a.weight.shape == (24, 24) and factors.b.weight.shape == (40, 24)
    assert torch.equal(factors.b.bias, linear.bias) and factors.a.bias is None


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_truncated_svd_error_is_the_tail_of_the_singular_values(rank):
    """Eckart–Young: ‖W − BA‖_F² = Σ_{i>r} s_i², and no rank-r matrix does better than that."""
    weight = torch.randn(30, 20, generator=_generator(6), dtype=torch.float64)
    s = torch.linalg.svdvals(weight)
    a, b = svd_factors(weight, rank)
    assert a.shape == (rank, 20) and b.shape == (30, rank)
    error = torch.linalg.matrix_norm(weight - b @ a) ** 2
    torch.testing.assert_close(error, (s[rank:] ** 2).sum(), rtol=1e-10, atol=1e-12)
    assert torch.linalg.matrix_rank(b @ a) == rank


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (0.53, 1), (0.54, 2), (0.8, 2), (0.84, 3), (0.97, 4), (1.0, 4)])
def test_energy_keeps_the_fewest_singular_values_holding_that_fraction(energy, rank):
    weight = _with_singular_values([4.0, 3.0, 2.0, 1.0], 10, 8)  # squares 16, 9, 4, 1: cumulative 16/30, 25/30, 29/30
    assert rank_from_options(singular_values(weight), 8, energy=energy) == rank


def test_rank_ratio_is_a_fraction_of_the_full_rank():
    assert rank_from_options(None, 64, rank_ratio=0.5) == 32
    assert rank_from_options(None, 64, rank_ratio=1.0) == 64
    assert rank_from_options(None, 64, rank_ratio=0.001) == 1
    assert rank_from_options(None, 64, rank=7) == 7


def _correlated_inputs(tokens: int, features: int) -> torch.Tensor:
    """Activations with a strongly anisotropic covariance: a few directions carry most of the energy, and they are
    not the coordinate axes."""
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=_generator(7), dtype=torch.float64))
    scales = torch.logspace(1, -2, features, dtype=torch.float64)
    return torch.randn(tokens, features, generator=_generator(8), dtype=torch.float64) * scales @ basis.T


def _quantization_error(out_features: int = 48, in_features: int = 64) -> torch.Tensor:
    weight = torch.randn(out_features, in_features, generator=_generator(9))
    return (weight - fake_quantize(weight, QuantGrid(bits=3, sym=True, group_size=16))).double()


def _output_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm((delta - b @ a) @ inputs.T))


@pytest.mark.parametrize("rank", [4, 16])
def test_eora_beats_plain_svd_of_the_error_on_the_outputs(rank):
    delta, inputs = _quantization_error(), _correlated_inputs(2048, 64)
    covariance = inputs.T @ inputs
    eora = _output_error(delta, *eora_factors(delta, covariance, rank), inputs)
    plain = _output_error(delta, *svd_factors(delta, rank), inputs)
    untouched = float(torch.linalg.matrix_norm(delta @ inputs.T))
    assert eora < 0.8 * plain < 0.8 * untouched
    # and it is the best any rank-r correction can do: the tail of the singular values of ΔW·Xᵀ
    tail = torch.linalg.svdvals(delta @ inputs.T)[rank:]
    assert eora == pytest.approx(float(tail.square().sum().sqrt()), rel=1e-8)
    assert output_error(delta, covariance) == pytest.approx(untouched**2, rel=1e-10)


def test_eora_at_full_rank_removes_the_error():
    for out_features, in_features in [(48, 64), (64, 48)]:
        delta, inputs = _quantization_error(out_features, in_features), _correlated_inputs(512, in_features)
        a, b = eora_factors(delta, inputs.T @ inputs, min(out_features, in_features))
        assert _output_error(delta, a, b, inputs) < 1e-9 * float(torch.linalg.matrix_norm(delta @ inputs.T))


def test_eora_factors_multiply_out_to_the_papers():
    """B = U_r S_r, A = V_rᵀ Λ^-½ Qᵀ (Liu et al. 2024) and our B = U_r, A = U_rᵀΔW have the same product."""
    delta, inputs = _quantization_error(), _correlated_inputs(2048, 64)
    covariance = inputs.T @ inputs
    eigenvalues, q = torch.linalg.eigh(covariance)
    u, s, vh = torch.linalg.svd(delta @ q @ torch.diag(eigenvalues.sqrt()), full_matrices=False)
    paper_b, paper_a = u[:, :8] * s[:8], vh[:8] @ torch.diag(eigenvalues.rsqrt()) @ q.T
    a, b = eora_factors(delta, covariance, 8)
    torch.testing.assert_close(b @ a, paper_b @ paper_a, rtol=1e-7, atol=1e-9)


def test_eora_survives_a_singular_covariance():
    delta = _quantization_error()
    inputs = _correlated_inputs(2048, 64)
    inputs[:, 10:] = 0  # only 10 input channels ever active: XᵀX has rank 10
    a, b = eora_factors(delta, inputs.T @ inputs, 8)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert _output_error(delta, a, b, inputs) < _output_error(delta, *svd_factors(delta, 8), inputs)


def test_compensated_linear_applies_the_float16_factors_beside_the_base():
    base = nn.Linear(64, 48)
    a, b = torch.randn(6, 64, generator=_generator(10)), torch.randn(48, 6, generator=_generator(11))
    wrapped = CompensatedLinear(base, a, b)
    assert wrapped.a.dtype == wrapped.b.dtype == torch.float16
    x = torch.randn(3, 7, 64, generator=_generator(12))
    expected = base(x) + x @ wrapped.a.float().T @ wrapped.b.float().T
    torch.testing.assert_close(wrapped(x), expected)
    dense = effective_weight(base) + wrapped.b.float() @ wrapped.a.float()
    torch.testing.assert_close(effective_weight(wrapped), dense)
    torch.testing.assert_close(
        nn.functional.linear(x, effective_weight(wrapped), base.bias), wrapped(x), rtol=1e-4, atol=1e-4
    )
