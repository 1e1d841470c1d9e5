"""StreamingLLM's sink cache on tiny models: identical to the full cache while everything fits, in-cache positions
past that (checked against recomputing the kept tokens from scratch), constant memory, generate, bad options."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import build_tiny_llama
from slimlm.errors import SlimlmError
from slimlm.inference.kv_cache import cache_bytes, stream_nll
from slimlm.inference.sink_cache import SinkCache

VOCAB = 300


def tokens(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def test_identical_to_the_full_cache_while_everything_fits():
    model = build_tiny_llama(VOCAB)
    ids = tokens(48)
    full = stream_nll(model, ids, DynamicCache(config=model.config), chunk=5)
    assert torch.equal(stream_nll(model, ids, SinkCache(model.config, window=44, sinks=4), chunk=5), full)


@pytest.mark.parametrize("sinks", [0, 1, 4])
def test_positions_are_in_cache_positions(sinks):
    """With one layer, keys and values depend on the token and its position only, so each step must equal a fresh
    forward over the kept tokens (sinks + window + the new token) numbered 0..n−1, as StreamingLLM defines it."""
    model = build_tiny_llama(VOCAB, layers=1)
    window, ids = 8, tokens(40)
    cache = SinkCache(model.config, window=window, sinks=sinks)
    with torch.inference_mode():
        for t in range(len(ids)):
            logits = model(ids[None, t : t + 1], past_key_values=cache).logits[0, -1]
            kept = torch.cat([ids[: min(sinks, max(t - window, 0))], ids[max(t - window, 0) : t + 1]])
            recomputed = model(kept[None]).logits[0, -1]
            torch.testing.assert_close(logits, recomputed, atol=1e-5, rtol=1e-5)


def test_memory_stays_constant_past_the_window():
    model = build_tiny_llama(VOCAB)
    cache = SinkCache(model.config, window=16, sinks=4)
    readings = []
    stream_nll(model, tokens(120), cache, chunk=8, after_chunk=lambda seen: readings.append(cache_bytes(cache)["full"]))
    per_token = 2 * 2 * 2 * 16 * 4  # layers × (K, V) × KV heads × head_dim × float32
    assert readings[-1] == 20 * per_token
    assert len(set(readings[3:])) == 1  # full from the third chunk on (24 tokens seen > 4 + 16)
    assert all(layer.keys.shape[-2] == 20 for layer in cache.layers)
    assert cache.get_seq_length() == 120  # tokens seen: what new positions are numbered from


def test_generate_runs_past_the_window_like_a_forward_loop():
    """generate numbers positions from the attention mask (text positions); a plain loop from get_seq_length();
    both must give the same greedy tokens, and the cache stays bounded."""
    model = build_tiny_llama(VOCAB)
    prompt = tokens(10)[None]
    cache = SinkCache(model.config, window=12, sinks=2)
    generated = model.generate(prompt, past_key_values=cache, max_new_tokens=40, do_sample=False)
    assert all(layer.keys.shape[-2] == 14 for layer in cache.layers)
    loop_cache, ids = SinkCache(model.config, window=12, sinks=2), prompt
    with torch.inference_mode():
        logits = model(ids, past_key_values=loop_cache).logits
        for _ in range(40):
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
            logits = model(ids[:, -1:], past_key_values=loop_cache).logits
    assert torch.equal(generated, ids)


@pytest.mark.parametrize(("options", "field"), [({"window": 0}, "window=0"), ({"window": 8, "sinks": -1}, "sinks=-1")])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(SlimlmError, match=field):
        SinkCache(build_tiny_llama(VOCAB).config, **options)


def test_rope_with_length_dependent_frequencies_is_refused():
    config = build_tiny_llama(VOCAB).config
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(SlimlmError, match="dynamic"):
        SinkCache(config, window=8)
