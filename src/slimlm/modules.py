"""What slimlm knows about the architecture of a supported causal LM, in one place.

Where the decoder layers are, the Linear projections of a layer and how they group (attention q/k/v/o, gated MLP
gate/up/down), which module's output each Linear reads, and the head counts and widths. Every method takes these
names from here, so a new architecture is supported in this module alone. Names are relative to a decoder layer
(``self_attn.q_proj``); recipes name projections by their last part (``q_proj``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from torch import nn

ATTENTION, MLP = "self_attn", "mlp"
QUERY, KEY, VALUE, OUTPUT = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
INPUT_NORM, POST_ATTENTION_NORM = "input_layernorm", "post_attention_layernorm"

# Projections in the order a decoder layer uses them: GPTQ's "true sequential" quantizes in this order.
ATTENTION_PROJECTIONS = (QUERY, KEY, VALUE, OUTPUT)
MLP_PROJECTIONS = (GATE, UP, DOWN)
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# recipe name ("q_proj") -> name inside a decoder layer ("self_attn.q_proj")
SHORT_NAMES = {name.rsplit(".", 1)[-1]: name for name in PROJECTIONS}
ProjectionName = Literal[tuple(SHORT_NAMES)]  # what a recipe's `targets` may list

# Linears reading the same input, in the order the layer computes them: each set's inputs are the outputs of the sets
# before it (GPTQ's true-sequential order, EoRA's).
SEQUENTIAL_SETS = ((QUERY, KEY, VALUE), (OUTPUT,), (GATE, UP), (DOWN,))
# (module whose output channels a group of Linears reads, the group): multiplying the group's input columns by s and
# dividing the producer's output channels by s leaves the layer's function unchanged (SmoothQuant, AWQ).
NORM_FED_GROUPS = ((INPUT_NORM, (QUERY, KEY, VALUE)), (POST_ATTENTION_NORM, (GATE, UP)))
LINEAR_FED_GROUPS = ((VALUE, (OUTPUT,)), (UP, (DOWN,)))

# Width pruning: the Linears whose rows (outputs) or columns (inputs) one MLP channel, query head or KV head owns.
MLP_CHANNEL_ROWS, MLP_CHANNEL_COLUMNS = (GATE, UP), (DOWN,)
QUERY_HEAD_ROWS, QUERY_HEAD_COLUMNS = (QUERY,), (OUTPUT,)
KV_HEAD_ROWS = (KEY, VALUE)
# (input width, output width) of each projection: the model's hidden size, the query heads' or KV heads' total width
# (heads × head_dim), or the MLP's intermediate size (config-level recipe checks follow them through the stages).
PROJECTION_WIDTHS = {
    QUERY: ("hidden", "query"),
    KEY: ("hidden", "kv"),
    VALUE: ("hidden", "kv"),
    OUTPUT: ("query", "hidden"),
    GATE: ("hidden", "intermediate"),
    UP: ("hidden", "intermediate"),
    DOWN: ("intermediate", "hidden"),
}


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


def layer_projections(targets: Iterable[str] | None, default: Iterable[str] | None = None) -> list[str]:
    """Recipe names (``q_proj``) as names inside a decoder layer, in execution order; None: `default` (recipe names
    too), else every projection."""
    chosen = set(targets if targets is not None else default if default is not None else SHORT_NAMES)
    return [SHORT_NAMES[short] for short in SHORT_NAMES if short in chosen]


def short_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``, the name recipes use."""
    return name.rsplit(".", 1)[-1]


# ---------------------------------------------------------------- heads and widths


def attention_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def config_widths(config) -> tuple[int, int, int]:
    """(MLP intermediate channels, query heads, KV heads) of every layer, from the config."""
    return config.intermediate_size, config.num_attention_heads, config.num_key_value_heads


def width_config_changes(
    config, intermediate_size: int | None = None, heads: int | None = None, kv_heads: int | None = None
) -> dict[str, int]:
    """Config fields for new widths. head_dim is always written: transformers derives it from hidden_size / heads
    when it is absent, which is wrong once heads are removed (SmolLM2 must keep head_dim 64 with 6 heads)."""
    changes = {"head_dim": attention_head_dim(config)}
    fields = {"intermediate_size": intermediate_size, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    changes.update({name: value for name, value in fields.items() if value is not None})
    return changes


def query_head_count(layer: nn.Module) -> int:
    """Query heads of a decoder layer's attention, from its q_proj (width pruning may have removed some)."""
    attention = layer.get_submodule(ATTENTION)
    return layer.get_submodule(QUERY).out_features // attention.head_dim


def kv_head_count(layer: nn.Module) -> int:
    attention = layer.get_submodule(ATTENTION)
    return layer.get_submodule(KEY).out_features // attention.head_dim


def set_head_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    """Write the head counts an attention module keeps as attributes: LlamaAttention reads num_key_value_groups
    (repeat_kv in eager/sdpa); other classes keep the counts too."""
    counts = {
        "num_key_value_groups": heads // kv_heads,
        "num_heads": heads,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
    }
    for name, value in counts.items():
        if hasattr(attention, name):
            setattr(attention, name, value)
