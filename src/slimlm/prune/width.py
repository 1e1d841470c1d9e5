"""The `prune_width` stage: remove MLP channels and attention heads, leaving a genuinely smaller dense model.

Importance is Wanda-style, from calibration activations (|W|·‖X‖ summed over what a unit writes):

- MLP channel c: Σ_rows |W_down[:, c]|·‖X_c‖, X the input of down_proj (act(gate)·up). Only down_proj is scored:
  ‖X_c‖ already carries the gate/up contributions, and this is exactly the size of what channel c adds to the
  residual stream, whereas gate/up rows score inputs on another scale.
- Query head h: Σ over o_proj rows and h's head dims j of |W_o[:, j]|·‖X_o,j‖ (X_o the attention output).

Every layer keeps the same counts (the config holds one width), each layer its own top channels/heads. With GQA
(``gqa: within_groups``, the default) every KV group keeps the same number of its query heads, so k/v are untouched;
``gqa: whole_groups`` removes entire KV groups (their k/v heads and all their query heads), ranked by the sum of
their heads' scores. As in Wanda, layers are scored and cut one at a time along the calibration walk, so a layer is
scored on the outputs of the already-pruned layers before it.

Counts: an int is a number of channels/heads to keep, a float in (0, 1] a fraction (rounded to the nearest count):
``mlp_keep: 1`` keeps one channel, ``mlp_keep: 1.0`` keeps them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from slimlm.calibrate import InputStats, observe_layer, walk_layers
from slimlm.errors import SlimlmError
from slimlm.modules import DOWN, OUTPUT, attention_head_dim, config_widths, width_config_changes
from slimlm.registry import RESHAPED, StageOptions, register_stage
from slimlm.streaming import require_materialized
from slimlm.surgery import config_rejection, count_parameters, keep_attention_heads, keep_mlp_channels, set_widths

Keep = int | float


class WidthOptions(StageOptions):
    mlp_keep: Keep | None = None  # intermediate channels to keep per layer (count or fraction); None: all
    heads_keep: Keep | None = None  # query heads to keep per layer (count or fraction); None: all
    gqa: Literal["within_groups", "whole_groups"] = "within_groups"

    @field_validator("mlp_keep", "heads_keep", mode="before")
    @classmethod
    def _a_number(cls, value):
        # Before pydantic's int|float union: one message instead of one per member, and True is not a count.
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError("must be a count (int ≥ 1) or a fraction in (0, 1]")
        return value

    @field_validator("mlp_keep", "heads_keep")
    @classmethod
    def _count_or_fraction(cls, value: Keep | None) -> Keep | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("must keep at least 1 (a count ≥ 1 or a fraction in (0, 1])")
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError("must be a fraction in (0, 1] (or a count ≥ 1)")
        return value

    @model_validator(mode="after")
    def _something_to_prune(self):
        if self.mlp_keep is None and self.heads_keep is None:
            raise ValueError("give mlp_keep and/or heads_keep")
        return self


@dataclass(frozen=True)
class WidthPlan:
    """Widths every layer is cut to, resolved against the model."""

    channels: int  # intermediate channels kept
    heads: int  # query heads kept
    kv_heads: int  # KV heads kept
    heads_per_group: int  # query heads kept per KV head


def resolve_count(value: Keep | None, total: int, field: str, unit: str) -> int:
    if value is None:
        return total
    count = value if isinstance(value, int) else round(value * total)
    if count < 1:
        raise SlimlmError(f"prune_width.{field}: {value} keeps no {unit} of {total}; keep at least 1")
    if count > total:
        raise SlimlmError(f"prune_width.{field}: {value} is more than the {total} {unit}s each layer has")
    return count


def plan_widths(config, options: WidthOptions) -> WidthPlan:
    channels_before, heads, _ = config_widths(config)
    channels = resolve_count(options.mlp_keep, channels_before, "mlp_keep", "MLP channel")
    kept = resolve_count(options.heads_keep, heads, "heads_keep", "attention head")
    kv_heads = kv_heads_for(config, kept, options.gqa)
    problem = _gqa_problem(config, options.gqa) if kv_heads is None else _config_problem(config, kept, kv_heads)
    if problem:
        valid = [n for n in range(1, heads + 1) if _head_count_fits(config, n, options.gqa)]
        raise SlimlmError(
            f"prune_width.heads_keep: {kept} of {heads} query heads {problem}; "
            f"valid counts: {', '.join(map(str, valid))}"
        )
    return WidthPlan(channels, kept, kv_heads, kept // kv_heads)


def kv_heads_for(config, heads: int, gqa: str) -> int | None:
    """The KV heads that go with `heads` query heads, None if the GQA layout cannot hold that many."""
    _, query_heads, kv_heads = config_widths(config)
    group = query_heads // kv_heads
    if gqa == "within_groups":
        return kv_heads if heads % kv_heads == 0 else None
    return heads // group if heads % group == 0 else None


def _gqa_problem(config, gqa: str) -> str:
    _, query_heads, kv_heads = config_widths(config)
    group = query_heads // kv_heads
    if gqa == "within_groups":
        return f"breaks GQA: each of the {kv_heads} KV groups must keep the same number of its {group} query heads"
    return f"breaks GQA: gqa whole_groups removes whole KV groups of {group} query heads"


def _config_problem(config, heads: int, kv_heads: int) -> str | None:
    reason = config_rejection(config, width_config_changes(config, heads=heads, kv_heads=kv_heads))
    return f"is refused by transformers' {type(config).__name__} ({reason})" if reason else None


def _head_count_fits(config, heads: int, gqa: str) -> bool:
    kv_heads = kv_heads_for(config, heads, gqa)
    return kv_heads is not None and _config_problem(config, heads, kv_heads) is None


# ---------------------------------------------------------------- importance


def output_contribution(linear: nn.Linear, stats: InputStats) -> torch.Tensor:
    """Per input channel j of `linear`: Σ_rows |W[:, j]|·‖X_j‖ (how much j writes into the output)."""
    return (linear.weight.detach().abs().float() * stats.channel_norm().unsqueeze(0)).sum(dim=0)


def top_sorted(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in increasing index order (keeps the original layout)."""
    return scores.topk(count).indices.sort().values


