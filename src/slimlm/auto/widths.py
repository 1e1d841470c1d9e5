"""MLP width as a dimension of the search (`--mlp-keep 0.83,0.67`): every decoder layer keeps the same number of MLP
channels (the config holds one width), each layer its own top channels by prune_width's scores (prune/width.py).

A width is one outer choice, like the layers removed (allocate.py): its cost is the probe's KL of the original
with every layer cut to it, measured once per width and cached; under it every MLP projection's bytes and time
scale with the channels kept (rows of gate/up, columns of down: exact when the width is a multiple of the blocks
or groups), and so is its quantization cost taken to scale (fewer channels, each rounded as before: an estimate,
checked by the real evaluation of every candidate). Widths are rounded down to a multiple of the target's step, so
that every format a projection allows at full width it allows cut (k-quants on rows of 256, groups of 128).

The cut is fitted to the windows the recipe's own prune_width stage reads (the recipe's calibration: c4, seed 1,
the GPTQ/EoRA fitting windows), so the recipe cuts the channels the search measured (in the recipe's dtype).
A cut is not recovered by `--recover` (only removed layers are distilled): its cost counts in full.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.modules import MLP_PROJECTIONS, config_widths, decoder_layers, short_name
from slimlm.prune.width import WidthPlan, cut_widths

MLP_KINDS = frozenset(short_name(name) for name in MLP_PROJECTIONS)


def width_counts(intermediate: int, fractions: Sequence[float], step: int) -> list[int]:
    """The channel counts `fractions` of `intermediate` ask for, each rounded down to a multiple of `step`; those
    that keep nothing or everything are dropped (a step above the width: none)."""
    counts = {int(fraction * intermediate) // step * step for fraction in fractions}
    return sorted((c for c in counts if 0 < c < intermediate), reverse=True)


def width_share(item_name: str, channels: int | None, intermediate: int) -> float:
    """What is left of an item's bytes, time and cost once every layer keeps `channels` MLP channels."""
    if channels is None or short_name(item_name) not in MLP_KINDS:
        return 1.0
    return channels / intermediate


class WidthCuts:
    """The widths searched (`counts`: `fractions` of the MLP rounded down to multiples of `step`) and the original
    cut to each on the recipe's calibration windows: its MLP weights for the probe, the cut model for a target's
    export."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, calibration: dict, fractions, step: int):
        self.model, self.windows, self.calibration = model, windows, calibration
        self.intermediate = config_widths(model.config)[0]
        self.counts = width_counts(self.intermediate, fractions, step)
        if not self.counts:
            raise SlimlmError(
                f"--mlp-keep {','.join(map(str, fractions))}: no width below the MLP's {self.intermediate} channels "
                f"is a multiple of {step} (the target's step: the formats the full width allows)"
            )
        self._cut: tuple[int, nn.Module] | None = None  # the last cut made: one model copy held at a time

    @classmethod
    def fitted(cls, model: nn.Module, tokenizer, calibration: dict, fractions, step: int) -> WidthCuts:
        """Cuts fitted to the windows `calibration` (a recipe's calibration: data, samples, seq_len, seed) names."""
        from slimlm.data import calibration_windows, load_text

        text = load_text(calibration["data"])
        windows = calibration_windows(
            tokenizer, text, calibration["samples"], calibration["seq_len"], calibration["seed"]
        )
        return cls(model, windows, calibration, fractions, step)

    def cut(self, channels: int) -> nn.Module:
        """A copy of the model with every layer at `channels` MLP channels (the last one made is kept: the probe
        measures the widths one after the other, and the candidates at one width are written one after another)."""
        if self._cut is None or self._cut[0] != channels:
            self._cut = None  # the previous copy goes before the next is made
            _, heads, kv_heads = config_widths(self.model.config)
            plan = WidthPlan(channels, heads, kv_heads, heads // kv_heads)
            cut = copy.deepcopy(self.model)
            with torch.no_grad():
                cut_widths(cut, plan, self.windows, description=f"auto: MLP width {channels}")
            self._cut = (channels, cut)
        return self._cut[1]

    def weights(self, channels: int) -> Callable[[], dict[str, torch.Tensor]]:
        """module name -> cut weight of every MLP projection (Probe.kl puts them in place of the original's)."""

        def found() -> dict[str, torch.Tensor]:
            layers = decoder_layers(self.cut(channels))
            return {
                f"model.layers.{index}.{name}": layer.get_submodule(name).weight.data
                for index, layer in enumerate(layers)
                for name in MLP_PROJECTIONS
            }

        return found

    def key(self, channels: int) -> str:
        """The sensitivity cache's key of a width's KL: the count and the windows it was fitted to."""
        c = self.calibration
        return f"mlp|{channels}|{c['data']}|{c['samples']}x{c['seq_len']}|seed{c['seed']}"


def width_stage(channels: int) -> dict:
    """The recipe stage that makes the cut (it reads the recipe's calibration)."""
    return {"prune_width": {"mlp_keep": channels}}
