"""Pruning masks from importance scores: unstructured (per row or per matrix) and N:M."""

from __future__ import annotations

import torch


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """True where a weight is kept: the lowest-scoring `sparsity` fraction is dropped.

    `per_row` compares weights within each output row (Wanda); otherwise across the whole matrix (magnitude).
    """
    if sparsity <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        drop = int(scores.shape[1] * sparsity)
        order = torch.argsort(scores, dim=1)[:, :drop]
        mask = torch.ones_like(scores, dtype=torch.bool)
        return mask.scatter_(1, order, False)
    drop = int(scores.numel() * sparsity)
    order = torch.argsort(scores.flatten())[:drop]
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order] = False
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where kept: in every run of `m` consecutive input weights of a row, the `n` highest are kept."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"input dimension {cols} is not a multiple of M={m}")
    blocks = scores.reshape(rows, cols // m, m)
    drop = torch.argsort(blocks, dim=2)[..., : m - n]
    mask = torch.ones_like(blocks, dtype=torch.bool).scatter_(2, drop, False)
    return mask.reshape(rows, cols)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): 2 of every 4 consecutive weights are kept (NVIDIA's sparse tensor-core pattern)."""
    if pattern == "unstructured":
        return None
    n, m = (int(part) for part in pattern.split(":"))
    return n, m
