"""The linear algebra of the `lowrank` stage: which rank, truncated SVD of a weight, and EoRA's eigenspace SVD of a
compression error. Pure functions on tensors; everything is computed in float64 and returned in float64.

- Truncated SVD (Eckart–Young–Mirsky): the best rank-r approximation of W in Frobenius norm keeps the r largest
  singular values, and its squared error is the sum of the others squared.
- EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank
  Approximation", arXiv:2410.21271; reference code NVlabs/EoRA and GPTQModel's ``eora_compute_lora``): the error
  ΔW = W − Ŵ of a compressed weight Ŵ is approximated where the activations live. With C = XᵀX = QΛQᵀ, the SVD of
  ΔW' = ΔW·QΛ^½ ≈ U_r S_r V_rᵀ gives B = U_r S_r, A = V_rᵀΛ^-½Qᵀ, which minimises ‖(ΔW − BA)Xᵀ‖_F over rank r
  (‖MXᵀ‖² = tr(M C Mᵀ) = ‖MQΛ^½‖²) rather than ‖ΔW − BA‖_F.
"""

from __future__ import annotations

import math

import torch

# Eigenvalues of XᵀX below this fraction of the largest are numerically zero (float32-accumulated statistics):
# they are raised to it so that QΛ^½ stays invertible; the directions they stand for carry no activation energy.
EIGENVALUE_FLOOR = 1e-10


def rank_from_options(
    singular_values: torch.Tensor | None,
    full_rank: int,
    rank: int | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
) -> int:
    """The rank asked for: an explicit `rank`, a fraction `rank_ratio` of `full_rank` (at least 1), or the fewest
    leading singular values holding `energy` of the squared Frobenius norm (needs `singular_values`)."""
    if rank is not None:
        return rank
    if rank_ratio is not None:
        return max(1, math.floor(rank_ratio * full_rank + 0.5))
    if energy is None or singular_values is None:
        raise ValueError("give a rank, a rank_ratio, or an energy with the singular values")
    return energy_rank(singular_values, energy)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r with Σ_{i≤r} s_i² ≥ energy · Σ_i s_i² (singular values in descending order)."""
    squares = singular_values.double() ** 2
    kept = torch.cumsum(squares, dim=0)
    # a relative slack of 1e-12 lets energy = 1.0 (and exact fractions) land on the rank that reaches it
    needed = energy * float(kept[-1]) * (1 - 1e-12)
    return min(int(torch.searchsorted(kept, torch.tensor(needed, dtype=kept.dtype))) + 1, len(squares))


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight.detach().double())


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rank, in] and B [out, rank] with BA the best rank-`rank` approximation of `weight` [out, in].

    The singular values are split evenly (B = U_r S_r^½, A = S_r^½ V_rᵀ), so both factors have the same scale:
    neither overflows a half-precision dtype first, and fine-tuning updates both at the same rate.
    """
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def eigenspace_root(covariance: torch.Tensor) -> torch.Tensor:
    """QΛ^½ of a symmetric positive semi-definite C = QΛQᵀ, eigenvalues floored (float64 eigh)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.detach().double())
    floor = max(float(eigenvalues.max()) * EIGENVALUE_FLOOR, torch.finfo(torch.float64).tiny)
    return eigenvectors * eigenvalues.clamp(min=floor).sqrt()


def eora_factors(delta: torch.Tensor, covariance: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA's A [rank, in] and B [out, rank] for the compression error `delta` = W − Ŵ [out, in] and the inputs'
    covariance C ∝ XᵀX [in, in] (any positive scale: it does not change the factors).

    With ΔW' = ΔW·QΛ^½ = U S Vᵀ, the paper's factors multiply out to
    BA = U_r S_r V_rᵀ Λ^-½Qᵀ = U_r U_rᵀ ΔW' Λ^-½Qᵀ = U_r U_rᵀ ΔW,
    the projection of ΔW onto the r leading left singular vectors of ΔW'. We return that form, B = U_r and
    A = U_rᵀΔW: the same product, without multiplying by Λ^-½ (which would amplify the rounding of tiny floored
    eigenvalues), and both factors bounded by ΔW's scale (B is orthonormal), which suits their float16 storage.
    """
    delta = delta.detach().double()
    u, _, _ = torch.linalg.svd(delta @ eigenspace_root(covariance), full_matrices=False)
    basis = u[:, :rank]
    return basis.T @ delta, basis


def output_error(delta: torch.Tensor, covariance: torch.Tensor) -> float:
    """tr(ΔW C ΔWᵀ) = ‖ΔW Xᵀ‖_F² for C = XᵀX: the squared error ΔW causes in the outputs (float64)."""
    delta = delta.detach().double()
    return float(((delta @ covariance.detach().double()) * delta).sum())
