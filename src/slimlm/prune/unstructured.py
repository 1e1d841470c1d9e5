"""The `prune` stage: unstructured and N:M sparsity from per-weight importance scores.

A scoring method is a function ``scores(model, options, context) -> iterator`` registered in `PRUNE_METHODS`;
magnitude needs no calibration data. Masks are applied in place (weights set to zero): dense kernels gain no speed
from this, the report counts the size a sparse storage format would take.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field, field_validator, model_validator

from slimlm.modules import named_decoder_linears
from slimlm.prune.masks import nm_mask, parse_pattern, unstructured_mask
from slimlm.registry import StageOptions, register_stage

# method name -> function(model, options, context) that prunes the model in place
PRUNE_METHODS: dict[str, Callable] = {}


def register_prune_method(name: str):
    def decorate(fn: Callable) -> Callable:
        PRUNE_METHODS[name] = fn
        return fn

    return decorate


class PruneOptions(StageOptions):
    method: str = "magnitude"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    allocation: Literal["uniform", "owl"] = "uniform"
    # Wanda/SparseGPT settings, ignored by magnitude
    blocksize: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0, lt=1)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in PRUNE_METHODS:
            raise ValueError(f"unknown method '{value}'; known: {', '.join(sorted(PRUNE_METHODS))}")
        return value

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError("must be in [0, 1)")
        return value

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        if value == "unstructured":
            return value
        try:
            n, m = parse_pattern(value)
        except ValueError:
            raise ValueError("must be 'unstructured' or N:M such as 2:4") from None
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {value}")
        return value

    @model_validator(mode="after")
    def _pattern_sets_sparsity(self):
        nm = parse_pattern(self.pattern)
        if nm is not None:
            self.sparsity = 1 - nm[0] / nm[1]
        return self


def apply_mask(weight: torch.Tensor, scores: torch.Tensor, options: PruneOptions, per_row: bool, sparsity=None):
    """Zero the weights the scores rank lowest, in the options' pattern; returns the kept-weights mask."""
    nm = parse_pattern(options.pattern)
    if nm is not None:
        mask = nm_mask(scores, *nm)
    else:
        mask = unstructured_mask(scores, options.sparsity if sparsity is None else sparsity, per_row=per_row)
    weight.mul_(mask.to(weight.dtype))
    return mask


@register_prune_method("magnitude")
@torch.no_grad()
def magnitude_prune(model, options: PruneOptions, context) -> None:
    """Drop the smallest |W| of every decoder Linear (each matrix on its own, same sparsity everywhere)."""
    for _, linear in named_decoder_linears(model):
        apply_mask(linear.weight.data, linear.weight.data.abs().float(), options, per_row=False)


@register_stage("prune", PruneOptions)
def prune(model, options: PruneOptions, context):
    """Unstructured or N:M pruning of every decoder Linear (magnitude, Wanda, SparseGPT)."""
    PRUNE_METHODS[options.method](model, options, context)
    context.notes.append(
        f"{options.pattern} sparsity {options.sparsity:.0%} of decoder Linear weights ({options.method}): weights are "
        "zeroed in a dense tensor, so dense kernels run no faster and the dense file is no smaller; speed needs "
        "sparse kernels, size a sparse storage format (see sparse_format_bytes)."
    )
    return model
