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

from itertools import pairwise

import torch
from pydantic import Field
from torch import nn

from slimlm.calibrate import true_sequential, walk_layers
from slimlm.hessian import conditioning_notes, drop_dead_inputs, inverse_hessian_factor
from slimlm.modules import VALUE, layer_linears
from slimlm.quantize.grid import QuantGrid, QuantizedWeight, encode_scaled, grid_params, inverse_scale
from slimlm.quantize.stage import QuantizeOptions, register_quant_method, store_quantized
from slimlm.value_hessian import value_hessians


class GPTQOptions(QuantizeOptions):
    act_order: bool = False  # visit columns by descending diag H (with static groups)
    damp: float = Field(0.01, gt=0, lt=1)  # × mean diag(H), added to H's diagonal
    blocksize: int = Field(128, ge=1)  # columns rounded before their errors are spread over the rest at once
    # v_proj's Hessian weighs each token by the attention it receives (slimlm/value_hessian.py); False: plain XᵀX
    attention_weighted_v: bool = True


class GPTQ:
    """Quantizes weight matrices onto `grid` given the Hessian H = 2/n·XᵀX of their inputs: one matrix [rows, columns]
    with H [columns, columns], or a stack [batch, rows, columns] with one Hessian each [batch, columns, columns]
    (v_proj's KV heads), all rounded in one column loop. Matrices sharing a Hessian (q/k, gate/up) are solved as
    one by stacking their rows: rows are independent given H.

    ``GPTQ(weight, hessian, grid, damp=0.01, act_order=False).quantize(blocksize=128)`` returns the QuantizedWeight
    of one matrix, `.quantize_stack()` one per matrix of a stack; their dequantized values are the GPTQ solution.
    `dead_inputs` and `damp_used` hold one entry per matrix. The arguments are not modified.
    """

    def __init__(
        self, weight: torch.Tensor, hessian: torch.Tensor, grid: QuantGrid, damp: float = 0.01, act_order: bool = False
    ):
        self.grid = grid
        weight = weight.detach().to(torch.float32, copy=True)  # ours: dead inputs' columns are zeroed in it
        self.weight = weight.unsqueeze(0) if weight.dim() == 2 else weight  # [batch, rows, columns]
        # not copied (a 7B down_proj's is 11008² float32, 485 MB): dead inputs change the diagonal only, restored below
        hessian = hessian.detach().float()
        hessians = hessian.unsqueeze(0) if hessian.dim() == 2 else hessian
        batch, rows, columns = self.weight.shape
        self.width = grid.group_width(columns)
        diagonals = hessians.diagonal(dim1=1, dim2=2).clone()
        try:
            self.dead_inputs = [drop_dead_inputs(w, h) for w, h in zip(self.weight, hessians, strict=True)]
            # visiting order: the inputs with the largest (squared) activations first, while most columns remain to
            # absorb their error
            if act_order:
                self.order = torch.argsort(hessians.diagonal(dim1=1, dim2=2), dim=1, descending=True)
            else:
                self.order = torch.arange(columns, device=self.weight.device).expand(batch, columns)
            self.hinv, self.damp_used = self._inverse_factors(hessians, damp, act_order)
        finally:
            hessians.diagonal(dim1=1, dim2=2).copy_(diagonals)
        # static parameters (act_order, or one group per row) from the original weights; else set as groups start
        self.static = act_order or self.width == columns
        groups = self.weight.view(batch, rows, columns // self.width, self.width)
        if self.static:
            self.scale, self.zero = grid_params(groups, grid)
        else:
            self.scale = torch.ones(groups.shape[:3], device=self.weight.device)
            self.zero = torch.zeros_like(self.scale)

    def _inverse_factors(self, hessians: torch.Tensor, damp: float, act_order: bool):
        """The inverse Hessians' upper Cholesky factors [batch, columns, columns], in visiting order, and the damping
        each needed; one matrix held at a time besides the result (a single factor is used as it comes)."""
        permuted = (h[o[:, None], o] if act_order else h for h, o in zip(hessians, self.order, strict=True))
        if len(hessians) == 1:
            factor, used = inverse_hessian_factor(next(permuted), damp)
            return factor.unsqueeze(0), [used]
        factors, damp_used = torch.empty_like(hessians), []
        for index, hessian in enumerate(permuted):
            factor, used = inverse_hessian_factor(hessian, damp)
            factors[index] = factor
            damp_used.append(used)
        return factors, damp_used

    def quantize(self, blocksize: int = 128) -> QuantizedWeight:
        (quantized,) = self.quantize_stack(blocksize)
        return quantized

    def quantize_stack(self, blocksize: int = 128) -> list[QuantizedWeight]:
        index = self.order.unsqueeze(1).expand_as(self.weight)
        weight = self.weight.gather(2, index)  # a permuted copy, updated in place
        codes = torch.zeros_like(weight, dtype=torch.uint8)  # in visiting order (integers: exact in uint8)
        per_column = self._static_columns(index) if self.static else None
        start = 0
        while start < weight.shape[2]:
            end = self._block_end(start, blocksize, weight.shape[2])
            errors = self._quantize_block(weight, start, end, codes, per_column)
            # the block's rounding errors, spread over every column to its right at once (the "lazy batch" update)
            weight[:, :, end:] -= errors @ self.hinv[:, start:end, end:]
            start = end
        codes = torch.zeros_like(codes).scatter_(2, index, codes)
        scale, zero = self.scale.half(), self.zero.to(torch.uint8)
        return [QuantizedWeight(c, s, z, self.grid) for c, s, z in zip(codes, scale, zero, strict=True)]

    def _static_columns(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """1/Δ, float16-rounded Δ and z of every column, in visiting order (static groups)."""
        group = index // self.width
        return tuple(p.gather(2, group) for p in (inverse_scale(self.scale), self.scale.half().float(), self.zero))

    def _block_end(self, start: int, blocksize: int, columns: int) -> int:
        """End of the block from `start`: cut back to a group boundary when that keeps the block non-empty, so a
        group that starts inside a block ends inside it (see the module docstring)."""
        end = min(start + blocksize, columns)
        if not self.static and end < columns and end // self.width * self.width > start:
            end = end // self.width * self.width
        return end

    def _quantize_block(self, weight, start: int, end: int, codes, per_column) -> torch.Tensor:
        """Round columns [start, end) of the (permuted) weight in place, each after the OBS updates of the ones
        before it; writes their codes and returns the scaled errors (w − q)/[H⁻¹]_ii."""
        block, hinv = weight[:, :, start:end], self.hinv[:, start:end, start:end]
        pivots = hinv.diagonal(dim1=1, dim2=2).unsqueeze(1)  # [batch, 1, columns]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = start + i
            if per_column is not None:
                inverse, scale, zero = (p[:, :, column] for p in per_column)
            else:
                if column % self.width == 0:  # a group starts: its parameters from the weights as updated so far
                    group = column // self.width
                    found = grid_params(weight[:, :, column : column + self.width], self.grid)
                    self.scale[:, :, group], self.zero[:, :, group] = found
                    self._group = inverse_scale(found[0]), found[0].half().float(), found[1]
                inverse, scale, zero = self._group  # the current group's (it may have started in an earlier block)
            values = block[:, :, i]
            code = encode_scaled(values * inverse, zero, self.grid)
            codes[:, :, column] = code
            rounded = scale * (code - zero)
            errors[:, :, i] = (values - rounded) / pivots[:, :, i]
            block[:, :, i:] -= errors[:, :, i : i + 1] @ hinv[:, i : i + 1, i:]
            block[:, :, i] = rounded  # exactly on the grid (the update above leaves it only up to rounding)
        return errors


def stacked_solve(weights: list[torch.Tensor], hessian: torch.Tensor, grid: QuantGrid, options: GPTQOptions):
    """GPTQ of matrices sharing one Hessian, solved as one matrix of their stacked rows; one QuantizedWeight each."""
    solver = GPTQ(torch.cat(weights), hessian, grid, options.damp, options.act_order)
    stacked = solver.quantize(options.blocksize)
    bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
    parts = [
        QuantizedWeight(*(getattr(stacked, f)[a:b] for f in ("codes", "scale", "zero")), grid)
        for a, b in pairwise(bounds)
    ]
    return parts, solver


def per_head_solve(weight: torch.Tensor, hessians: torch.Tensor, grid: QuantGrid, options: GPTQOptions):
    """GPTQ of a matrix whose row blocks (one per KV head) each have their own Hessian ([heads, in, in], or a list),
    in one batched column loop; the blocks' codes, scales and zero points stacked back in row order."""
    heads = len(hessians)
    stacked = hessians if isinstance(hessians, torch.Tensor) else torch.stack(hessians)
    solver = GPTQ(weight.reshape(heads, -1, weight.shape[1]), stacked, grid, options.damp, options.act_order)
    parts = solver.quantize_stack(options.blocksize)
    return QuantizedWeight(
        *(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "zero")), grid
    ), solver


@register_quant_method("gptq", GPTQOptions, streams=True)
@torch.no_grad()
def gptq_quantize(model, options: GPTQOptions, context) -> None:
    """GPTQ of every target Linear, layer by layer, true-sequential within a layer."""
    targets = options.layer_targets()
    trouble: list[str] = []
    plain_value: list[int] = []

    def note(index: int, names: list[str], solver: GPTQ) -> None:
        for name in names:  # a stacked solve's Hessian is every one of its matrices'
            for dead, used in zip(solver.dead_inputs, solver.damp_used, strict=True):
                trouble.extend(
                    conditioning_notes(f"layers.{index}.{name}", dead, used, options.damp, "rounded to nearest")
                )

    def quantize_layer(index: int, layer: nn.Module, inputs) -> list[torch.Tensor]:
        linears = layer_linears(layer)
        per_head = None
        if VALUE in targets and VALUE in linears and options.attention_weighted_v:
            per_head = value_hessians(layer, inputs)  # from the layer as it is before any of its Linears changes
            if per_head is None:
                plain_value.append(index)

        def solve_set(names: list[str], stats) -> None:
            if per_head is not None and VALUE in names:
                quantized, solver = per_head_solve(linears[VALUE].weight, per_head, options.grid(VALUE), options)
                store_quantized(linears[VALUE], quantized)
                note(index, [VALUE], solver)
                names = [name for name in names if name != VALUE]
            if not names:
                return
            hessian = stats[names[0]].hessian(release=True)  # the rest of the set reads one input: one Hessian
            by_grid: dict[QuantGrid, list[str]] = {}
            for name in names:
                by_grid.setdefault(options.grid(name), []).append(name)
            for grid, alike in by_grid.items():  # one solve per grid (per_projection)
                parts, solver = stacked_solve([linears[n].weight for n in alike], hessian, grid, options)
                for name, quantized in zip(alike, parts, strict=True):
                    store_quantized(linears[name], quantized)
                note(index, alike, solver)

        return true_sequential(layer, inputs, targets, solve_set)

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
