"""Cross-layer parameter sharing: the same projection of adjacent decoder layers made one tensor.

ALBERT (Lan et al. 2020) shares every layer's parameters from the start of training; "Lessons on Parameter Sharing
across Layers in Transformers" (Takase & Kiyono 2023) and "Basis Sharing" (Wang et al. 2024) show that sharing
between some layers costs little. Here sharing is applied to a trained model: for each projection kind, the pair of
adjacent layers (l, l+1) is scored by the relative Frobenius distance ‖W_l − W_{l+1}‖/‖W_l‖ (and the cosine of the
flattened weights, reported), and the closest pairs are tied — those under a threshold, or the `count` closest.

Chaining rule: selected pairs that share a layer form a run l..m of consecutive layers, and the whole run becomes
one group sharing ONE nn.Parameter, that of its first layer l. merge=first keeps W_l (the others are replaced by it,
so layer m is replaced by W_l even if only W_{m−1} was measured close: the notes give every member's actual change);
merge=mean sets the shared tensor to the mean of the group's weights. No tensor is ever tied to two sources. Only
weights are tied; biases (Qwen2's q/k/v) stay per layer. Distances are measured once, before any tying.

Ties are recorded as ``model.config.slimlm_tied_parameters = {target: source}`` (full parameter names, every target
pointing at its group's first tensor) so that `slimlm.storage.retie` restores them after a reload, and so that
`slimlm.storage.untied_state_dict` can leave the targets out of the saved file (transformers refuses to save shared
tensors its model class does not declare as tied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.modules import decoder_layers, layer_linears
from slimlm.quantize.grid import QUANTIZED_ATTRIBUTE
from slimlm.quantize.kmeans import CODEBOOK_ATTRIBUTE
from slimlm.storage import TIED_KEY

# codes describing a Linear's weight: after a tie they must be the shared tensor's or none
_CODE_ATTRIBUTES = (CODEBOOK_ATTRIBUTE, QUANTIZED_ATTRIBUTE)


@dataclass(frozen=True)
class PairSimilarity:
    """How close a projection of layer `layer` is to the same projection of layer `layer + 1`."""

    projection: str  # name inside a decoder layer, e.g. "mlp.up_proj"
    layer: int
    distance: float  # ‖W_l − W_{l+1}‖ / ‖W_l‖
    cosine: float


@dataclass(frozen=True)
class TiedMember:
    """One layer of a tied group: its parameter name and how far its weight moved, ‖W_shared − W‖/‖W‖."""

    name: str
    source: str
    change: float


def weight_name(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.{projection}.weight"


@torch.no_grad()
def similarity(first: torch.Tensor, second: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius distance ‖A − B‖/‖A‖, cosine of the flattened A and B), in float32."""
    a, b = first.detach().float().flatten(), second.detach().float().flatten()
    norm_a, norm_b = a.norm(), b.norm()
    distance = (a - b).norm() / norm_a if norm_a > 0 else torch.tensor(float(b.norm() > 0))
    cosine = (a @ b) / (norm_a * norm_b) if norm_a * norm_b > 0 else torch.tensor(0.0)
    return float(distance), float(cosine)


def adjacent_similarities(model: nn.Module, projections: list[str]) -> list[PairSimilarity]:
    """Every adjacent pair of each projection, except pairs of different shapes or already one tensor."""
    linears = [layer_linears(layer) for layer in decoder_layers(model)]
    pairs = []
    for projection in projections:
        for index in range(len(linears) - 1):
            first, second = linears[index].get(projection), linears[index + 1].get(projection)
            if first is None or second is None or first.weight is second.weight:
                continue
            if first.weight.shape == second.weight.shape:
                pairs.append(PairSimilarity(projection, index, *similarity(first.weight, second.weight)))
    return pairs


def select_pairs(
    pairs: list[PairSimilarity], threshold: float | None = None, count: int | None = None
) -> list[PairSimilarity]:
    """The pairs closer than `threshold`, or the `count` closest (ties broken by position in the model)."""
    if threshold is not None:
        return [pair for pair in pairs if pair.distance < threshold]
    return sorted(pairs, key=lambda pair: pair.distance)[:count]


def tie_groups(selected: list[PairSimilarity]) -> list[tuple[str, list[int]]]:
    """Runs of consecutive layers joined by selected pairs, per projection: [(projection, [l, l+1, ...])]."""
    groups: list[tuple[str, list[int]]] = []
    for pair in sorted(selected, key=lambda p: (p.projection, p.layer)):
        if groups and groups[-1][0] == pair.projection and groups[-1][1][-1] == pair.layer:
            groups[-1][1].append(pair.layer + 1)
        else:
            groups.append((pair.projection, [pair.layer, pair.layer + 1]))
    return groups


def _share_codes(source: nn.Linear, users: list[nn.Linear], keep: bool) -> None:
    """Users of the shared tensor get the source's codes (keep) or lose theirs (the tensor left their grid)."""
    for attribute in _CODE_ATTRIBUTES:
        codes = getattr(source, attribute, None) if keep else None
        for linear in users:
            if codes is not None:
                setattr(linear, attribute, codes)
            elif hasattr(linear, attribute):
                delattr(linear, attribute)


def _root(model: nn.Module, name: str) -> str:
    """The name a tie must point at: the source of an earlier tie if `name` is itself a target."""
    return (getattr(model.config, TIED_KEY, None) or {}).get(name, name)


@torch.no_grad()
def tie_group(model: nn.Module, projection: str, layers: list[int], merge: str) -> list[TiedMember]:
    """Make the projection of every layer in `layers` (consecutive) use the first layer's Parameter; with
    merge="mean" that Parameter becomes the mean of the group's weights. Returns every member's change (members
    include layers tied to one of them before)."""
    all_linears = [layer_linears(layer)[projection] for layer in decoder_layers(model)]
    source = all_linears[layers[0]]
    # layers sharing a group member's tensor through an earlier tie join the group, so no earlier tie breaks
    group_tensors = {id(all_linears[i].weight) for i in layers}
    members = [i for i, linear in enumerate(all_linears) if id(linear.weight) in group_tensors]
    originals = {i: all_linears[i].weight.detach().float().clone() for i in members}
    if merge == "mean":
        merged = torch.stack([originals[i] for i in layers]).mean(dim=0)
        if not torch.isfinite(merged).all():
            raise SlimlmError(
                f"share (tie_layers): the mean of {weight_name(layers[0], projection)} and its group "
                "has non-finite (NaN/Inf) values; check the original weights"
            )
        source.weight.data.copy_(merged.to(source.weight.dtype))
    source_name = _root(model, weight_name(layers[0], projection))
    tied = dict(getattr(model.config, TIED_KEY, None) or {})
    for index in members:
        all_linears[index].weight = source.weight
        if weight_name(index, projection) != source_name:
            tied[weight_name(index, projection)] = source_name
    setattr(model.config, TIED_KEY, tied)
    _share_codes(source, [all_linears[i] for i in members], keep=merge == "first")
    shared = source.weight.detach().float()
    return [
        TiedMember(
            weight_name(i, projection),
            source_name,
            float((shared - originals[i]).norm() / originals[i].norm().clamp(min=1e-30)),
        )
        for i in members
    ]
