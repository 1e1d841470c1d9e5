"""The `share` stage: parameter sharing, i.e. fewer distinct values or tensors, reused across the model.

- ``kmeans``: weight clustering (Han et al. 2016, "Deep Compression"; kmeans.py): each target Linear's weight, or
  each group of `rows_per_codebook` rows of it, takes 2^b shared float16 values; optionally the clustering error of
  a weight is weighted by its input channel's energy ‖X_j‖² on the calibration data (weighted: true).
- ``tie_layers``: cross-layer sharing (ALBERT-style, applied after training; tie.py): the closest adjacent-layer
  pairs of each projection become one tensor.

k-means leaves each clustered Linear as a CodebookLinear (codebook.py): float16 codebooks + bit-packed b-bit
indices, saved at that size. Tied tensors are really shared in memory and on disk, and counted once.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field, PositiveInt, ValidationInfo, field_validator
from torch import nn

from slimlm.calibrate import observe_and_run, walk_layers
from slimlm.errors import SlimlmError
from slimlm.modules import SHORT_NAMES, decoder_layers
from slimlm.quantize.codebook import pack_codebooks
from slimlm.quantize.kmeans import cluster_weight, store_codebook
from slimlm.quantize.stage import Targeted, target_linears
from slimlm.quantize.tie import adjacent_similarities, select_pairs, tie_group, tie_groups
from slimlm.registry import CODEBOOK, DENSE, FAKE_QUANTIZED, TIED, MethodRegistry, register_stage
from slimlm.storage import weight_modules
from slimlm.streaming import require_materialized

# method name -> function(model, options, context) that shares the target weights in place
SHARE_METHODS = MethodRegistry()
register_share_method = SHARE_METHODS.register


class ShareTargets(Targeted):
    """What every sharing method takes: the method and the projections it shares."""

    method: Annotated[str, AfterValidator(SHARE_METHODS.check)] = "kmeans"


class ShareOptions(ShareTargets):
    """k-means (the default method): 2^bits shared values per codebook; one codebook per Linear or per
    rows_per_codebook output rows."""

    bits: int = Field(4, ge=2, le=8)
    granularity: Literal["tensor", "row_group"] = "tensor"
    rows_per_codebook: PositiveInt = 1
    weighted: bool = False  # weight each error by its input channel's ‖X_j‖² on the calibration data
    iterations: int = Field(30, ge=1, le=10_000)  # Lloyd rounds at most (it stops once assignments settle)


class TieLayersOptions(ShareTargets):
    """tie_layers: tie adjacent pairs closer than threshold (relative distance), or the count closest pairs."""

    threshold: float | None = Field(None, gt=0)
    count: PositiveInt | None = Field(None, validate_default=True)
    merge: Literal["first", "mean"] = "first"

    @field_validator("count")
    @classmethod
    def _one_tie_rule(cls, value: int | None, info: ValidationInfo) -> int | None:
        if (value is None) == (info.data.get("threshold") is None):
            raise ValueError(
                "tie_layers needs exactly one of threshold (tie adjacent pairs whose relative distance "
                "is below it) or count (tie the count closest pairs)"
            )
        return value


def _tensor_users(targets: list[tuple[str, nn.Linear]]) -> list[list[tuple[str, nn.Linear]]]:
    """Target Linears grouped by the weight tensor they use: a tied tensor is clustered once, for all its users."""
    users: dict[int, list[tuple[str, nn.Linear]]] = {}
    for name, linear in targets:
        users.setdefault(id(linear.weight), []).append((name, linear))
    return list(users.values())


def _check_rows(targets: list[tuple[str, nn.Linear]], options: ShareOptions) -> int | None:
    """Rows per codebook (None: the whole tensor); they must divide every target's output rows."""
    if options.granularity == "tensor":
        return None
    for name, linear in targets:
        if linear.out_features % options.rows_per_codebook:
            raise SlimlmError(
                f"share.rows_per_codebook: {options.rows_per_codebook} does not divide the "
                f"{linear.out_features} output rows of {name}; use a divisor of it"
            )
    return options.rows_per_codebook


def channel_energies(model, names: list[str], context) -> dict[str, torch.Tensor]:
    """‖X_j‖² per input channel of each named decoder Linear over the calibration windows, with the model as it
    is (nothing is changed during the walk, so no compression error propagates into the statistics)."""
    energies: dict[str, torch.Tensor] = {}
    wanted = set(names)

    def observe(index: int, layer: nn.Module, inputs) -> list[torch.Tensor]:
        prefix = f"model.layers.{index}."
        local = [name.removeprefix(prefix) for name in wanted if name.startswith(prefix)]
        stats, outputs = observe_and_run(layer, inputs, local)
        for local_name, found in stats.items():
            energies[prefix + local_name] = found.channel_norm().pow(2)
        return outputs  # the layer is unchanged: its outputs feed the next layer

    windows = context.calibration.windows(model, context.notes)
    walk_layers(model, windows, observe, description="share (activation energy)")
    return energies


