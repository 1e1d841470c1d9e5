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

from typing import Iterator, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.lowrank.factorize import rank_from_options
from slimlm.modules import MLP_PROJECTIONS, decoder_layers
from slimlm.quantize.stage import TARGETS
from slimlm.registry import MethodRegistry, StageOptions, register_stage

# method name -> function(model, options, context) that factorizes or compensates the targets in place
LOWRANK_METHODS = MethodRegistry()
# Targets when the recipe names none: factorizing attention projections costs far more quality per parameter saved
# than the wide MLP matrices, whereas a compensation only adds a correction, so EoRA goes everywhere.
DEFAULT_TARGETS = {"svd": [name.rsplit(".", 1)[-1] for name in MLP_PROJECTIONS], "eora": list(TARGETS)}


register_lowrank_method = LOWRANK_METHODS.register


class LowRankOptions(StageOptions):
    method: Literal["svd", "eora"] = "svd"
    rank: int | None = Field(None, ge=1)
    rank_ratio: float | None = Field(None, gt=0, le=1)  # fraction of min(in, out) of each matrix
    energy: float | None = Field(None, gt=0, le=1)  # svd only: fraction of ‖W‖_F² the kept singular values hold
    targets: list[str] | None = None  # projection names (q_proj ... down_proj); None: the method's default

    @field_validator("energy")
    @classmethod
    def _energy_is_for_svd(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("method") == "eora":
            raise ValueError("svd only: eora approximates a compression error, not a weight; give rank or rank_ratio")
        return value

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        unknown = [name for name in value if name not in TARGETS]
        problem = f"unknown projection {', '.join(map(repr, unknown))}" if unknown else (
            "name at least one projection, or leave it out for the method's default" if not value else None)
        if problem:
            raise ValueError(f"{problem}; known: {', '.join(TARGETS)}")
        return value

    @model_validator(mode="after")
    def _one_rank_rule(self):
        given = [name for name in ("rank", "rank_ratio", "energy") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of rank, rank_ratio, energy (got {', '.join(given) or 'none'})")
        return self

    def rank_rule(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        if self.rank_ratio is not None:
            return f"rank_ratio {self.rank_ratio} of min(in, out)"
        return f"energy {self.energy} of ‖W‖_F²"

    def layer_targets(self) -> list[str]:
        """The targets as names inside a decoder layer (``mlp.up_proj``), in execution order."""
        chosen = set(self.targets or DEFAULT_TARGETS[self.method])
        return [TARGETS[short] for short in TARGETS if short in chosen]


def target_modules(model: nn.Module, options: LowRankOptions) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, decoder layer, name inside the layer, module) of every target, whatever the module's type."""
    for index, layer in enumerate(decoder_layers(model)):
        for name in options.layer_targets():
            yield f"model.layers.{index}.{name}", layer, name, layer.get_submodule(name)


def checked_rank(name: str, shape: torch.Size, options: LowRankOptions,
                 singular_values: torch.Tensor | None = None) -> int:
    """The options' rank for a matrix [out, in]; more than min(in, out) is an error naming the module."""
    out_features, in_features = shape
    full = min(out_features, in_features)
    rank = rank_from_options(singular_values, full, options.rank, options.rank_ratio, options.energy)
    if rank > full:
        raise SlimlmError(f"lowrank.rank: {rank} exceeds the full rank {full} of {name} ({out_features} outputs × "
                          f"{in_features} inputs); use at most {full}, or a rank_ratio")
    return rank


def check_finite(name: str, options: LowRankOptions, what: str, *tensors: torch.Tensor) -> None:
    """`what` ("the factors", "the weight", ...) of module `name` must hold no NaN/Inf."""
    if not all(torch.isfinite(tensor).all() for tensor in tensors):
        raise SlimlmError(f"lowrank ({options.method}): {what} of {name} are not finite (NaN/Inf); check its weights "
                          "and calibration data")


def rank_summary(options: LowRankOptions, ranks: list[int]) -> str:
    """The rank rule and, when it is not a fixed rank, the ranks it gave ("rank_ratio 0.5 of min(in, out): 32")."""
    if options.rank is not None:
        return options.rank_rule()
    spread = f"{ranks[0]}" if min(ranks) == max(ranks) else f"{min(ranks)}–{max(ranks)}"
    return f"{options.rank_rule()}: rank {spread}"


@register_stage("lowrank", LowRankOptions)
def lowrank(model, options: LowRankOptions, context):
    """Low-rank factors: truncated SVD of decoder Linears, or EoRA compensation of their compression error."""
    LOWRANK_METHODS[options.method](model, options, context)
    return model
