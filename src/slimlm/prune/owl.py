"""OWL: outlier-weighted layer-wise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity").

Layers whose Wanda scores |W|·‖X‖ hold more outliers matter more, so they keep more weights. One calibration pass
over the dense model measures each decoder layer's outlier ratio D_l: the fraction of its scores (all its Linears
together) above M × the layer's mean score (M = owl_threshold). Following luuyin/OWL's `prune_*_outlier`:

    keep_l = 2λ · (D_l − min D) / (max D − min D)     (λ = owl_lambda)
    sparsity_l = target − (keep_l − mean(keep))

so layer sparsities span a range 2λ wide around a mean equal to the target (about target ± λ). The pruning
method (magnitude, Wanda or SparseGPT) then prunes every matrix of layer l to sparsity_l. Unstructured patterns only.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.calibrate import observe_and_run, walk_layers
from slimlm.modules import layer_linears
from slimlm.prune.unstructured import PruneOptions, register_allocation
from slimlm.prune.wanda import wanda_scores

# No layer is pruned entirely: allocations are kept within [0, MAX_LAYER_SPARSITY].
MAX_LAYER_SPARSITY = 0.99


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Fraction of the scores (taken together) above `threshold` × their mean."""
    flat = torch.cat([s.flatten() for s in scores])
    return (flat > threshold * flat.mean()).float().mean().item()


def measure_outlier_ratios(model, windows: torch.Tensor, threshold: float) -> list[float]:
    """Each decoder layer's outlier ratio of Wanda scores, on the dense model (nothing is modified)."""
    ratios: list[float] = []

    def measure(index: int, layer: nn.Module, inputs) -> list[torch.Tensor]:
        stats, outputs = observe_and_run(layer, inputs)
        scores = [wanda_scores(linear, stats[name]) for name, linear in layer_linears(layer).items()]
        ratios.append(outlier_ratio(scores, threshold))
        return outputs  # the layer is unchanged: its outputs feed the next layer

    walk_layers(model, windows, measure, description="owl outliers")
    return ratios


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Layer sparsities from outlier ratios: more outliers, lower sparsity; the mean is the target.

    Where the reference would leave [0, 1) (a high target, a large λ), the spread around the target is scaled down
    instead of clipping, so the mean stays the target.
    """
    ratios_t = torch.tensor(ratios, dtype=torch.float64)
    spread = ratios_t.max() - ratios_t.min()
    if spread == 0:  # no layer stands out (the reference would divide by zero)
        return [target] * len(ratios)
    keep_more = (ratios_t - ratios_t.min()) / spread * (2 * lam)
    deviation = keep_more.mean() - keep_more  # sparsity_l − target, sums to zero
    return (target + _fitting_scale(target, deviation) * deviation).tolist()


def _fitting_scale(target: float, deviation: torch.Tensor) -> float:
    """The largest factor ≤ 1 keeping target + factor·deviation within [0, MAX_LAYER_SPARSITY]."""
    scale = 1.0
    if deviation.min() < 0:
        scale = min(scale, target / -deviation.min().item())
    if deviation.max() > 0:
        scale = min(scale, (MAX_LAYER_SPARSITY - target) / deviation.max().item())
    return max(scale, 0.0)


@register_allocation("owl")
@torch.no_grad()
def owl_allocation(model, options: PruneOptions, context) -> list[float]:
    """Measure outliers on the calibration windows, then allocate the target across layers."""
    ratios = measure_outlier_ratios(model, context.calibration.windows(model, context.notes), options.owl_threshold)
    sparsities = owl_sparsities(ratios, options.sparsity, options.owl_lambda)
    layers = range(len(sparsities))
    lowest, highest = min(layers, key=sparsities.__getitem__), max(layers, key=sparsities.__getitem__)
    context.notes.append(
        f"owl allocation (M={options.owl_threshold:g}, λ={options.owl_lambda:g}): outlier ratios "
        f"{min(ratios):.2%}–{max(ratios):.2%} of scores per layer; layer sparsities {sparsities[lowest]:.1%} "
        f"(layer {lowest}) to {sparsities[highest]:.1%} (layer {highest}), mean "
        f"{sum(sparsities) / len(sparsities):.1%}"
    )
    return sparsities
