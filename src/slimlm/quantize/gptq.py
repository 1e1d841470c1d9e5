"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Each Linear is quantized to minimise the layer-wise error ‖WX − ŴX‖² rather than weight by weight: columns are
rounded onto the grid left to right and each column's rounding error is spread over the columns not yet rounded
through the inverse Hessian of H = 2/n·XᵀX (the OBS update), in blocks whose updates to the rest of the matrix are
applied at once ("lazy batch"). Follows IST-DASLab/gptq's `fasterquant`, with these choices:

- Group parameters without act_order are computed when the loop reaches a group's first column, from the weights
  as updated so far (as the reference). Blocks are cut at group boundaries so a group starting inside a block ends
  inside it: its parameters then see every update made so far (the reference reads the not yet updated copy when
  a group starts mid-block).
- With act_order (columns visited by descending diag H) the groups stay the original contiguous runs of
  `group_size` columns ("static groups", GPTQModel's static_groups): their parameters are computed before the
  loop from the original weights, so one scale and zero point per original group describe the result exactly.
- True-sequential within a decoder layer: q/k/v are quantized from one Hessian pass, then o_proj sees the outputs
  of the quantized q/k/v, then gate/up, then down_proj those of the quantized gate/up.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from slimlm.calibrate import observe_layer, walk_layers
from slimlm.hessian import conditioning_notes, drop_dead_inputs, inverse_hessian_factor
from slimlm.modules import SEQUENTIAL_SETS, VALUE, layer_linears
from slimlm.quantize.grid import QuantGrid, QuantizedWeight, decode, encode, grid_params
from slimlm.quantize.stage import QuantizeOptions, register_quant_method, store_quantized
from slimlm.quantize.value_hessian import value_hessians


class GPTQOptions(QuantizeOptions):
    act_order: bool = False  # visit columns by descending diag H (with static groups)
    damp: float = Field(0.01, gt=0, lt=1)  # × mean diag(H), added to H's diagonal
    blocksize: int = Field(128, ge=1)  # columns rounded before their errors are spread over the rest at once
    # v_proj's Hessian weighs each token by the attention it receives (quantize/value_hessian.py); False: plain XᵀX
    attention_weighted_v: bool = True


class GPTQ:
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
        self.hinv, self.damp_used = inverse_hessian_factor(hessian[self.order][:, self.order], damp)
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


def gptq_per_head(
    weight: torch.Tensor, hessians: list[torch.Tensor], grid: QuantGrid, damp: float, act_order: bool, blocksize: int
) -> tuple[QuantizedWeight, list[GPTQ]]:
    """GPTQ of a matrix whose row blocks (one per KV head) each have their own Hessian; the blocks' codes, scales
    and zero points stacked back in row order."""
    rows = weight.shape[0] // len(hessians)
    solvers = [
        GPTQ(weight[i * rows : (i + 1) * rows], hessian, grid, damp, act_order) for i, hessian in enumerate(hessians)
    ]
    parts = [solver.quantize(blocksize) for solver in solvers]
    stacked = QuantizedWeight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "zero")), grid)
    return stacked, solvers


@register_quant_method("gptq", GPTQOptions)
@torch.no_grad()
def gptq_quantize(model, options: GPTQOptions, context) -> None:
    """GPTQ of every target Linear, layer by layer, true-sequential within a layer."""
    grid, targets = options.grid(), set(options.layer_targets())
    trouble: list[str] = []
    plain_value: list[int] = []

    def solve(index: int, name: str, linear: nn.Linear, hessian: torch.Tensor, per_head) -> None:
        if per_head is not None:
            quantized, solvers = gptq_per_head(
                linear.weight, per_head, grid, options.damp, options.act_order, options.blocksize
            )
        else:
            solvers = [GPTQ(linear.weight, hessian, grid, options.damp, options.act_order)]
            quantized = solvers[0].quantize(options.blocksize)
        store_quantized(linear, quantized)
        for solver in solvers:
            trouble.extend(
                conditioning_notes(
                    f"layers.{index}.{name}", solver.dead_inputs, solver.damp_used, options.damp, "rounded to nearest"
                )
            )

    def quantize_layer(index: int, layer: nn.Module, inputs) -> None:
        linears = layer_linears(layer)
        for names in SEQUENTIAL_SETS:
            chosen = [name for name in names if name in targets and name in linears]
            if not chosen:
                continue
            stats = observe_layer(layer, inputs, chosen, hessian=True)
            per_head = None
            if VALUE in chosen and options.attention_weighted_v:
                per_head = value_hessians(layer, inputs)
                if per_head is None:
                    plain_value.append(index)
            for name in chosen:
                solve(index, name, linears[name], stats.pop(name).hessian(), per_head if name == VALUE else None)

    walk_layers(model, context.calibration.windows(model, context.notes), quantize_layer, description="gptq")
    weighting = (
        "v_proj's Hessian per KV head, each token weighted by the attention it receives"
        if options.attention_weighted_v
        else "plain XᵀX Hessians for every projection"
    )
    context.notes.append(
        f"gptq: blocksize {options.blocksize}, damping {options.damp} × mean diag(H), act_order "
        f"{'on (static groups)' if options.act_order else 'off'}, true-sequential within each layer; each layer's "
        f"Hessians from the outputs of the already-quantized layers before it; {weighting}"
    )
    if plain_value:
        context.notes.append(f"gptq: layers {plain_value}: attention not recomputable, v_proj used the plain Hessian")
    if trouble:
        context.notes.append(f"gptq: {len(trouble)} matrices needed attention: " + "; ".join(trouble))
