"""The GPTQ solver as it was before the batched column loop (commit 1449219..aa9128d): one matrix at a time, the
inverse Hessian factor through torch.cholesky_inverse. Kept as the reference the faster solver is checked against."""

from __future__ import annotations

import torch

from slimlm.hessian import drop_dead_inputs
from slimlm.quantize.grid import QuantGrid, QuantizedWeight, decode, encode, grid_params


class ReferenceGPTQ:
    """Quantizes one weight matrix [rows, columns] onto `grid` given the Hessian H = 2/n·XᵀX of its inputs.

    ``GPTQ(weight, hessian, grid, damp=0.01, act_order=False).quantize(blocksize=128)`` returns a QuantizedWeight
    whose dequantized values are the GPTQ solution. The arguments are not modified.
    """

    def __init__(
        self, weight: torch.Tensor, hessian: torch.Tensor, grid: QuantGrid, damp: float = 0.01, act_order: bool = False
    ):
        self.grid = grid
        self.weight = weight.detach().float().clone()
        hessian = hessian.detach().float().clone()
        columns = self.weight.shape[1]
        self.width = grid.group_width(columns)
        self.dead_inputs = drop_dead_inputs(self.weight, hessian)
        # visiting order: the inputs with the largest (squared) activations first, while most columns remain to
        # absorb their error
        order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(columns)
        self.order = order.to(self.weight.device)
        self.column_order = self.order.tolist()  # for the column loop, without a device sync per column
        self.hinv, self.damp_used = _inverse_hessian_factor(hessian[self.order][:, self.order], damp)
        # static parameters (act_order, or one group per row) from the original weights; else set as groups start
        self.static = act_order or self.width == columns
        groups = grid.group_view(self.weight)
        if self.static:
            self.scale, self.zero = grid_params(groups, grid)
        else:
            self.scale = torch.ones(groups.shape[:2], device=self.weight.device)
            self.zero = torch.zeros_like(self.scale)

    def quantize(self, blocksize: int = 128) -> QuantizedWeight:
        weight = self.weight[:, self.order]  # a permuted copy, updated in place
        codes = torch.zeros_like(weight)
        start = 0
        while start < weight.shape[1]:
            end = self._block_end(start, blocksize, weight.shape[1])
            errors = self._quantize_block(weight, start, end, codes)
            # the block's rounding errors, spread over every column to its right at once (the "lazy batch" update)
            weight[:, end:] -= errors @ self.hinv[start:end, end:]
            start = end
        return QuantizedWeight(codes.to(torch.uint8), self.scale.half(), self.zero.to(torch.uint8), self.grid)

    def _block_end(self, start: int, blocksize: int, columns: int) -> int:
        """End of the block from `start`: cut back to a group boundary when that keeps the block non-empty, so a
        group that starts inside a block ends inside it (see the module docstring)."""
        end = min(start + blocksize, columns)
        if not self.static and end < columns and end // self.width * self.width > start:
            end = end // self.width * self.width
        return end

    def _quantize_block(self, weight: torch.Tensor, start: int, end: int, codes: torch.Tensor) -> torch.Tensor:
        """Round columns [start, end) of the (permuted) weight in place, each after the OBS updates of the ones
        before it; writes their codes (original column order) and returns the scaled errors (w − q)/[H⁻¹]_ii."""
        block, hinv = weight[:, start:end], self.hinv[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = self.column_order[start + i]
            group = column // self.width
            if not self.static and column % self.width == 0:
                self.scale[:, group], self.zero[:, group] = grid_params(
                    weight[:, column : column + self.width], self.grid
                )
            scale, zero = self.scale[:, group], self.zero[:, group]
            codes[:, column] = encode(block[:, i], scale, zero, self.grid)
            rounded = decode(codes[:, column], scale, zero)
            errors[:, i] = (block[:, i] - rounded) / hinv[i, i]
            block[:, i:] -= errors[:, i : i + 1] @ hinv[i : i + 1, i:]
            block[:, i] = rounded  # exactly on the grid (the update above leaves it only up to rounding)
        return errors


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float | None]:
    """The previous slimlm.hessian.inverse_hessian_factor: Cholesky, cholesky_inverse, Cholesky of the inverse."""
    size = hessian.shape[0]
    eye = torch.eye(size, dtype=hessian.dtype, device=hessian.device)
    mean_diagonal = hessian.diagonal().mean()
    if torch.isfinite(hessian).all() and mean_diagonal > 0:
        for attempt in range(6):
            relative = damp * 10**attempt
            lower, info = torch.linalg.cholesky_ex(hessian + relative * mean_diagonal * eye)
            if info.item() != 0:
                continue
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, relative
    return eye, None
