"""Streaming attention with attention sinks (StreamingLLM: Xiao et al., 2024, mit-han-lab/streaming-llm): a KV cache
that keeps the first `sinks` tokens and the last `window` tokens, so generation runs past the model's context in
constant memory. ``sinks=0`` is the plain sliding window (which collapses once the first tokens are evicted).

Positions are StreamingLLM's: inside the cache, not in the text. The reference stores keys before RoPE and rotates
the whole cache to positions 0..n−1 at every step; transformers' old SinkCache stored rotated keys and re-rotated
the kept window back by the evicted count at each eviction. Both need the query's position to be the in-cache one,
but ``generate`` (transformers 5) feeds the text position (the attention mask's cumulative sum) and the cache never
sees positions. RoPE scores depend only on the query−key distance, so this cache keeps every key rotated at its own
text position and, at each step, rotates only the sink keys forward by the number of evicted tokens: the sinks then
sit just before the window, and every query−key distance is the in-cache one whatever absolute position the caller
used (text positions from ``generate``, or `get_seq_length()` — the tokens seen — in a plain forward loop). Window
keys need no rotation at all; the sinks are rotated from their stored originals each step, so no error accumulates.

Each step attends to the stored sinks and window plus its own new tokens (a chunk of c tokens attends to at most
sinks + window + c); after the step the oldest window tokens are evicted. Unpadded batches only: with left padding
the first tokens of a row, the sinks, would be padding.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import rotate_half

from slimlm.errors import SlimlmError
from slimlm.modules import attention_head_dim

# RoPE variants whose frequencies change with the sequence length: a stored key could not be shifted by a fixed angle
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_inverse_frequencies(config) -> torch.Tensor:
    """The per-pair rotation speeds θ_i of the model's RoPE (float64), from its config."""
    parameters = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    rope_type = parameters.get("rope_type", "default")
    head_dim = attention_head_dim(config)
    if rope_type in _LENGTH_DEPENDENT_ROPE or (rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS):
        raise SlimlmError(f"sink cache: RoPE type '{rope_type}' is not supported (its frequencies are not fixed)")
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise SlimlmError("sink cache: partial rotary embeddings are not supported (partial_rotary_factor < 1)")
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        return 1.0 / parameters["rope_theta"] ** exponents
    return ROPE_INIT_FUNCTIONS[rope_type](config)[0].double()


def rotate_keys(keys: torch.Tensor, shift: int, inverse_frequencies: torch.Tensor) -> torch.Tensor:
    """Keys [..., n, head_dim] rotated by RoPE `shift` positions further (HF's rotate_half layout)."""
    angles = shift * inverse_frequencies.to(keys.device)  # float64: exact enough at any shift
    angles = torch.cat([angles, angles])
    cos, sin = angles.cos().float(), angles.sin().float()
    rotated = keys.float() * cos + rotate_half(keys.float()) * sin
    return rotated.to(keys.dtype)


class SinkLayer(DynamicLayer):
    """One layer: the first `sinks` tokens and the last `window` tokens, keys at their own text positions."""

    is_croppable = False

    def __init__(self, sinks: int, window: int, inverse_frequencies: torch.Tensor):
        super().__init__()
        self.sinks, self.window = sinks, window
        self.inverse_frequencies = inverse_frequencies
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        empty = (*key_states.shape[:2], 0, key_states.shape[-1])  # 4-D, so the length reads as 0
        self.keys, self.values = key_states.new_empty(empty), value_states.new_empty(empty)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        evicted = self.cumulative_length - self.keys.shape[-2]  # tokens between the sinks and the window
        self.cumulative_length += key_states.shape[-2]
        sinks = self.keys[:, :, : self.sinks]
        if evicted:
            sinks = rotate_keys(sinks, evicted, self.inverse_frequencies)
        keys = torch.cat([sinks, self.keys[:, :, self.sinks :], key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys = self._evict(torch.cat([self.keys, key_states], dim=-2))
        self.values = self._evict(values)
        return keys, values

    def _evict(self, states: torch.Tensor) -> torch.Tensor:
        if states.shape[-2] <= self.sinks + self.window:
            return states
        return torch.cat([states[:, :, : self.sinks], states[:, :, -self.window :]], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask compares key indices with the query's position (tokens seen): the stored keys are numbered as
        if contiguous just before the new tokens, so all of them are visible and the new ones causal."""
        stored = self.keys.shape[-2] if self.is_initialized else 0
        return stored + query_length, self.cumulative_length - stored

    def get_seq_length(self) -> int:
        """Tokens seen (what generate and the model number new tokens from), not tokens stored."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sinks + self.window

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a sink cache cannot be cropped: evicted tokens are gone")


class SinkCache(Cache):
    """StreamingLLM's cache for every decoder layer of a model with `config` (module docstring): the first `sinks`
    tokens (4, as the paper) plus the last `window` tokens; ``sinks=0`` is the sliding window alone."""

    def __init__(self, config, window: int, sinks: int = 4):
        if not isinstance(window, int) or window < 1:
            raise SlimlmError(f"sink cache window={window!r} must be a positive number of recent tokens")
        if not isinstance(sinks, int) or sinks < 0:
            raise SlimlmError(f"sink cache sinks={sinks!r} must be a number of first tokens ≥ 0")
        text_config = config.get_text_config(decoder=True)
        frequencies = rope_inverse_frequencies(text_config)
        layers = [SinkLayer(sinks, window, frequencies) for _ in range(text_config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.sinks, self.window = sinks, window
