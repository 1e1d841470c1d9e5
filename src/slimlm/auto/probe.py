"""The original model on a few calibration windows, kept ready to measure what one change costs.

One calibration walk (slimlm.calibrate.walk_layers) records every decoder layer's inputs, every Linear's input
Hessian H = 2/n·XᵀX (observe_and_run, shared by the Linears reading one input) and the original's log-probs.
Then `kl(weights, skip)` puts other weights into some Linears (or the embedding), skips some layers, runs the
model from the first layer touched onwards on the recorded inputs, and returns the mean KL(original ‖ changed) per
token; `output_error(name, weight)` is the layer-wise reconstruction error tr(ΔW·H·ΔWᵀ)/out of one Linear, the
GPTQ objective, computed from H alone with no forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.calibrate import LayerInputs, observe_and_run, run_layer, walk_layers
from slimlm.modules import VALUE, decoder_layers
from slimlm.value_hessian import value_hessians

EMBEDDING = "model.embed_tokens"


class Probe:
    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.model, self.windows = model, windows
        self.inputs: list[LayerInputs] = []
        self.hessians: dict[str, torch.Tensor] = {}
        self.modules = dict(model.named_modules())
        walk_layers(model, windows, self._visit, "auto: calibration walk", batch_size=windows.shape[0])
        self.final = run_layer(decoder_layers(model)[-1], self.inputs[-1])  # the last layer's outputs
        self.reference = self._log_probs(self.final)

    def _visit(self, index: int, layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
        self.inputs.append(inputs)
        return _layer_hessians(index, layer, inputs, self.hessians)

    @torch.no_grad()
    def _log_probs(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        states = torch.cat(hidden)
        logits = self.model.lm_head(self.model.model.norm(states)).float()
        return F.log_softmax(logits, dim=-1)

    @property
    def layers(self) -> int:
        return len(self.inputs)

    @property
    def tokens(self) -> int:
        return self.windows.numel()

    @torch.no_grad()
    def kl(self, weights: dict[str, torch.Tensor] | None = None, skip: frozenset[int] = frozenset()) -> float:
        """Mean KL(original ‖ changed) per token with module name -> new weight in place (an embedding change
        reaches the tied LM head too) and the decoder layers in `skip` left out."""
        weights = weights or {}
        start = min([_layer_of(name) for name in weights] + list(skip), default=self.layers)
        saved = {name: self.modules[name].weight.data for name in weights}
        try:
            for name, weight in weights.items():
                self.modules[name].weight.data = weight.to(saved[name].dtype)
            hidden = self._start_hidden(start, EMBEDDING in weights)
            for index in range(start, self.layers):
                if index not in skip:
                    hidden = run_layer(decoder_layers(self.model)[index], LayerInputs(hidden, self.inputs[0].kwargs))
            changed = self._log_probs(hidden)
        finally:
            for name, weight in saved.items():
                self.modules[name].weight.data = weight
        return float(F.kl_div(changed, self.reference, log_target=True, reduction="sum") / self.tokens)

    def _start_hidden(self, start: int, embedding_changed: bool) -> list[torch.Tensor]:
        if embedding_changed:  # LLaMA's first layer reads the embedding rows as they are (no scale)
            return [self.model.model.embed_tokens(self.windows)]
        return list(self.inputs[start].hidden) if start < self.layers else list(self.final)

    @torch.no_grad()
    def output_error(self, name: str, weight: torch.Tensor) -> float:
        """tr(ΔW·H·ΔWᵀ) / rows for Linear `name` with `weight` instead of its own."""
        delta = weight.float() - self.modules[name].weight.float()
        return float(((delta @ self.hessians[name]) * delta).sum() / delta.shape[0])


@torch.no_grad()
def _layer_hessians(
    index: int, layer: nn.Module, inputs: LayerInputs, into: dict, value_heads: bool = False
) -> list[torch.Tensor]:
    """Run one decoder layer, putting each of its Linears' input Hessian into `into` (`value_heads`: v_proj's as
    one attention-weighted Hessian per KV head, [kv_heads, in, in], where the layer allows); returns its outputs."""
    per_head = value_hessians(layer, inputs) if value_heads else None  # from the layer before it runs
    stats, outputs = observe_and_run(layer, inputs, hessian=True)
    hessians = {id(s): s.hessian() for s in stats.values()}  # one tensor per shared input
    for name, s in stats.items():
        into[f"model.layers.{index}.{name}"] = hessians[id(s)]
    if per_head is not None:
        into[f"model.layers.{index}.{VALUE}"] = per_head
    return outputs


def input_hessians(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every decoder Linear's input Hessian 2/n·XᵀX on `windows`, from one calibration walk (nothing else kept):
    the inputs GPTQ and EoRA fit to, apart from the probe's windows their error is measured on. v_proj's are per KV
    head and attention-weighted (value_hessian.py), as the gptq and eora stages fit it: with the plain Hessian, GPTQ
    of v_proj alone measured KL 0.24 on the probe against RTN's 0.087 (w4g64, SmolLM2), and the search avoided it."""
    hessians: dict[str, torch.Tensor] = {}
    walk_layers(
        model,
        windows,
        lambda index, layer, inputs: _layer_hessians(index, layer, inputs, hessians, value_heads=True),
        "auto: calibration walk (GPTQ/EoRA fitting windows)",
        batch_size=windows.shape[0],
    )
    return hessians


def _layer_of(name: str) -> int:
    """The decoder layer a module name is in; the embedding is before layer 0."""
    if name == EMBEDDING:
        return 0
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])
