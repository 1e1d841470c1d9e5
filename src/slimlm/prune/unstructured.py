"""The `prune` stage: unstructured and N:M sparsity from per-weight importance scores.

A pruning method is a function ``prune(model, options, context)`` registered in `PRUNE_METHODS` with its options
model (`PruneOptions`, or a subclass adding the method's own settings, as SparseGPTOptions): magnitude needs no
calibration data, Wanda and SparseGPT walk the calibration windows layer by layer (wanda.py, sparsegpt.py). How much
each decoder layer is pruned is the allocation's business (`ALLOCATIONS`): the same target everywhere, or OWL's
outlier-weighted sparsities (owl.py); every method asks `layer_sparsities` and prunes each matrix of layer l to the
l-th value. Masks are applied in place (weights set to zero): dense kernels gain no speed from this, the report
counts the size a sparse storage format would take.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from slimlm.modules import decoder_layers, layer_linears
from slimlm.prune.masks import nm_mask, parse_pattern, unstructured_mask
from slimlm.registry import DENSE, TIED, MethodRegistry, StageOptions, register_stage
from slimlm.streaming import require_materialized

# method name -> function(model, options, context) that prunes the model in place
PRUNE_METHODS = MethodRegistry()
# allocation name -> function(model, options, context) -> sparsity of each decoder layer
ALLOCATIONS = MethodRegistry()
register_prune_method = PRUNE_METHODS.register
register_allocation = ALLOCATIONS.register


class PruneOptions(StageOptions):
    """Options of every pruning method (magnitude and Wanda have no others; sparsegpt.py adds its own)."""

    method: Annotated[str, AfterValidator(PRUNE_METHODS.check)] = "magnitude"
    sparsity: float = Field(0.5, ge=0, lt=1)
    pattern: str = "unstructured"
    allocation: Literal["uniform", "owl"] = "uniform"
    # OWL settings, only with allocation: owl: a score is an outlier above owl_threshold × its layer's mean score,
    # and layer sparsities spread over about target ± owl_lambda
    owl_threshold: float = Field(5.0, gt=0)
    owl_lambda: float = Field(0.08, ge=0, lt=0.5)

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

    # Field validators that look at earlier fields (info.data) so that the error names the field at fault;
    # an earlier field that failed its own validation is absent from info.data and is reported on its own.
    @field_validator("allocation")
    @classmethod
    def _owl_needs_unstructured(cls, value: str, info: ValidationInfo) -> str:
        pattern = info.data.get("pattern", "unstructured")
        if value == "owl" and pattern != "unstructured":
            raise ValueError(f"owl allocates unstructured sparsity only; N:M ({pattern}) is the same in every layer")
        return value

    @field_validator("owl_threshold", "owl_lambda")
    @classmethod
    def _owl_settings_need_owl(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("allocation", "owl") != "owl":  # runs only when the recipe sets the field
            raise ValueError("only with allocation: owl")
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


def layer_sparsities(model, options: PruneOptions, context) -> list[float]:
    """The sparsity every matrix of each decoder layer is pruned to, as the options' allocation decides."""
    return ALLOCATIONS[options.allocation](model, options, context)


@register_allocation("uniform")
def uniform_allocation(model, options: PruneOptions, context) -> list[float]:
    return [options.sparsity] * len(decoder_layers(model))


@register_prune_method("magnitude")
@torch.no_grad()
def magnitude_prune(model, options: PruneOptions, context) -> None:
    """Drop the smallest |W| of every decoder Linear (each matrix on its own, at its layer's sparsity)."""
    require_materialized(model, "magnitude pruning")
    sparsities = layer_sparsities(model, options, context)
    for index, layer in enumerate(decoder_layers(model)):
        for linear in layer_linears(layer).values():
            weight = linear.weight.data
            apply_mask(weight, weight.abs().float(), options, per_row=False, sparsity=sparsities[index])


@register_stage("prune", PruneOptions, PRUNE_METHODS, accepts=frozenset({DENSE, TIED}))
def prune(model, options: PruneOptions, context):
    """Unstructured or N:M pruning of every decoder Linear (magnitude, Wanda, SparseGPT; uniform or OWL sparsity)."""
    PRUNE_METHODS[options.method](model, options, context)
    context.notes.append(
        f"{options.pattern} sparsity {options.sparsity:.0%} of decoder Linear weights ({options.method}, "
        f"{options.allocation} allocation): weights are zeroed in a dense tensor, so dense kernels run no faster and "
        "the dense file is no smaller; speed needs sparse kernels, size a sparse storage format (params_nonzero "
        "shows what such a format would keep)."
    )
    return model
