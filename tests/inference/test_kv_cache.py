"""KIVI's quantized KV cache on tiny models: closeness to the full cache by bit width, memory accounting, the
full-precision tail, KIVI's axes (keys per channel, values per token), generate, bad options."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import build_tiny_llama
from slimlm.errors import SlimlmError
from slimlm.inference.kv_cache import KiviCache, KiviLayer, cache_bytes, pack_codes, unpack_codes

VOCAB = 300
GROUP, RESIDUAL = 8, 8  # the tiny model's head_dim is 16


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama(VOCAB)


def stream_logits(model, ids: torch.Tensor, cache, chunk: int = 4) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat(
            [model(ids[None, s : s + chunk], past_key_values=cache).logits[0] for s in range(0, len(ids), chunk)]
        )


def tokens(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def test_logit_error_grows_as_bits_shrink_and_int8_stays_close(model):
    ids = tokens(96)
    full = stream_logits(model, ids, DynamicCache(config=model.config))
    errors = {}
    for bits in (8, 4, 2):
        cache = KiviCache(model.config, bits=bits, group_size=GROUP, residual_length=RESIDUAL)
        logits = stream_logits(model, ids, cache)
        assert torch.isfinite(logits).all()
        assert cache.layers[0].quantized_length >= 96 - RESIDUAL - GROUP  # most of the history was quantized
        errors[bits] = (logits - full).abs().max().item()
    # stated tolerance: int8 moves no logit by more than 2e-3 (logits here span about ±1)
    assert errors[8] < 2e-3
    assert errors[8] < errors[4] < errors[2]


def test_memory_is_the_packed_codes_plus_float16_scales_plus_the_tail(model):
    cache = KiviCache(model.config, bits=4, group_size=GROUP, residual_length=RESIDUAL)
    stream_logits(model, tokens(61), cache, chunk=61)
    layers, heads, head_dim = 2, 2, 16
    quantized = 61 - RESIDUAL - (61 - RESIDUAL) % GROUP  # 48: whole groups with R newer tokens
    assert cache.layers[0].quantized_length == quantized
    expected_codes = layers * 2 * heads * quantized * head_dim * 4 // 8
    key_stats = heads * (quantized // GROUP) * head_dim  # per channel, per group of tokens
    value_stats = heads * quantized * (head_dim // GROUP)  # per token, per group of channels
    expected_scales = layers * 2 * (key_stats + value_stats) * 2  # scale and minimum, float16
    expected_full = layers * 2 * heads * (61 - quantized) * head_dim * 4  # float32 tail
    assert cache_bytes(cache) == {"codes": expected_codes, "scales": expected_scales, "full": expected_full}
    dense = DynamicCache(config=model.config)
    stream_logits(model, tokens(61), dense, chunk=61)
    assert cache_bytes(dense) == {"codes": 0, "scales": 0, "full": layers * 2 * heads * 61 * head_dim * 4}


def test_recent_tokens_stay_full_precision(model):
    ids = tokens(70)
    cache = KiviCache(model.config, bits=2, group_size=GROUP, residual_length=RESIDUAL)
    dense = DynamicCache(config=model.config)
    stream_logits(model, ids, cache, chunk=1)
    stream_logits(model, ids, dense, chunk=1)
    tail = cache.layers[0].keys.shape[-2]
    assert RESIDUAL <= tail < RESIDUAL + GROUP
    # layer 0's keys and values depend on the tokens alone, so both caches computed the same ones
    assert torch.equal(cache.layers[0].keys, dense.layers[0].keys[:, :, -tail:])
    assert torch.equal(cache.layers[0].values, dense.layers[0].values[:, :, -tail:])
    assert cache.get_seq_length() == 70


@pytest.mark.parametrize("chunk", [1, 3, 70])
def test_sinks_keep_the_first_tokens_full_precision(model, chunk):
    ids = tokens(70)
    cache = KiviCache(model.config, bits=2, group_size=GROUP, residual_length=RESIDUAL, sinks=4)
    dense = DynamicCache(config=model.config)
    stream_logits(model, ids, cache, chunk=chunk)
    stream_logits(model, ids, dense, chunk=chunk)
    layer = cache.layers[0]
    assert torch.equal(layer.sink_keys, dense.layers[0].keys[:, :, :4])
    assert torch.equal(layer.sink_values, dense.layers[0].values[:, :, :4])
    assert 4 + layer.quantized_length + layer.keys.shape[-2] == 70
    tail_and_sinks = 2 * 2 * 2 * (4 + layer.keys.shape[-2]) * 16 * 4  # layers × (K, V) × heads × tokens × D × fp32
    assert cache_bytes(cache)["full"] == tail_and_sinks


def test_keys_are_quantized_per_channel_and_values_per_token():
    layer = KiviLayer(bits=4, group_size=8, residual_length=0)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 8, 16, generator=generator)
    values = torch.randn(1, 1, 8, 16, generator=generator)
    keys[..., 0] *= 1000  # an outlier channel, as keys have
    values[..., 0, :] *= 1000  # an outlier token
    layer.update(keys, values)
    restored_keys, restored_values = layer.update(keys[:, :, :0], values[:, :, :0])  # the stored, dequantized
    # every ordinary channel of the keys and token of the values keeps a 4-bit grid over its own range: the
    # outlier does not widen it (it would, 1000-fold, on the other axis)
    key_range = keys.amax(dim=2, keepdim=True) - keys.amin(dim=2, keepdim=True)  # per channel, over the tokens
    value_groups = values.view(1, 1, 8, 2, 8)
    value_range = (value_groups.amax(-1, keepdim=True) - value_groups.amin(-1, keepdim=True)).expand(-1, -1, -1, -1, 8)
    tolerance = 0.5 / 15 * 1.01  # half a 4-bit step, plus float16 rounding of the scale
    assert ((restored_keys - keys).abs() <= key_range * tolerance)[..., 1:].all()
    value_error = (restored_values - values).abs().view(1, 1, 8, 2, 8)
    assert (value_error <= value_range * tolerance)[:, :, 1:].all()


def test_generate_uses_the_cache(model):
    prompt = tokens(12)[None]
    greedy = {"max_new_tokens": 30, "do_sample": False}
    reference = model.generate(prompt, past_key_values=DynamicCache(config=model.config), **greedy)
    roomy = KiviCache(model.config, bits=2, group_size=GROUP, residual_length=64)  # nothing old enough to quantize
    assert torch.equal(model.generate(prompt, past_key_values=roomy, **greedy), reference)
    tight = KiviCache(model.config, bits=4, group_size=GROUP, residual_length=RESIDUAL)
    out = model.generate(prompt, past_key_values=tight, **greedy)
    assert out.shape == reference.shape
    assert tight.get_seq_length() == 41  # 12 + 30 tokens, the last one not fed back
    assert tight.layers[0].quantized_length >= 41 - RESIDUAL - GROUP


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_pack_and_unpack(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 16), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"bits": 3}, "bits=3"),
        ({"group_size": 5}, "group_size=5"),
        ({"group_size": 8, "residual_length": -1}, "-1"),
        ({"group_size": 8, "sinks": -2}, "sinks=-2"),
    ],
)
def test_bad_options_name_the_field(model, options, field):
    with pytest.raises(SlimlmError, match=field):
        KiviCache(model.config, **options)
