"""The layer-wise calibration walk shared by pruning, quantization and low-rank compensation.

Calibration windows go through the model one decoder layer at a time: the first layer's inputs are captured once,
then for every layer a method observes it (forward hooks accumulating statistics on its Linear modules), may modify
it, and the (modified) layer produces the next layer's inputs. Peak memory is the weights plus one layer's
activations for the calibration set plus that layer's statistics, whatever the depth.

Statistics accumulate in float32 (or float64) whatever the model's dtype, on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimlm.modules import (
    MLP,
    NORM_FED_GROUPS,
    OUTPUT,
    POST_ATTENTION_NORM,
    SEQUENTIAL_SETS,
    decoder_layers,
    layer_linears,
)
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


# A visitor may change the layer; if it did not, it may return the layer's outputs it computed on the way (from a
# full pass, or the true-sequential walk below), and the walk then skips its own pass over the layer.
LayerVisitor = Callable[[int, nn.Module, LayerInputs], list[torch.Tensor] | None]


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
            outputs = visit(index, layer, inputs)
            inputs = LayerInputs(outputs if outputs is not None else run_layer(layer, inputs), inputs.kwargs)
            if stream is not None:
                stream.release(index)
            advance(description=f"{description} (layer {index + 1}/{len(layers)})")


class InputStats:
    """Statistics of a Linear's inputs per input channel: with `hessian`, the XᵀX Hessian (SparseGPT/GPTQ/EoRA),
    whose diagonal is the squared norm; without, the squared norm and the absolute maximum (Wanda/OWL,
    SmoothQuant). One matmul per batch, accumulated in `dtype` (float32 unless asked) whatever the activations'."""

    def __init__(self, in_features: int, device, hessian: bool, dtype: torch.dtype = torch.float32):
        self.count = 0
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device) if hessian else None
        self.sq_norm = None if hessian else torch.zeros(in_features, dtype=dtype, device=device)
        self.abs_max = None if hessian else torch.zeros(in_features, dtype=dtype, device=device)  # max |X_j|

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.dtype if self.xtx is not None else self.sq_norm.dtype)
        self.count += x.shape[0]
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
            return
        self.sq_norm += (x * x).sum(dim=0)
        self.abs_max = torch.maximum(self.abs_max, x.abs().amax(dim=0))

    def channel_norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens, per input channel j."""
        return (self.xtx.diagonal() if self.xtx is not None else self.sq_norm).sqrt()

    def hessian(self, release: bool = False) -> torch.Tensor:
        """H = 2/n · XᵀX, the layer-wise reconstruction Hessian of GPTQ/SparseGPT. `release`: the statistic is not
        read again, so its XᵀX accumulator is let go (at 7B's down_proj another 11008² float32 matrix, 485 MB)."""
        hessian = self.xtx * (2.0 / max(self.count, 1))
        if release:
            self.xtx = None
        return hessian


def shared_input_groups(names: list[str]) -> list[list[str]]:
    """The names grouped by the input they read (q/k/v read the same normed hidden states, gate/up too), in
    execution order: one statistic serves a whole group."""
    groups: dict[str, list[str]] = {}
    for name in names:
        key = next((norm for norm, members in NORM_FED_GROUPS if name in members), name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _share(groups: list[list[str]], make: Callable[[str], InputStats]) -> dict[str, InputStats]:
    """One InputStats per group, under every name of the group."""
    return {name: stats for group in groups for stats in [make(group[0])] for name in group}


@contextmanager
def collect_input_stats(
    linears: dict[str, nn.Linear], hessian: bool = False, dtype: torch.dtype = torch.float32, stop: bool = False
) -> Iterator[dict[str, InputStats]]:
    """Within the block, every forward through one of `linears` adds its input to that Linear's InputStats (shared
    by the Linears reading one input). With `stop`, the forward is cut (_StopForward) once the last group has seen
    its input: the rest of the layer is not computed."""
    groups = shared_input_groups(list(linears))
    stats = _share(
        groups, lambda name: InputStats(linears[name].in_features, linears[name].weight.device, hessian, dtype)
    )
    last = groups[-1][0] if groups else None

    def observe(name: str, args) -> None:
        stats[name].add(args[0].detach())
        if stop and name == last:
            raise _StopForward

    handles = [linears[group[0]].register_forward_pre_hook(lambda _m, a, n=group[0]: observe(n, a)) for group in groups]
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
    """Input statistics of the chosen Linears over the layer's calibration inputs; the forward stops at the last
    chosen Linear's input (its outputs are not needed: the method changes the layer, which then runs again)."""
    with collect_input_stats(_chosen(layer, names), hessian, dtype, stop=True) as stats:
        for hidden in inputs.hidden:
            with suppress(_StopForward):
                layer(hidden, **inputs.kwargs)
    return stats


def observe_and_run(
    layer: nn.Module, inputs: LayerInputs, names: list[str] | None = None, hessian: bool = False
) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """Statistics and the layer's outputs from one full pass, for visitors that only measure (a visitor returning
    the outputs spares walk_layers its own pass)."""
    with collect_input_stats(_chosen(layer, names), hessian) as stats:
        outputs = run_layer(layer, inputs)
    return stats, outputs


def _chosen(layer: nn.Module, names: list[str] | None) -> dict[str, nn.Linear]:
    linears = layer_linears(layer)
    return linears if names is None else {name: linears[name] for name in names}


def _cut_at(module: nn.Module, batches: Iterable, run: Callable, sink: Callable[[torch.Tensor], None]) -> None:
    """`run(batch)` for every batch, handing `module`'s input to `sink` and cutting the computation there."""

    def capture(_module, args):
        sink(args[0].detach())
        raise _StopForward

    handle = module.register_forward_pre_hook(capture)
    try:
        for batch in batches:
            with suppress(_StopForward):
                run(batch)
    finally:
        handle.remove()


def _inputs_of(layer: nn.Module, inputs: LayerInputs, name: str) -> list[torch.Tensor]:
    """The input of submodule `name` for every batch; the layer's forward is cut there."""
    captured: list[torch.Tensor] = []
    _cut_at(layer.get_submodule(name), inputs.hidden, lambda hidden: layer(hidden, **inputs.kwargs), captured.append)
    return captured


def _shared_stats(layer: nn.Module, names: list[str], hessian: bool, dtype) -> tuple[dict[str, InputStats], Callable]:
    """One (empty) InputStats for Linears that all read one input, under each of their names, and its `add`."""
    module = layer.get_submodule(names[0])
    stats = InputStats(module.in_features, module.weight.device, hessian, dtype)
    return dict.fromkeys(names, stats), stats.add


# down_proj's inputs (MLP width) are kept for the layer's outputs up to this size, recomputed beyond it
_KEPT_MLP_BYTES = 2**30
# layer class -> whether its forward is h₂ = h + attention(norm₁(h)) ending in o_proj, out = h₂ + mlp(norm₂(h₂))
_RESIDUAL_FORM: dict[type, bool] = {}


def _mlp_block(layer: nn.Module, mid: torch.Tensor) -> torch.Tensor:
    return layer.get_submodule(MLP)(layer.get_submodule(POST_ATTENTION_NORM)(mid))


def _residual_form(layer: nn.Module, inputs: LayerInputs) -> bool:
    """Checked once per layer class, on the first batch: the decomposition gives the layer's output bit for bit."""
    kind = type(layer)
    if kind not in _RESIDUAL_FORM:
        first = LayerInputs(inputs.hidden[:1], inputs.kwargs)
        hidden, context = first.hidden[0], _inputs_of(layer, first, OUTPUT)
        mid = hidden + layer.get_submodule(OUTPUT)(context[0]) if context else None
        _RESIDUAL_FORM[kind] = mid is not None and torch.equal(mid + _mlp_block(layer, mid), run_layer(layer, first)[0])
    return _RESIDUAL_FORM[kind]


SetVisitor = Callable[[list[str], dict[str, InputStats]], None]


@torch.no_grad()
def true_sequential(
    layer: nn.Module,
    inputs: LayerInputs,
    names: Iterable[str],
    visit_set: SetVisitor,
    hessian: bool = True,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """GPTQ's true-sequential order inside one decoder layer: for each of SEQUENTIAL_SETS holding some of `names`,
    `visit_set(set_names, stats)` gets the statistics of the set's inputs as the layer computes them *after* the
    earlier sets were changed by their visits. Returns the layer's outputs after every change.

    A layer of the LLaMA form (h₂ = h + o_proj(attention context), out = h₂ + mlp(norm₂(h₂)); checked once per
    layer class) runs its attention once: o_proj's inputs are kept, h₂ and the MLP's inputs follow from them with
    the changed o_proj, gate and up. That is bit for bit the layer's own arithmetic, at about a third of the cost
    of a pass per set plus a full pass (down_proj's inputs are kept for the outputs when they take at most
    _KEPT_MLP_BYTES). Other layers get a pass per set (cut at its inputs) and a full pass.
    """
    linears = layer_linears(layer)
    wanted = set(names)
    sets = [[name for name in group if name in wanted and name in linears] for group in SEQUENTIAL_SETS]
    if not _residual_form(layer, inputs):
        for chosen in filter(None, sets):
            visit_set(chosen, observe_layer(layer, inputs, chosen, hessian, dtype))
        return run_layer(layer, inputs)
    attention_in, context_in, mlp_in, down_in = sets
    if attention_in:
        visit_set(attention_in, observe_layer(layer, inputs, attention_in, hessian, dtype))
    context = _inputs_of(layer, inputs, OUTPUT)
    if context_in:
        stats, add = _shared_stats(layer, context_in, hessian, dtype)
        for part in context:
            add(part)
        visit_set(context_in, stats)
    output_projection = layer.get_submodule(OUTPUT)
    mid = [hidden + output_projection(part) for hidden, part in zip(inputs.hidden, context, strict=True)]
    del context
    if mlp_in:
        stats, add = _shared_stats(layer, mlp_in, hessian, dtype)
        norm = layer.get_submodule(POST_ATTENTION_NORM)
        for x in mid:
            add(norm(x))
        visit_set(mlp_in, stats)
    if not down_in:
        return [x + _mlp_block(layer, x) for x in mid]
    stats, add = _shared_stats(layer, down_in, hessian, dtype)
    down = layer.get_submodule(down_in[0])
    keep = inputs.tokens * down.in_features * mid[0].element_size() <= _KEPT_MLP_BYTES
    kept: list[torch.Tensor] = []
    _cut_at(down, mid, lambda x: _mlp_block(layer, x), lambda m: (add(m), keep and kept.append(m)))
    visit_set(down_in, stats)
    if keep:  # down_proj's inputs are all the MLP computes before it: only the changed down_proj runs again
        return [x + down(m) for x, m in zip(mid, kept, strict=True)]
    return [x + _mlp_block(layer, x) for x in mid]