def heads_to_keep(head_scores: torch.Tensor, kv_heads: int, plan: WidthPlan, gqa: str) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) to keep, both in original order; query head h belongs to KV group h // group."""
    by_group = head_scores.view(kv_heads, -1)  # [KV group, query head within the group]
    group = by_group.shape[1]
    if gqa == "whole_groups":
        groups = top_sorted(by_group.sum(dim=1), plan.kv_heads).tolist()
        return [g * group + h for g in groups for h in range(group)], groups
    within = by_group.topk(plan.heads_per_group, dim=1).indices.sort(dim=1).values
    query = (within + torch.arange(kv_heads).unsqueeze(1) * group).flatten()
    return query.tolist(), list(range(kv_heads))


# ---------------------------------------------------------------- the stage


def _needed_stats(config, plan: WidthPlan) -> list[str]:
    """The Linears whose inputs score the units to cut: o_proj's for heads, down_proj's for MLP channels."""
    channels, heads, _ = config_widths(config)
    return [name for name, cut in ((OUTPUT, plan.heads < heads), (DOWN, plan.channels < channels)) if cut]


def cut_widths(model, plan: WidthPlan, windows, gqa: str = "within_groups", description: str = "prune_width"):
    """Cut every decoder layer of `model` (in place) to `plan`'s widths, each layer scored on `windows` as they reach
    it through the layers already cut (one calibration walk), and write the widths into its config."""
    config = model.config
    names = _needed_stats(config, plan)
    _, _, kv_heads_before = config_widths(config)
    head_dim = attention_head_dim(config)
    changes = width_config_changes(config, plan.channels, plan.heads, plan.kv_heads)

    def cut_layer(index: int, layer: nn.Module, inputs) -> None:
        stats = observe_layer(layer, inputs, names)
        if DOWN in stats:
            scores = output_contribution(layer.get_submodule(DOWN), stats[DOWN])
            keep_mlp_channels(layer, top_sorted(scores, plan.channels))
        if OUTPUT in stats:
            head_scores = output_contribution(layer.get_submodule(OUTPUT), stats[OUTPUT])
            head_scores = head_scores.view(-1, head_dim).sum(dim=1)
            query, kv = heads_to_keep(head_scores, kv_heads_before, plan, gqa)
            keep_attention_heads(layer, query, kv)

    if names:
        walk_layers(model, windows, cut_layer, description=description)
    set_widths(config, changes)
    return model


@register_stage("prune_width", WidthOptions, produces=frozenset({RESHAPED}))
@torch.no_grad()
def prune_width(model, options: WidthOptions, context):
    """Remove the least important MLP channels and attention heads (Wanda-style scores); a smaller dense model."""
    require_materialized(model, "width pruning")
    config = model.config
    plan = plan_widths(config, options)
    params_before = count_parameters(model)
    channels_before, heads_before, kv_heads_before = config_widths(config)
    head_dim = attention_head_dim(config)
    # calibration windows only when a unit is scored (a plan that cuts nothing only rewrites the config)
    windows = context.calibration.windows(model, context.notes) if _needed_stats(config, plan) else None
    cut_widths(model, plan, windows, options.gqa)
    context.notes.append(
        f"prune_width: kept {plan.channels} of {channels_before} MLP channels, {plan.heads} of {heads_before} "
        f"query heads and {plan.kv_heads} of {kv_heads_before} KV heads in every layer (gqa: {options.gqa}; "
        f"head_dim {head_dim}); scores |W|·‖X‖ summed over what each channel/head writes through down_proj/o_proj"
    )
    context.notes.append(
        f"prune_width: the model is genuinely smaller: {count_parameters(model):,} parameters (was "
        f"{params_before:,}); smaller dense matrices, so the speed and memory gains the report measures are real"
    )
    return model
