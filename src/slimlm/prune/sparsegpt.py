"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot").

Each Linear is pruned to minimise the layer-wise reconstruction error ‖WX − ŴX‖² rather than to keep the largest
weights: columns are visited left to right and the error of pruning column i is spread over the columns not yet
visited through the inverse Hessian (the OBS update), so the kept weights compensate for the dropped ones. The mask
is chosen adaptively, block by block, on w²/[H⁻¹]²_ii of the already-updated weights. Follows
IST-DASLab/sparsegpt's `fasterprune` (and locuslab/wanda's copy of it); the model is walked layer by layer with
`walk_layers`, so a layer's Hessian comes from the outputs of the already-pruned layers before it. With
`attention_weighted_v`, v_proj is pruned per KV head, each with its attention-weighted Hessian.
"""

from __future__ import annotations

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from slimlm.calibrate import observe_layer, walk_layers
from slimlm.hessian import conditioning_notes, drop_dead_inputs, inverse_hessian_factor
from slimlm.modules import VALUE, layer_linears
from slimlm.prune.masks import nm_mask, parse_pattern, unstructured_mask
from slimlm.prune.unstructured import PruneOptions, layer_sparsities, register_prune_method
from slimlm.value_hessian import value_hessians


class SparseGPTOptions(PruneOptions):
    blocksize: int = Field(128, ge=1)  # columns pruned before their errors are spread over the rest at once
    damp: float = Field(0.01, gt=0, lt=1)  # × mean diag(H), added to H's diagonal
    # v_proj's rows pruned per KV head with a Hessian weighing each token by the attention it receives
    # (slimlm/value_hessian.py, as GPTQ does). On by default because it measured better: 50 % on SmolLM2-135M,
    # 4x2048 c4, ppl 44.61 -> 41.28, KL 0.89 -> 0.81, for 8 % more time (benchmarks/results/value_weighting.json)
    attention_weighted_v: bool = True

    @field_validator("blocksize")
    @classmethod
    def _blocks_hold_whole_groups(cls, value: int, info: ValidationInfo) -> int:
        nm = parse_pattern(info.data.get("pattern", "unstructured"))
        if nm is not None and value % nm[1]:
            raise ValueError(f"must be a multiple of M={nm[1]} for sparsegpt with pattern {nm[0]}:{nm[1]}")
        return value


class SparseGPT:
    """Prunes one weight matrix [rows, columns] given the Hessian H = 2/n·XᵀX of its inputs.

    ``pruned = SparseGPT(weight, hessian, damp=0.01).prune(0.5)`` (or ``nm=(2, 4)``) returns the new float32
    weight: exact zeros where pruned, OBS-updated values elsewhere. The arguments are not modified.
    """

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01):
        self.weight = weight.detach().float().clone()
        hessian = hessian.detach().float().clone()
        # dead inputs (always zero on the calibration data) get zero weights: they score lowest, so count first
        # towards the pruning budget
        self.dead_inputs = drop_dead_inputs(self.weight, hessian)
        self.hinv, self.damp_used = inverse_hessian_factor(hessian, damp)

    def prune(self, sparsity: float, nm: tuple[int, int] | None = None, blocksize: int = 128) -> torch.Tensor:
        """Prune to `sparsity` of the matrix (unstructured) or to N:M; returns the updated weight."""
        rows, columns = self.weight.shape
        if nm is not None and (columns % nm[1] or blocksize % nm[1]):
            raise ValueError(f"input dimension {columns} and blocksize {blocksize} must be multiples of M={nm[1]}")
        weight, hinv = self.weight, self.hinv
        for start in range(0, columns, blocksize):
            end = min(start + blocksize, columns)
            drop = self._block_drop_count(rows, start, end, sparsity)
            errors = self._prune_block(weight[:, start:end], hinv[start:end, start:end], nm, drop)
            # the block's pruning errors, spread over every column to its right at once (the "lazy batch" update)
            weight[:, end:] -= errors @ hinv[start:end, end:]
        return weight

    @staticmethod
    def _block_drop_count(rows: int, start: int, end: int, sparsity: float) -> int:
        """Weights to drop in columns [start, end): cumulative counts, so the blocks add up to exactly
        int(rows·columns·sparsity), the count magnitude pruning drops from the whole matrix."""
        return int(rows * end * sparsity) - int(rows * start * sparsity)

    @staticmethod
    def _prune_block(block: torch.Tensor, hinv: torch.Tensor, nm: tuple[int, int] | None, drop: int) -> torch.Tensor:
        """Prune a block of columns in place (unstructured: `drop` weights of the block; N:M: every group), column by
        column with the OBS update; returns the scaled errors (w − q)/[H⁻¹]_ii of every column, for updating the
        columns right of the block."""
        diagonal = hinv.diagonal()
        errors = torch.zeros_like(block)
        if nm is None:
            keep = SparseGPT._unstructured_keep(block, diagonal, drop)
        else:  # each group of M columns is chosen when reached, on weights updated by the groups before it
            keep = torch.ones_like(block, dtype=torch.bool)
        for i in range(block.shape[1]):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                keep[:, group] = nm_mask(SparseGPT._saliency(block[:, group], diagonal[group]), *nm)
            column = block[:, i]
            pruned = column * keep[:, i]
            errors[:, i] = (column - pruned) / diagonal[i]
            block[:, i:] -= errors[:, i : i + 1] @ hinv[i : i + 1, i:]
            block[:, i] = pruned  # exact zeros (the update above leaves them only up to rounding)
        return errors

    @staticmethod
    def _saliency(weights: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
        """OBS saliency w²/[H⁻¹]²_ii (the error of dropping w, up to a factor): lowest is pruned first."""
        return weights.pow(2) / diagonal.pow(2).unsqueeze(0)

    @staticmethod
    def _unstructured_keep(block: torch.Tensor, diagonal: torch.Tensor, drop: int) -> torch.Tensor:
        """Kept mask of the block: all but the `drop` lowest saliencies across the whole block."""
        # unstructured_mask drops int(numel·sparsity); asking for (drop + ½)/numel makes that exactly `drop`
        # whatever the floating-point rounding of the product.
        return unstructured_mask(SparseGPT._saliency(block, diagonal), (drop + 0.5) / block.numel())


def _row_block_sparsities(sparsity: float, blocks: int, numel: int) -> list[float]:
    """The sparsity to ask of each of `blocks` equal row blocks (v_proj's KV heads) so that together they drop
    exactly int(blocks·numel·sparsity), the count of the whole matrix: cumulative counts, each asked for as
    (count + ½)/numel so that the floating-point rounding inside `prune` cannot move it. One block keeps `sparsity`
    as it is (the same arithmetic as without blocks)."""
    if blocks == 1:
        return [sparsity]
    cumulative = [int(numel * block * sparsity) for block in range(blocks + 1)]
    return [(cumulative[k + 1] - cumulative[k] + 0.5) / numel for k in range(blocks)]


@register_prune_method("sparsegpt", SparseGPTOptions, streams=True)
@torch.no_grad()
def sparsegpt_prune(model, options: SparseGPTOptions, context) -> None:
    """SparseGPT of every decoder Linear, layer by layer; all Linears of a layer from one pass over its inputs."""
    sparsities = layer_sparsities(model, options, context)
    nm = parse_pattern(options.pattern)
    trouble: list[str] = []

    def prune_layer(index: int, layer: nn.Module, inputs) -> None:
        per_head = value_hessians(layer, inputs) if options.attention_weighted_v else None
        stats = observe_layer(layer, inputs, hessian=True)
        for name, linear in layer_linears(layer).items():
            hessians = per_head if name == VALUE and per_head is not None else [stats[name].hessian()]
            rows = linear.out_features // len(hessians)  # one block of rows per Hessian (per KV head for v_proj)
            blocks = linear.weight.data.split(rows)
            block_sparsities = _row_block_sparsities(sparsities[index], len(blocks), blocks[0].numel())
            for block, hessian, sparsity in zip(blocks, hessians, block_sparsities, strict=True):
                pruner = SparseGPT(block, hessian, options.damp)
                block.copy_(pruner.prune(sparsity, nm, options.blocksize))
                trouble.extend(
                    conditioning_notes(
                        f"layers.{index}.{name}",
                        pruner.dead_inputs,
                        pruner.damp_used,
                        options.damp,
                        "pruned by magnitude",
                    )
                )

    walk_layers(model, context.calibration.windows(model, context.notes), prune_layer, description="sparsegpt")
    context.notes.append(
        f"sparsegpt: blocksize {options.blocksize}, damping {options.damp} × mean diag(H); each layer's Hessian from "
        "the outputs of the already-pruned layers before it"
    )
    if trouble:
        context.notes.append(f"sparsegpt: {len(trouble)} matrices needed attention: " + "; ".join(trouble))
