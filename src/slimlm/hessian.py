"""The inverse-Hessian bookkeeping shared by the OBS-style solvers (SparseGPT, GPTQ).

Both minimise the layer-wise error ‖WX − ŴX‖² one column at a time, spreading each column's error over the columns
not yet visited through the upper Cholesky factor of (H + λI)⁻¹, H = 2/n·XᵀX (Frantar & Alistarh 2022, "Optimal
Brain Compression"; Frantar et al. 2023, "GPTQ"). What can go wrong is the same for both: inputs that were always
zero make H singular, and a float32 factorization can fail; this module handles both the way IST-DASLab's
reference implementations do, and says so in the report.
"""

from __future__ import annotations

import torch

# Cholesky attempts before giving up on compensation: damping grows tenfold each time (0.01 → 1000 × mean diag H).
_DAMPING_ATTEMPTS = 6


def drop_dead_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> int:
    """Inputs that were always zero on the calibration data leave H singular: give them a unit diagonal (their factor
    row then updates nothing else) and zero their weights (they never affected the output on that data), as the
    reference does. Modifies both tensors in place; returns how many inputs were dead."""
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    return int(dead.sum())


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float | None]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so U[i, i:] are the OBS update rows), with λ = damp·mean(diag H).

    If either factorization fails (H is singular or ill-conditioned in float32), λ grows tenfold and we try again.
    Returns U and the relative damping that worked, or an identity factor and None when none did (non-finite
    statistics): with a diagonal factor the updates vanish and the solver degrades to its uncompensated rule
    (magnitude pruning, round-to-nearest). `hessian` is not modified.

    Memory: besides `hessian`, two matrices of its size at most (a 7B down_proj's are 11008² float32, 485 MB each):
    the damped copy is factorized in place and then overwritten by U (column-major, LAPACK's layout, so that neither
    call copies), plus the reversed factor the triangular solve reads.
    """
    size = hessian.shape[0]
    mean_diagonal = hessian.diagonal().mean()
    if torch.isfinite(hessian).all() and mean_diagonal > 0:
        for attempt in range(_DAMPING_ATTEMPTS):
            relative = damp * 10**attempt
            # H = R·Rᵀ with R upper triangular (the lower factor of H with rows and columns reversed, reversed back);
            # then H⁻¹ = R⁻ᵀ·R⁻¹ and U = R⁻¹ is its upper Cholesky factor: one factorization and one triangular
            # solve, instead of inverting H and factorizing the inverse (torch.cholesky_inverse is slow on CPU).
            work = _reversed_column_major(hessian)
            work.diagonal().add_(relative * mean_diagonal)  # H + λI, reversed (λ is the same on every diagonal entry)
            _, info = torch.linalg.cholesky_ex(work, out=(work, torch.empty((), dtype=torch.int32)))
            if info.item() != 0:
                continue
            upper_factor = work.flip(0, 1)  # R
            work.zero_().diagonal().fill_(1)  # the identity, solved in place into U = R⁻¹
            torch.linalg.solve_triangular(upper_factor, work, upper=True, out=work)
            del upper_factor
            if torch.isfinite(work).all():
                return work, relative
    return torch.eye(size, dtype=hessian.dtype, device=hessian.device), None


def _reversed_column_major(matrix: torch.Tensor) -> torch.Tensor:
    """A copy of `matrix` with rows and columns reversed, stored column-major (as LAPACK wants it: the factorization
    and the solve then run in place, and the reversed factor R comes out column-major as the solve has always had
    it, which keeps U bit for bit what it was)."""
    reversed_copy = torch.empty_like(matrix).mT
    reversed_copy.copy_(matrix.flip(0, 1))
    return reversed_copy


def conditioning_notes(name: str, dead_inputs: int, damp_used: float | None, damp: float, fallback: str) -> list[str]:
    """What the report should know about a matrix whose Hessian was not well-behaved; `fallback` says what the
    solver did without a usable factor (e.g. "pruned by magnitude")."""
    notes = []
    if dead_inputs:
        notes.append(f"{name} had {dead_inputs} inputs always zero on the calibration data (weights zeroed)")
    if damp_used is None:
        notes.append(f"{name}: no usable Hessian, {fallback} without compensation")
    elif damp_used > damp:
        notes.append(f"{name}: damping raised to {damp_used:g} for a stable Cholesky factorization")
    return notes
