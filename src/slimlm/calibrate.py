"""The layer-wise calibration walk shared by pruning, quantization and low-rank compensation.

Calibration windows go through the model one decoder layer at a time: the first layer's inputs are captured once,
then for every layer a method observes it (forward hooks accumulating statistics on its Linear modules), may modify
it, and the (modified) layer produces the next layer's inputs. Peak memory is the weights plus one layer's
activations for the calibration set plus that layer's statistics, whatever the depth.

Statistics accumulate in float32 (or float64) whatever the model's dtype, on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimlm.modules import decoder_layers, layer_linears
from slimlm.progress import progress_bar
from slimlm.streaming import layer_stream


class _StopForward(Exception):
    """Raised by the capturing wrapper once the first layer's inputs are recorded: the rest is not needed."""


@dataclass
class LayerInputs:
    """Hidden states entering a layer, batch by batch, plus the keyword arguments the model passes every layer."""

    hidden: list[torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


class _Capture(nn.Module):
    def __init__(self, layer: nn.Module, sink: LayerInputs):
        super().__init__()
        self.layer, self.sink = layer, sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.hidden.append(hidden_states.detach())
        if not self.sink.kwargs:
            self.sink.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        raise _StopForward


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> LayerInputs:
    """Run the embeddings (and rotary tables) on every window; stop at the first decoder layer."""
    layers = decoder_layers(model)
    sink = LayerInputs([])
    first = layers[0]
    layers[0] = _Capture(first, sink)
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            with suppress(_StopForward):
                model(windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        layers[0] = first
    return sink


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """The layer's outputs for every batch of inputs (the next layer's inputs)."""
    outputs = []
    for hidden in inputs.hidden:
        out = layer(hidden, **inputs.kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outputs


LayerVisitor = Callable[[int, nn.Module, LayerInputs], None]


def walk_layers(
    model: nn.Module, windows: torch.Tensor, visit: LayerVisitor, description: str = "calibrate", batch_size: int = 1
) -> None:
    """Call `visit(index, layer, inputs)` for every decoder layer in order; each sees the inputs produced by the
    layers before it *after* their visits (so errors of compressed layers propagate, as in GPTQ/SparseGPT)."""
    inputs = capture_first_layer_inputs(model, windows, batch_size)
    layers = decoder_layers(model)
    stream = layer_stream(model)  # a layer-streamed model holds one layer's weights at a time (streaming.py)
    with progress_bar(description, total=len(layers)) as advance:
        for index, layer in enumerate(layers):
            if stream is not None:
                stream.load(index)
            visit(index, layer, inputs)
            inputs = LayerInputs(run_layer(layer, inputs), inputs.kwargs)
            if stream is not None:
                stream.release(index)
            advance(description=f"{description} (layer {index + 1}/{len(layers)})")


class InputStats:
    """Per-Linear statistics of its inputs: squared norm and absolute maximum per input channel (Wanda/OWL,
    SmoothQuant) and, optionally, the X^T X Hessian (SparseGPT/GPTQ/EoRA)."""

    def __init__(self, in_features: int, device, hessian: bool, dtype: torch.dtype = torch.float32):
        self.count = 0
        self.sq_norm = torch.zeros(in_features, dtype=dtype, device=device)
        self.abs_max = torch.zeros(in_features, dtype=dtype, device=device)  # SmoothQuant's max |X_j|
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sq_norm.dtype)
        self.count += x.shape[0]
        self.sq_norm += (x * x).sum(dim=0)
        self.abs_max = torch.maximum(self.abs_max, x.abs().amax(dim=0))
        if self.xtx is not None:
            self.xtx += x.T @ x

    def channel_norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens, per input channel j."""
        return self.sq_norm.sqrt()

    def hessian(self) -> torch.Tensor:
        """H = 2/n · XᵀX, the layer-wise reconstruction Hessian of GPTQ/SparseGPT."""
        return self.xtx * (2.0 / max(self.count, 1))


@contextmanager
def collect_input_stats(
    linears: dict[str, nn.Linear], hessian: bool = False, dtype: torch.dtype = torch.float32
) -> Iterator[dict[str, InputStats]]:
    """Within the block, every forward through one of `linears` adds its input to that Linear's InputStats."""
    stats = {name: InputStats(lin.in_features, lin.weight.device, hessian, dtype) for name, lin in linears.items()}
    handles = [
        lin.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0].detach()))
        for name, lin in linears.items()
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def observe_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    names: list[str] | None = None,
    hessian: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, InputStats]:
    """Run the layer over its calibration inputs once and return input statistics for the chosen Linears."""
    linears = layer_linears(layer)
    if names is not None:
        linears = {name: linears[name] for name in names}
    with collect_input_stats(linears, hessian, dtype) as stats:
        run_layer(layer, inputs)
    return stats
