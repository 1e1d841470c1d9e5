"""The `lowrank` stage: low-rank factors in or beside the decoder Linears.

A method is a function ``method(model, options, context)`` registered in `LOWRANK_METHODS`:

- ``svd`` (svd.py): each target Linear is replaced by its truncated SVD, two factors (`LowRankLinear`). A real size
  and FLOP reduction only when rank·(in + out) < in·out.
- ``eora`` (eora.py): each target's compression error against the original model is compensated by a rank-r
  correction computed in the eigenspace of its calibration inputs (Liu et al. 2024, EoRA), stored as two float16
  factors beside the compressed weight (`CompensatedLinear`).

The rank is one number (``rank``), a fraction of each matrix's full rank min(in, out) (``rank_ratio``), or, for svd,
the fewest singular values holding a fraction of the squared Frobenius norm (``energy``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, ClassVar

import torch
from pydantic import AfterValidator, Field, PositiveInt, model_validator
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.lowrank.factorize import rank_from_options
from slimlm.modules import MLP_PROJECTIONS, SHORT_NAMES, ProjectionName, decoder_layers, layer_projections, short_name
from slimlm.registry import DENSE, EORA, LOWRANK, MODULE_KINDS, TIED, MethodRegistry, StageOptions, register_stage

# method name -> function(model, options, context) that factorizes or compensates the targets in place
LOWRANK_METHODS = MethodRegistry()
register_lowrank_method = LOWRANK_METHODS.register


class LowRankTargets(StageOptions):
    """What every low-rank method takes: the method, one rank rule, and the projections it works on."""

    # the rank rules a method accepts, exactly one of which a recipe sets
    RANK_RULES: ClassVar[tuple[str, ...]] = ("rank", "rank_ratio")
    # recipe names of the projections the method works on when the recipe names none
    DEFAULT_TARGETS: ClassVar[tuple[str, ...]] = tuple(SHORT_NAMES)

    method: Annotated[str, AfterValidator(LOWRANK_METHODS.check)] = "svd"
    rank: PositiveInt | None = None
    rank_ratio: float | None = Field(None, gt=0, le=1)  # fraction of min(in, out) of each matrix
    targets: list[ProjectionName] | None = Field(None, min_length=1)  # None: the method's DEFAULT_TARGETS

    @model_validator(mode="after")
    def _one_rank_rule(self):
        given = [name for name in self.RANK_RULES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(self.RANK_RULES)} (got {', '.join(given) or 'none'})")
        return self

    def rank_rule(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        if self.rank_ratio is not None:
            return f"rank_ratio {self.rank_ratio} of min(in, out)"
        return f"energy {getattr(self, 'energy', None)} of ‖W‖_F²"

    def layer_targets(self) -> list[str]:
        """The targets as names inside a decoder layer (``mlp.up_proj``), in execution order."""
        return layer_projections(self.targets, self.DEFAULT_TARGETS)


class LowRankOptions(LowRankTargets):
    """svd's options (the default method)."""

    RANK_RULES = ("rank", "rank_ratio", "energy")
    # factorizing attention projections costs far more quality per parameter saved than the wide MLP matrices
    DEFAULT_TARGETS = tuple(short_name(name) for name in MLP_PROJECTIONS)

    energy: float | None = Field(None, gt=0, le=1)  # fraction of ‖W‖_F² the kept singular values hold


def target_modules(model: nn.Module, options: LowRankTargets) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, decoder layer, name inside the layer, module) of every target, whatever the module's type."""
    for index, layer in enumerate(decoder_layers(model)):
        for name in options.layer_targets():
            yield f"model.layers.{index}.{name}", layer, name, layer.get_submodule(name)


def checked_rank(
    name: str, shape: torch.Size, options: LowRankTargets, singular_values: torch.Tensor | None = None
) -> int:
    """The options' rank for a matrix [out, in]; more than min(in, out) is an error naming the module."""
    out_features, in_features = shape
    full = min(out_features, in_features)
    energy = getattr(options, "energy", None)  # svd only
    rank = rank_from_options(singular_values, full, options.rank, options.rank_ratio, energy)
    if rank > full:
        raise SlimlmError(
            f"lowrank.rank: {rank} exceeds the full rank {full} of {name} ({out_features} outputs × "
            f"{in_features} inputs); use at most {full}, or a rank_ratio"
        )
    return rank


def check_finite(name: str, options: LowRankTargets, what: str, *tensors: torch.Tensor) -> None:
    """`what` ("the factors", "the weight", ...) of module `name` must hold no NaN/Inf."""
    if not all(torch.isfinite(tensor).all() for tensor in tensors):
        raise SlimlmError(
            f"lowrank ({options.method}): {what} of {name} are not finite (NaN/Inf); check its weights "
            "and calibration data"
        )


def rank_summary(options: LowRankTargets, ranks: list[int]) -> str:
    """The rank rule and, when it is not a fixed rank, the ranks it gave ("rank_ratio 0.5 of min(in, out): 32")."""
    if options.rank is not None:
        return options.rank_rule()
    spread = f"{ranks[0]}" if min(ranks) == max(ranks) else f"{min(ranks)}–{max(ranks)}"
    return f"{options.rank_rule()}: rank {spread}"


# EoRA compensates whatever compressed module is there, against the original's Linear of the same name and shape;
# SVD factorizes dense weights only
@register_stage(
    "lowrank",
    LowRankOptions,
    LOWRANK_METHODS,
    needs_original_layout=lambda o: o.method == "eora",
    accepts=lambda o: MODULE_KINDS - {TIED, EORA} if o.method == "eora" else frozenset({DENSE}),
    produces=lambda o: frozenset({EORA if o.method == "eora" else LOWRANK}),
)
def lowrank(model, options: LowRankTargets, context):
    """Low-rank factors: truncated SVD of decoder Linears, or EoRA compensation of their compression error."""
    LOWRANK_METHODS[options.method](model, options, context)
    return model
