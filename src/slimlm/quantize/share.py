"""The `share` stage: parameter sharing, i.e. fewer distinct values or tensors, reused across the model.

- ``kmeans``: weight clustering (Han et al. 2016, "Deep Compression"; kmeans.py): each target Linear's weight, or
  each group of `rows_per_codebook` rows of it, takes 2^b shared float16 values; optionally the clustering error of
  a weight is weighted by its input channel's energy ‖X_j‖² on the calibration data (weighted: true).
- ``tie_layers``: cross-layer sharing (ALBERT-style, applied after training; tie.py): the closest adjacent-layer
  pairs of each projection become one tensor.

Like the quantize stage, k-means is fake compression for now: the weights hold codebook[indices] in the model's
dtype and the codes ride along as ``linear.slimlm_codebook`` (non-persistent), so the saved file is no smaller
until packed storage lands; `codebook_bytes` gives the size such storage would take. Tied tensors, in contrast,
are really shared in memory and counted once.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from slimlm.calibrate import observe_layer, walk_layers
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import dense_sizes
from slimlm.modules import decoder_layers
from slimlm.prune.unstructured import calibration_windows
from slimlm.quantize.kmeans import cluster_weight, codebook_bytes, store_codebook
from slimlm.quantize.stage import TARGETS, QuantizeOptions, target_linears
from slimlm.quantize.tie import adjacent_similarities, select_pairs, tie_group, tie_groups
from slimlm.registry import MethodRegistry, StageOptions, register_stage
from slimlm.streaming import require_materialized

# method name -> function(model, options, context) that shares the target weights in place
SHARE_METHODS = MethodRegistry()
# the quantize stage's checks of `bits` and `targets`, reused as they are (same names, same messages)
_QUANTIZE_CHECKS = QuantizeOptions.__pydantic_decorators__.field_validators


register_share_method = SHARE_METHODS.register


class ShareOptions(StageOptions):
    method: str = "kmeans"
    # kmeans: 2^bits shared values per codebook; one codebook per Linear or per rows_per_codebook output rows
    bits: int = 4
    granularity: Literal["tensor", "row_group"] = "tensor"
    rows_per_codebook: int = Field(1, ge=1)
    weighted: bool = False  # weight each error by its input channel's ‖X_j‖² on the calibration data
    iterations: int = Field(30, ge=1, le=10_000)  # Lloyd rounds at most (it stops once assignments settle)
    # tie_layers: tie adjacent pairs closer than threshold (relative distance), or the count closest pairs
    threshold: float | None = Field(None, gt=0)
    count: int | None = Field(None, ge=1, validate_default=True)
    merge: Literal["first", "mean"] = "first"
    targets: list[str] | None = None  # projection names (q_proj ... down_proj); None: all of them

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return SHARE_METHODS.check(value)

    @field_validator("bits")
    @classmethod
    def _bits_range(cls, value: int) -> int:
        return _QUANTIZE_CHECKS["_bits_range"].func(value)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: list[str] | None) -> list[str] | None:
        return _QUANTIZE_CHECKS["_known_targets"].func(value)

    @field_validator("count")
    @classmethod
    def _one_tie_rule(cls, value: int | None, info: ValidationInfo) -> int | None:
        threshold = info.data.get("threshold")
        if info.data.get("method") == "tie_layers" and (value is None) == (threshold is None):
            raise ValueError("tie_layers needs exactly one of threshold (tie adjacent pairs whose relative distance "
                             "is below it) or count (tie the count closest pairs)")
        return value

    layer_targets = QuantizeOptions.layer_targets  # the targets as names inside a decoder layer, in layer order


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
            raise SlimlmError(f"share.rows_per_codebook: {options.rows_per_codebook} does not divide the "
                              f"{linear.out_features} output rows of {name}; use a divisor of it")
    return options.rows_per_codebook


def channel_energies(model, names: list[str], context) -> dict[str, torch.Tensor]:
    """‖X_j‖² per input channel of each named decoder Linear over the calibration windows, with the model as it
    is (nothing is changed during the walk, so no compression error propagates into the statistics)."""
    energies: dict[str, torch.Tensor] = {}
    wanted = set(names)

    def observe(index: int, layer: nn.Module, inputs) -> None:
        prefix = f"model.layers.{index}."
        local = [name.removeprefix(prefix) for name in wanted if name.startswith(prefix)]
        for local_name, stats in observe_layer(layer, inputs, local).items():
            energies[prefix + local_name] = stats.channel_norm().pow(2)

    walk_layers(model, calibration_windows(model, context), observe, description="share (activation energy)")
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
            raise SlimlmError(f"share (kmeans): {name} has non-finite (NaN/Inf) shared values after clustering "
                              "(weights beyond the float16 range?); check the original weights")
        store_codebook([lin for _, lin in users], codes)
        error += float((linear.weight.float() - original).pow(2).sum())
        total += float(original.pow(2).sum())
    granularity = "one codebook per tensor" if rows is None else f"one codebook per {rows} output rows"
    context.notes.append(
        f"share: k-means weight clustering (Deep Compression), {options.bits}-bit indices, {granularity}, "
        f"{'activation-weighted (‖X_j‖² of the calibration inputs)' if options.weighted else 'data-free'}, targets "
        f"{', '.join(options.targets or TARGETS)} ({len(targets)} Linears); relative squared error "
        f"‖W − Ŵ‖²/‖W‖² = {error / max(total, 1e-30):.3g}. Size as codebooks would store it (float16 codebooks + "
        f"{options.bits}-bit indices, every other tensor bf16): {codebook_bytes(model) / 1e6:.2f} MB vs "
        f"{dense_sizes(model)['bf16'] / 1e6:.2f} MB dense bf16 — a computed figure, not written: the saved model "
        "holds codebook[indices] in its dtype (no smaller, no faster) until packed storage lands."
    )


@register_share_method("tie_layers")
@torch.no_grad()
def tie_layers_share(model, options: ShareOptions, context) -> None:
    """Tie the closest adjacent-layer pairs of each target projection into one shared tensor."""
    pairs = adjacent_similarities(model, options.layer_targets())
    selected = select_pairs(pairs, options.threshold, options.count)
    groups = tie_groups(selected)
    members = [member for projection, layers in groups for member in tie_group(model, projection, layers,
                                                                              options.merge)]
    rule = (f"relative distance < {options.threshold}" if options.threshold is not None
            else f"the {options.count} closest pairs")
    pair_lines = [f"{p.projection} {p.layer}↔{p.layer + 1}: distance {p.distance:.3f}, cosine {p.cosine:.3f}"
                  for p in selected]
    moved = [f"{m.name} {m.change:.3f}" for m in members if m.change > 0]
    context.notes.append(
        f"share: cross-layer tying of adjacent {', '.join(options.targets or TARGETS)} ({rule}, merge {options.merge}; "
        f"{len(selected)} of {len(pairs)} pairs, {len(decoder_layers(model))} layers): "
        + ("; ".join(pair_lines) if pair_lines else "no pair qualified")
        + (f". {len(groups)} groups, each sharing its first layer's tensor; relative change ‖W_shared − W‖/‖W‖ of "
           "every weight that moved: " + "; ".join(moved) if moved else "")
        + ". Tied tensors are one Parameter (counted once); the ties are recorded in config.slimlm_tied_parameters."
    )


@register_stage("share", ShareOptions)
def share(model, options: ShareOptions, context):
    """Parameter sharing: k-means weight clustering (codebooks) or tying similar adjacent layers' projections."""
    require_materialized(model, f"share ({options.method})")
    SHARE_METHODS[options.method](model, options, context)
    for name, linear in target_linears(model, options):
        if not torch.isfinite(linear.weight).all():
            raise SlimlmError(f"share ({options.method}): {name} has non-finite (NaN/Inf) weights after sharing; "
                              "check the original weights")
    return model


