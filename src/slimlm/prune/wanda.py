"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

A weight's importance is |W_ij|·‖X_j‖₂: its magnitude times the norm of the input channel it multiplies over the
calibration tokens, compared within each output row (each row keeps the same number of weights). As in
locuslab/wanda's prune_wanda, the model is walked layer by layer, so a layer's input norms come from the outputs of
the already-pruned layers before it; all Linears of a layer are scored from one pass over its inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.calibrate import InputStats, observe_layer, walk_layers
from slimlm.modules import layer_linears
from slimlm.prune.unstructured import PruneOptions, apply_mask, layer_sparsities, register_prune_method


def wanda_scores(linear: nn.Linear, stats: InputStats) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ in float32, shaped like the weight (also OWL's outlier measure)."""
    return linear.weight.detach().abs().float() * stats.channel_norm().unsqueeze(0)


@register_prune_method("wanda", streams=True)
@torch.no_grad()
def wanda_prune(model, options: PruneOptions, context) -> None:
    """Drop the lowest |W|·‖X‖ of every output row (N:M: of every group of M inputs), layer by layer."""
    sparsities = layer_sparsities(model, options, context)

    def prune_layer(index: int, layer: nn.Module, inputs) -> None:
        stats = observe_layer(layer, inputs)
        for name, linear in layer_linears(layer).items():
            scores = wanda_scores(linear, stats[name])
            apply_mask(linear.weight.data, scores, options, per_row=True, sparsity=sparsities[index])

    walk_layers(model, context.calibration.windows(model, context.notes), prune_layer, description="wanda")
    context.notes.append("wanda: each layer scored on the outputs of the already-pruned layers before it")
