"""The `prune_depth` stage: remove whole decoder layers, ranked on calibration data.

Criteria (lower score = safer to remove):

- ``block_influence`` (Men et al. 2024, "ShortGPT"): BI_i = 1 − mean cos(x_i, x_{i+1}) over every calibration token,
  x_i the hidden state entering layer i (x_L leaves the last layer). The n lowest-BI layers go.
- ``angular`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): for every block of n
  consecutive layers starting at l, d(l) = mean over tokens of arccos(cos(x_l, x_{l+n}))/π; the block with the
  smallest d goes. The paper measures the last token of each prompt; we average over *every* token of the
  calibration windows (a window's last token is not the end of a prompt, and all tokens give a steadier estimate).
  This keeps n+1 layers' activations in memory instead of 2.
- ``perplexity`` (Kim et al. 2024, "Shortened LLaMA", PPL criterion): the calibration perplexity with a candidate
  removed, one full pass over the windows per candidate; one-shot ranking: candidates are scored on the unpruned
  model and not re-scored after each removal.

``block: true`` removes one contiguous run of n layers instead of the n individually lowest (angular always does);
a run's block_influence score is the sum of its layers' BIs, its perplexity score the perplexity with the whole
run removed. Hidden states come from the layer-by-layer calibration walk (slimlm.calibrate): one layer's
activations for the calibration set at a time (n+1 boundaries for angular).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveInt, ValidationInfo, field_validator, model_validator
from torch import nn

from slimlm.calibrate import LayerInputs, capture_first_layer_inputs, run_layer
from slimlm.errors import SlimlmError
from slimlm.modules import decoder_layers
from slimlm.progress import progress_bar
from slimlm.registry import MODULE_KINDS, RESHAPED, TIED, StageOptions, register_stage
from slimlm.streaming import require_materialized
from slimlm.surgery import count_parameters, remove_decoder_layers

Criterion = Literal["block_influence", "angular", "perplexity"]


class DepthOptions(StageOptions):
    remove: PositiveInt | None = None  # how many layers to remove ...
    keep_ratio: float | None = Field(None, gt=0, le=1)  # ... or the fraction of layers to keep (rounded to a count)
    criterion: Criterion = "block_influence"
    block: bool | None = None  # remove one contiguous run; None: the criterion's default (only angular is a block)
    layers: list[NonNegativeInt] | None = Field(None, min_length=1)  # ... or exactly these layers (no ranking)

    @field_validator("block")
    @classmethod
    def _angular_is_a_block(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value is False and info.data.get("criterion") == "angular":
            raise ValueError(
                "angular scores contiguous blocks of layers; use block_influence or perplexity for layers one by one"
            )
        return value

    @model_validator(mode="after")
    def _one_size(self):
        given = [self.remove is not None, self.keep_ratio is not None, self.layers is not None]
        if sum(given) != 1:
            raise ValueError(
                "give exactly one of remove (a layer count), keep_ratio (a fraction of layers) or layers (indices)"
            )
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers}: an index appears twice")
        return self

    @property
    def contiguous(self) -> bool:
        return self.block if self.block is not None else self.criterion == "angular"


def check_named_layers(layers: list[int], num_layers: int, where: str = "prune_depth") -> None:
    """`layers` (a recipe's prune_depth.layers) must be layers of a model of `num_layers` and leave at least one;
    `where`: the option's place in the recipe, for the message (preflight checks it from the config too)."""
    if max(layers) >= num_layers or len(layers) >= num_layers:
        raise SlimlmError(
            f"{where}.layers: {sorted(layers)} must name layers of the model's {num_layers} (0-{num_layers - 1}) "
            "and leave at least one"
        )


def layers_to_remove(options: DepthOptions, num_layers: int) -> int:
    """The count the options ask for on a model of `num_layers` layers; at least one layer must stay."""
    if options.layers is not None:
        check_named_layers(options.layers, num_layers)
        return len(options.layers)
    if options.remove is not None:
        if options.remove >= num_layers:
            raise SlimlmError(
                f"prune_depth.remove: {options.remove} would leave no layer of the model's "
                f"{num_layers}; must be below {num_layers}"
            )
        return options.remove
    keep = round(options.keep_ratio * num_layers)
    if keep < 1:
        raise SlimlmError(
            f"prune_depth.keep_ratio: {options.keep_ratio} keeps no layer of the model's "
            f"{num_layers}; must be at least {1 / num_layers:.3g}"
        )
    return num_layers - keep


# ---------------------------------------------------------------- hidden states at layer boundaries


def layer_boundaries(model: nn.Module, windows: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """x_0 … x_L over the calibration windows, one at a time: the hidden states entering each decoder layer, then
    those leaving the last one (before the final norm). Each is a list of per-window tensors."""
    inputs = capture_first_layer_inputs(model, windows)
    yield inputs.hidden
    layers = decoder_layers(model)
    with progress_bar("layer boundaries", total=len(layers)) as advance:
        for layer in layers:
            inputs = LayerInputs(run_layer(layer, inputs), inputs.kwargs)
            advance()
            yield inputs.hidden


TokenDistance = Callable[[torch.Tensor], torch.Tensor]  # per-token cosine similarity -> per-token distance


def one_minus_cosine(cosine: torch.Tensor) -> torch.Tensor:
    return 1 - cosine


def angular_distance(cosine: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cosine.clamp(-1, 1)) / math.pi


@torch.no_grad()
def boundary_distances(model: nn.Module, windows: torch.Tensor, gap: int, distance: TokenDistance) -> list[float]:
    """For l = 0 … L−gap: the mean over every calibration token of distance(cos(x_l, x_{l+gap}))."""
    recent: deque[list[torch.Tensor]] = deque(maxlen=gap + 1)  # x_{l}, …, x_{l+gap}
    means = []
    for boundary in layer_boundaries(model, windows):
        recent.append(boundary)
        if len(recent) == gap + 1:
            total = sum(
                distance(F.cosine_similarity(a.float(), b.float(), dim=-1)).sum().item()
                for a, b in zip(recent[0], recent[-1])
            )
            means.append(total / sum(a.shape[0] * a.shape[1] for a in recent[0]))
    return means


# ---------------------------------------------------------------- perplexity with layers skipped


class _SkippedLayer(nn.Module):
    """Stands in for a decoder layer during scoring: the residual stream passes through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def layers_skipped(model: nn.Module, indices: tuple[int, ...]) -> Iterator[None]:
    layers = decoder_layers(model)
    originals = {index: layers[index] for index in indices}
    for index in indices:
        layers[index] = _SkippedLayer()
    try:
        yield
    finally:
        for index, layer in originals.items():
            layers[index] = layer


@torch.no_grad()
def calibration_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over the windows, each window scored on its own."""
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for window in windows:
        window = window.unsqueeze(0).to(device)
        logits = model(window, use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        tokens += window.shape[1] - 1
    return math.exp(nll / tokens)


# ---------------------------------------------------------------- rankings


@dataclass
class Ranking:
    """Candidate sets of layers, each removed together, with their scores (lower = safer to remove)."""

    candidates: list[tuple[int, ...]]
    scores: list[float]
    measure: str  # what a score is, for the notes

    def lowest(self, count: int) -> list[tuple[int, ...]]:
        order = sorted(range(len(self.candidates)), key=lambda i: self.scores[i])
        return [self.candidates[i] for i in order[:count]]


def runs(num_layers: int, length: int) -> list[tuple[int, ...]]:
    """Every contiguous run of `length` layers."""
    return [tuple(range(start, start + length)) for start in range(num_layers - length + 1)]


def rank_block_influence(model, windows, count: int, contiguous: bool) -> Ranking:
    influence = boundary_distances(model, windows, gap=1, distance=one_minus_cosine)
    if not contiguous:
        return Ranking([(i,) for i in range(len(influence))], influence, "BI = 1 − mean cos(x_in, x_out)")
    candidates = runs(len(influence), count)
    return Ranking(
        candidates,
        [sum(influence[i] for i in run) for run in candidates],
        "sum over the run of BI = 1 − mean cos(x_in, x_out)",
    )


def rank_angular(model, windows, count: int, contiguous: bool) -> Ranking:
    distances = boundary_distances(model, windows, gap=count, distance=angular_distance)
    return Ranking(
        runs(len(decoder_layers(model)), count), distances, f"mean over all tokens of arccos(cos(x_l, x_l+{count}))/π"
    )


def rank_perplexity(model, windows, count: int, contiguous: bool) -> Ranking:
    num_layers = len(decoder_layers(model))
    candidates = runs(num_layers, count) if contiguous else [(i,) for i in range(num_layers)]
    scores = []
    with progress_bar("perplexity without each candidate", total=len(candidates)) as advance:
        for candidate in candidates:
            with layers_skipped(model, candidate):
                scores.append(calibration_perplexity(model, windows))
            advance()
    return Ranking(
        candidates,
        scores,
        "calibration perplexity with the candidate removed (one-shot: scored on the "
        "unpruned model, not re-scored after each removal)",
    )


RANKINGS: dict[str, Callable[..., Ranking]] = {
    "block_influence": rank_block_influence,
    "angular": rank_angular,
    "perplexity": rank_perplexity,
}


def choose_layers(ranking: Ranking, count: int, contiguous: bool) -> list[int]:
    if contiguous:
        return list(ranking.lowest(1)[0])
    return sorted(index for candidate in ranking.lowest(count) for index in candidate)


def describe_ranking(ranking: Ranking, removed: list[int]) -> str:
    scores = ", ".join(f"{_label(c)}: {s:.4g}" for c, s in zip(ranking.candidates, ranking.scores))
    return f"scores ({ranking.measure}) by candidate: {scores}; removed {removed}"


def _label(candidate: tuple[int, ...]) -> str:
    return str(candidate[0]) if len(candidate) == 1 else f"{candidate[0]}-{candidate[-1]}"


# removing layers renumbers them: cross-layer ties (recorded by layer index) would point at the wrong layers
@register_stage("prune_depth", DepthOptions, accepts=MODULE_KINDS - {TIED}, produces=frozenset({RESHAPED}))
@torch.no_grad()
def prune_depth(model, options: DepthOptions, context):
    """Remove whole decoder layers (ShortGPT block influence, angular distance, or perplexity ranking)."""
    require_materialized(model, "depth pruning")
    num_layers = len(decoder_layers(model))
    count = layers_to_remove(options, num_layers)
    if count == 0:
        context.notes.append(
            f"prune_depth: keep_ratio {options.keep_ratio} keeps all {num_layers} layers; nothing removed"
        )
        return model
    if options.layers is not None:
        removed, why = sorted(options.layers), "layers named in the recipe"
    else:
        windows = context.calibration.windows(model, context.notes)
        ranking = RANKINGS[options.criterion](model, windows, count, options.contiguous)
        removed = choose_layers(ranking, count, options.contiguous)
        why = describe_ranking(ranking, removed)
    params_before = count_parameters(model)
    kept = remove_decoder_layers(model, removed)
    # which original layers survive, across repeated depth stages: distillation maps student layers to teacher ones
    earlier = getattr(model.config, "slimlm_kept_layers", None) or list(range(num_layers))
    model.config.slimlm_kept_layers = [earlier[index] for index in kept]
    how = "named" if options.layers is not None else options.criterion
    context.notes.append(
        f"prune_depth ({how}{', contiguous block' if options.contiguous else ''}): "
        f"removed layers {removed} of {num_layers} (original numbering); {why}"
    )
    context.notes.append(
        f"prune_depth: the model is genuinely smaller: {num_layers - count} layers, "
        f"{count_parameters(model):,} parameters (was {params_before:,}); layers are gone, not "
        "zeroed, so the speed and memory gains the report measures are real"
    )
    return model
