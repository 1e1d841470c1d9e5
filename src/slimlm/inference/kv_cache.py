"""A quantized KV cache as KIVI lays it out, usable by ``model.generate(past_key_values=...)`` and plain loops.

KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", jy-yuan/KIVI) quantizes
keys per channel (one scale and minimum per channel over a group of G consecutive tokens: key outliers sit in a few
fixed channels) and values per token (one scale and minimum per token over G consecutive channels), both on an
asymmetric min-max grid of b bits, and keeps the most recent tokens in full precision.

What this cache does, and where it departs from the reference:

- Tokens are quantized in whole groups of `group_size` once `residual_length` newer tokens exist, so the newest
  R..R+G−1 tokens are always full precision, keys and values alike (KIVI keeps 0..R−1 keys and exactly R values
  full; its keys are quantized R at a time). A quantized group is final: it is never re-quantized. transformers'
  own ``QuantizedCache`` (quanto/HQQ backends; they install and run on this CPU only by hand, outside the project's
  dependencies) re-quantizes the whole history from its dequantized values at every flush, which compounds rounding
  error, groups keys and values along the same axis, and offers no 8-bit grid with quanto.
- Codes are bit-packed (8/b per byte, b ∈ {2, 4, 8}); scales and minima are float16, as KIVI keeps them.
- Attention runs on the dequantized history (no fused low-bit attention kernel on CPU): between steps only codes,
  scales and the full-precision tail are held; each layer's attention expands its own history for the step.
- ``sinks`` (default 0: KIVI has none) keeps the first tokens in full precision too, StreamingLLM's attention
  sinks. SmolLM2's upper layers send 35–65 % of their attention to the first token; quantizing it is much of the
  4- and 2-bit error on this model (benchmarks/kv_cache.py measures both).
- The grid is KIVI's (a float minimum, not slimlm.quantize.grid's integer zero point), and the inference layer may
  not import slimlm.quantize anyway (pyproject's layers), hence the small quantizer here.

A chunk of several new tokens (prefill) attends to itself in full precision and to the cached history as stored;
`stream_nll` scores a long text through any cache that way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from slimlm.errors import SlimlmError
from slimlm.modules import attention_head_dim

KV_BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16


# ---------------------------------------------------------------- the grid: asymmetric min-max, packed codes


def quantize_min_max(values: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes in 0..2^b − 1 of `values`, with the float16 scale and minimum of each group along `dim` (kept as
    size 1). Codes are computed with the stored (float16) scale and minimum, so decoding reads back the nearest
    level of the grid that is actually stored."""
    values = values.float()
    low = values.amin(dim, keepdim=True).to(SCALE_DTYPE)
    scale = ((values.amax(dim, keepdim=True) - low.float()) / (2**bits - 1)).to(SCALE_DTYPE)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: any scale reads it back
    codes = torch.round((values - low.float()) / scale.float()).clamp_(0, 2**bits - 1)
    return codes.to(torch.uint8), scale, low


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit codes [..., n] -> uint8 [..., n·b/8]: 8/b codes per byte, the first in the lowest bits."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.uint8) * bits
    grouped = codes.view(*codes.shape[:-1], -1, per_byte)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: the sum is an or


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack_codes."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.view(*packed.shape[:-1], -1)


