"""Where things are inside a supported causal LM: decoder layers and their Linear projections.

Every method finds layers through these helpers, so a new architecture is supported in one place.
"""

from __future__ import annotations

from torch import nn

# Projections in the order a decoder layer uses them: GPTQ's "true sequential" quantizes in this order.
ATTENTION_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_PROJECTIONS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's Linear projections by their short name (``self_attn.q_proj``...), in execution order."""
    found = dict(layer.named_modules())
    return {name: found[name] for name in PROJECTIONS if isinstance(found.get(name), nn.Linear)}


def named_decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every decoder Linear with its full name (``model.layers.3.mlp.up_proj``); the LM head is not included."""
    return [
        (f"model.layers.{index}.{name}", linear)
        for index, layer in enumerate(decoder_layers(model))
        for name, linear in layer_linears(layer).items()
    ]