@register_share_method("kmeans")
@torch.no_grad()
def kmeans_share(model, options: ShareOptions, context) -> None:
    """Cluster every target weight tensor to 2^b shared values (one codebook per tensor or per row group)."""
    targets = target_linears(model, options)
    rows = _check_rows(targets, options)
    energies = channel_energies(model, [n for n, _ in targets], context) if options.weighted else {}
    error = total = 0.0
    for users in _tensor_users(targets):
        name, linear = users[0]
        energy = sum(energies[n] for n, _ in users) if energies else None
        original = linear.weight.detach().float().clone()
        codes = cluster_weight(linear.weight, options.bits, rows, energy, options.iterations)
        if not torch.isfinite(codes.codebook).all():
            raise SlimlmError(
                f"share (kmeans): {name} has non-finite (NaN/Inf) shared values after clustering "
                "(weights beyond the float16 range?); check the original weights"
            )
        store_codebook([lin for _, lin in users], codes)
        error += float((linear.weight.float() - original).pow(2).sum())
        total += float(original.pow(2).sum())
    granularity = "one codebook per tensor" if rows is None else f"one codebook per {rows} output rows"
    dense_bytes = sum(
        linear.weight.numel() * linear.weight.element_size()
        for _, linear in {id(linear.weight): (name, linear) for name, linear in targets}.values()
    )
    pack_codebooks(model)
    stored_bytes = sum(module.own_bytes() for _, module in weight_modules(model))
    context.notes.append(
        f"share: k-means weight clustering (Deep Compression), {options.bits}-bit indices, {granularity}, "
        f"{'activation-weighted (‖X_j‖² of the calibration inputs)' if options.weighted else 'data-free'}, targets "
        f"{', '.join(options.targets or SHORT_NAMES)} ({len(targets)} Linears); relative squared error "
        f"‖W − Ŵ‖²/‖W‖² = {error / max(total, 1e-30):.3g}. Stored as float16 codebooks + bit-packed "
        f"{options.bits}-bit indices: {stored_bytes / 1e6:.2f} MB for the clustered weights (were "
        f"{dense_bytes / 1e6:.2f} MB dense); the forward pass looks the weights up (no speedup)."
    )


@register_share_method("tie_layers", TieLayersOptions)
@torch.no_grad()
def tie_layers_share(model, options: TieLayersOptions, context) -> None:
    """Tie the closest adjacent-layer pairs of each target projection into one shared tensor."""
    pairs = adjacent_similarities(model, options.layer_targets())
    selected = select_pairs(pairs, options.threshold, options.count)
    groups = tie_groups(selected)
    members = [
        member for projection, layers in groups for member in tie_group(model, projection, layers, options.merge)
    ]
    rule = (
        f"relative distance < {options.threshold}"
        if options.threshold is not None
        else f"the {options.count} closest pairs"
    )
    pair_lines = [
        f"{p.projection} {p.layer}↔{p.layer + 1}: distance {p.distance:.3f}, cosine {p.cosine:.3f}" for p in selected
    ]
    moved = [f"{m.name} {m.change:.3f}" for m in members if m.change > 0]
    context.notes.append(
        f"share: cross-layer tying of adjacent {', '.join(options.targets or SHORT_NAMES)} ({rule}, merge "
        f"{options.merge}; {len(selected)} of {len(pairs)} pairs, {len(decoder_layers(model))} layers): "
        + ("; ".join(pair_lines) if pair_lines else "no pair qualified")
        + (
            f". {len(groups)} groups, each sharing its first layer's tensor; relative change ‖W_shared − W‖/‖W‖ of "
            "every weight that moved: " + "; ".join(moved)
            if moved
            else ""
        )
        + ". Tied tensors are one Parameter (counted once); the ties are recorded in config.slimlm_tied_parameters."
    )


@register_stage(
    "share",
    ShareOptions,
    SHARE_METHODS,
    accepts=lambda o: frozenset({DENSE, TIED} if o.method == "kmeans" else {DENSE, FAKE_QUANTIZED}),
    produces=lambda o: frozenset({CODEBOOK} if o.method == "kmeans" else {TIED}),
)
def share(model, options: ShareTargets, context):
    """Parameter sharing: k-means weight clustering (codebooks) or tying similar adjacent layers' projections."""
    require_materialized(model, f"share ({options.method})")
    SHARE_METHODS[options.method](model, options, context)
    for name, linear in target_linears(model, options):
        if not torch.isfinite(linear.weight).all():
            raise SlimlmError(
                f"share ({options.method}): {name} has non-finite (NaN/Inf) weights after sharing; "
                "check the original weights"
            )
    return model
