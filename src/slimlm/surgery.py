"""Layer surgery for structured pruning: models that are genuinely smaller, dense, and reload with transformers.

Three operations, each keeping the modules, their attributes and the config consistent with one another, so that
``save_pretrained`` → ``AutoModelForCausalLM.from_pretrained`` rebuilds the same network and the KV cache still finds
every layer:

- `remove_decoder_layers`: delete decoder layers, renumber every ``layer_idx`` (the KV cache slot of a layer), and
  shrink ``num_hidden_layers`` and per-layer config lists (``layer_types``).
- `keep_mlp_channels`: keep some intermediate channels of a layer's MLP (gate/up rows, down columns).
- `keep_attention_heads`: keep some query heads (q rows, o columns) and KV heads (k/v rows) of a layer's attention.

Which Linears hold a channel or a head is modules.py's knowledge. Width changes are per layer; `set_widths` writes
the matching config (modules.width_config_changes) once every layer has the same widths.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from slimlm.modules import (
    ATTENTION,
    KV_HEAD_ROWS,
    MLP,
    MLP_CHANNEL_COLUMNS,
    MLP_CHANNEL_ROWS,
    QUERY_HEAD_COLUMNS,
    QUERY_HEAD_ROWS,
    decoder_layers,
    kv_head_count,
    set_head_counts,
)

# Config fields holding one entry per decoder layer (Qwen2/Mistral-style sliding-window layouts in transformers 5.x).
PER_LAYER_CONFIG_FIELDS = ("layer_types",)


def _as_index(indices: Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long, device=device)


@torch.no_grad()
def slice_linear(
    linear: nn.Linear,
    rows: Sequence[int] | torch.Tensor | None = None,
    cols: Sequence[int] | torch.Tensor | None = None,
) -> nn.Linear:
    """A new, smaller nn.Linear holding only the chosen output rows and/or input columns (same dtype and device).

    Rows select outputs (and bias entries); columns select inputs, whose bias is unaffected.
    """
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        index = _as_index(rows, weight.device)
        weight = weight.index_select(0, index)
        bias = bias.index_select(0, index) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, _as_index(cols, weight.device))
    smaller = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    smaller.weight.copy_(weight)
    if bias is not None:
        smaller.bias.copy_(bias)
    smaller.weight.requires_grad_(linear.weight.requires_grad)
    return smaller


def head_dims(heads: Iterable[int], head_dim: int) -> torch.Tensor:
    """The feature indices (rows of q/k/v, columns of o) of the given heads, in head order."""
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


# ---------------------------------------------------------------- depth


def renumber_layers(model: nn.Module) -> None:
    """Set every ``layer_idx`` attribute inside decoder layer i to i: the KV cache is indexed by it."""
    for index, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index


def remove_decoder_layers(model: nn.Module, remove: Iterable[int]) -> list[int]:
    """Delete the given decoder layers in place; returns the original indices of the layers kept, in order."""
    layers = decoder_layers(model)
    remove = set(remove)
    if not remove <= set(range(len(layers))):
        raise IndexError(f"layers {sorted(remove)} are not all among the model's {len(layers)} layers")
    kept = [index for index in range(len(layers)) if index not in remove]
    if not kept:
        raise ValueError("removing every decoder layer leaves no model")
    model.model.layers = nn.ModuleList(layers[index] for index in kept)
    renumber_layers(model)
    config = model.config
    for name in PER_LAYER_CONFIG_FIELDS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == config.num_hidden_layers:
            setattr(config, name, [values[index] for index in kept])
    # The model's forward runs layers[:num_hidden_layers]; the cache sizes itself from it too.
    config.num_hidden_layers = len(kept)
    return kept


# ---------------------------------------------------------------- width


def _keep_units(
    layer: nn.Module, units: Sequence[int] | torch.Tensor, rows: tuple[str, ...], cols: tuple[str, ...] = ()
) -> None:
    """Replace the named Linears of the layer: `rows` keep only these output rows, `cols` these input columns."""
    for name in rows:
        layer.set_submodule(name, slice_linear(layer.get_submodule(name), rows=units))
    for name in cols:
        layer.set_submodule(name, slice_linear(layer.get_submodule(name), cols=units))


def keep_mlp_channels(layer: nn.Module, channels: Sequence[int] | torch.Tensor) -> None:
    """Keep only these intermediate channels of a decoder layer's gated MLP: rows of gate/up, columns of down."""
    _keep_units(layer, channels, MLP_CHANNEL_ROWS, MLP_CHANNEL_COLUMNS)
    mlp = layer.get_submodule(MLP)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)


def keep_attention_heads(layer: nn.Module, query_heads: Sequence[int], kv_heads: Sequence[int]) -> None:
    """Keep these query heads (q rows, o columns) and KV heads (k/v rows) of a decoder layer, given in order.

    Query head h attends with KV head h // (heads per group), so the kept query heads must be whole, equal-sized
    groups laid out in the order of the kept KV heads; the per-module head counts follow.
    """
    attention = layer.get_submodule(ATTENTION)
    if len(query_heads) % len(kv_heads):
        raise ValueError(f"{len(query_heads)} query heads cannot share {len(kv_heads)} KV heads equally")
    if len(kv_heads) < kv_head_count(layer):
        _keep_units(layer, head_dims(kv_heads, attention.head_dim), KV_HEAD_ROWS)
    _keep_units(layer, head_dims(query_heads, attention.head_dim), QUERY_HEAD_ROWS, QUERY_HEAD_COLUMNS)
    set_head_counts(attention, len(query_heads), len(kv_heads))


def config_rejection(config, changes: dict[str, int]) -> str | None:
    """Why transformers would refuse to save or load the config with these changes (None if it accepts them).

    Its strict configs validate on save_pretrained, e.g. LlamaConfig wants hidden_size divisible by the head count
    even with an explicit head_dim."""
    trial = copy.deepcopy(config)
    set_widths(trial, changes)
    validate = getattr(trial, "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except Exception as err:  # noqa: BLE001 - any validation failure is a reason to refuse
        cause = getattr(err, "__cause__", None) or err
        return str(cause).strip().splitlines()[0]
    return None


def set_widths(config, changes: dict[str, int]) -> None:
    for name, value in changes.items():
        setattr(config, name, value)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- channel scales


@torch.no_grad()
def fold_channel_scales(producer: nn.Module, consumers: list[nn.Linear], scales: torch.Tensor) -> None:
    """Divide the producer's output channels by s and multiply the consumers' input columns by s: the function is
    unchanged (exactly, up to rounding) while each consumer's weights see the scaled columns (AWQ, SmoothQuant)."""
    if isinstance(producer, nn.Linear):
        producer.weight.div_(scales.view(-1, 1).to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias.div_(scales.to(producer.bias.dtype))
    else:  # RMSNorm / LayerNorm: the output is weight ⊙ normalised(x)
        producer.weight.div_(scales.to(producer.weight.dtype))
    for linear in consumers:
        linear.weight.mul_(scales.view(1, -1).to(linear.weight.dtype))