def _decode(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + low.float()


# ---------------------------------------------------------------- one layer's cache


class KiviLayer(DynamicLayer):
    """One decoder layer's keys and values: the first `sinks` tokens in full precision, quantized groups of old
    tokens, and a full-precision tail of recent ones.

    Stored, for batch B, KV heads H, head width D, Tq quantized tokens: ``key_codes``/``value_codes`` uint8
    [B, H, Tq, D·b/8]; ``key_scale``/``key_min`` float16 [B, H, Tq/G, D] (per channel, per group of G tokens);
    ``value_scale``/``value_min`` float16 [B, H, Tq, D/G] (per token, per group of G channels); ``keys``/``values``
    the tail and ``sink_keys``/``sink_values`` the first tokens, in the model's dtype."""

    is_croppable = False
    _QUANTIZED = ("key_codes", "key_scale", "key_min", "value_codes", "value_scale", "value_min")
    _FULL = ("keys", "values", "sink_keys", "sink_values")
    _STORED = _QUANTIZED + _FULL

    def __init__(self, bits: int, group_size: int, residual_length: int, sinks: int = 0):
        super().__init__()
        self.bits, self.group_size, self.residual_length, self.sinks = bits, group_size, residual_length, sinks
        self.cumulative_length = 0
        for name in (*self._QUANTIZED, "sink_keys", "sink_values"):
            setattr(self, name, None)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        empty = (*key_states.shape[:2], 0, key_states.shape[-1])  # 4-D, so the length reads as 0
        self.keys, self.values = key_states.new_empty(empty), value_states.new_empty(empty)
        self.sink_keys, self.sink_values = self.keys, self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        missing = max(0, self.sinks - self.sink_keys.shape[-2])  # the first tokens go to the sinks, never quantized
        self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :missing]], dim=-2)
        self.sink_values = torch.cat([self.sink_values, value_states[:, :, :missing]], dim=-2)
        self.keys = torch.cat([self.keys, key_states[:, :, missing:]], dim=-2)
        self.values = torch.cat([self.values, value_states[:, :, missing:]], dim=-2)
        # the step attends to the history as stored and to its own tokens in full precision; then the tail is cut
        keys, values = self._dequantized()
        keys = torch.cat([self.sink_keys, *keys, self.keys], dim=-2)
        values = torch.cat([self.sink_values, *values, self.values], dim=-2)
        self._quantize_old_tokens()
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped: its groups are quantized together")

    def reset(self) -> None:
        super().reset()
        for name in (*self._QUANTIZED, "sink_keys", "sink_values"):
            setattr(self, name, None)

    @property
    def quantized_length(self) -> int:
        return 0 if self.key_codes is None else self.key_codes.shape[-2]

    def stored_bytes(self) -> dict[str, int]:
        """Bytes held between steps: packed codes, float16 scales and minima, full-precision sinks and tail."""
        nbytes = {name: 0 if getattr(self, name) is None else getattr(self, name).nbytes for name in self._STORED}
        return {
            "codes": nbytes["key_codes"] + nbytes["value_codes"],
            "scales": sum(nbytes[name] for name in self._QUANTIZED if not name.endswith("codes")),
            "full": sum(nbytes[name] for name in self._FULL),
        }

    def _quantize_old_tokens(self) -> None:
        """Move the tail's oldest whole groups with `residual_length` newer tokens into the quantized store."""
        count = (self.keys.shape[-2] - self.residual_length) // self.group_size * self.group_size
        if count <= 0:
            return
        # the tail is copied out: a view would keep the quantized tokens' full-precision storage alive
        old_keys, self.keys = self.keys[:, :, :count], self.keys[:, :, count:].clone()
        old_values, self.values = self.values[:, :, :count], self.values[:, :, count:].clone()
        batch, heads, _, width = old_keys.shape
        group = self.group_size
        # keys per channel: statistics over each group of G tokens, for every channel
        codes, scale, low = quantize_min_max(old_keys.reshape(batch, heads, count // group, group, width), self.bits, 3)
        self._append("key", codes.view(batch, heads, count, width), scale.squeeze(3), low.squeeze(3))
        # values per token: statistics over each group of G channels, for every token
        codes, scale, low = quantize_min_max(
            old_values.reshape(batch, heads, count, width // group, group), self.bits, 4
        )
        self._append("value", codes.view(batch, heads, count, width), scale.squeeze(4), low.squeeze(4))

    def _append(self, kind: str, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> None:
        for suffix, tensor in (("codes", pack_codes(codes, self.bits)), ("scale", scale), ("min", low)):
            name = f"{kind}_{suffix}"
            stored = getattr(self, name)
            setattr(self, name, tensor if stored is None else torch.cat([stored, tensor], dim=-2))

    def _dequantized(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The quantized keys and values, read back in the model's dtype (empty lists when there are none)."""
        if self.key_codes is None:
            return [], []
        batch, heads, count, _ = self.key_codes.shape
        group = self.group_size
        codes = unpack_codes(self.key_codes, self.bits).view(batch, heads, count // group, group, -1)
        keys = _decode(codes, self.key_scale.unsqueeze(3), self.key_min.unsqueeze(3)).view(batch, heads, count, -1)
        codes = unpack_codes(self.value_codes, self.bits).view(batch, heads, count, -1, group)
        values = _decode(codes, self.value_scale.unsqueeze(4), self.value_min.unsqueeze(4)).view(
            batch, heads, count, -1
        )
        return [keys.to(self.dtype)], [values.to(self.dtype)]

    def _map_batch(self, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension operation (beam reordering, repetition) to every stored tensor."""
        for name in self._STORED:
            if getattr(self, name) is not None:
                setattr(self, name, select(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])


class KiviCache(Cache):
    """KIVI's quantized KV cache for every decoder layer of a model with `config` (module docstring).

    ``model.generate(ids, past_key_values=KiviCache(model.config, bits=2, sinks=4))``, or pass it to forward calls.
    `group_size` G (tokens per key group, channels per value group) must divide the head width; the newest
    `residual_length`..`residual_length` + G − 1 tokens and the first `sinks` tokens stay in full precision."""

    def __init__(self, config, bits: int = 4, group_size: int = 32, residual_length: int = 128, sinks: int = 0):
        check_kivi_options(config, bits, group_size, residual_length, sinks)
        text_config = config.get_text_config(decoder=True)
        layers = [KiviLayer(bits, group_size, residual_length, sinks) for _ in range(text_config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.bits, self.group_size, self.residual_length, self.sinks = bits, group_size, residual_length, sinks


def check_kivi_options(config, bits: int, group_size: int, residual_length: int, sinks: int = 0) -> None:
    if bits not in KV_BITS:
        raise SlimlmError(f"KV cache bits={bits} is not supported; use one of {', '.join(map(str, KV_BITS))}")
    head_dim = attention_head_dim(config.get_text_config(decoder=True))
    if group_size < 1 or head_dim % group_size:
        raise SlimlmError(
            f"KV cache group_size={group_size} must be a positive divisor of the model's head_dim {head_dim} "
            "(values are quantized per token in groups of group_size channels)"
        )
    if residual_length < 0:
        raise SlimlmError(f"KV cache residual_length={residual_length} must be ≥ 0 (recent tokens kept full)")
    if sinks < 0:
        raise SlimlmError(f"KV cache sinks={sinks} must be ≥ 0 (first tokens kept full)")


# ---------------------------------------------------------------- accounting and scoring through any cache


def cache_bytes(cache: Cache) -> dict[str, int]:
    """Bytes a cache holds between steps, by part: ``codes``, ``scales`` (scales and minima) and ``full``
    (tensors in the model's dtype); any Cache whose layers keep ``keys``/``values`` (Dynamic, sink) or a KiviLayer."""
    totals: Counter[str] = Counter(codes=0, scales=0, full=0)
    for layer in cache.layers:
        if isinstance(layer, KiviLayer):
            totals.update(layer.stored_bytes())
        elif layer.is_initialized:
            totals["full"] += layer.keys.nbytes + layer.values.nbytes
    return dict(totals)


@torch.inference_mode()
def stream_nll(
    model, tokens: torch.Tensor, cache: Cache, chunk: int, after_chunk: Callable[[int], None] | None = None
) -> torch.Tensor:
    """Next-token NLL (float32, one per token after the first) of a 1-D token stream fed to `model` in chunks of
    `chunk` tokens through `cache`, as a generation loop would feed it. `after_chunk(tokens_seen)` runs after each
    chunk (progress, memory readings)."""
    device = next(model.parameters()).device
    losses = []
    for start in range(0, tokens.numel(), chunk):
        piece = tokens[start : start + chunk].to(device)
        logits = model(piece.unsqueeze(0), past_key_values=cache, use_cache=True).logits[0].float()
        targets = tokens[start + 1 : start + chunk + 1].to(device)
        losses.append(F.cross_entropy(logits[: targets.numel()], targets, reduction="none").cpu())
        if after_chunk is not None:
            after_chunk(start + piece.numel())
    return torch.cat(losses)
