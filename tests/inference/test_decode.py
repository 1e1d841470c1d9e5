"""The compiled static-cache decode path against the plain one: same greedy tokens, the fallback, the cache buckets."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from conftest import build_tiny_llama, run_stage
from slimlm.inference.decode import CACHE_BUCKET, COMPILED, ONEDNN_HEAD, PLAIN, Decoder, cache_length
from slimlm.storage import kernel_summary

NEW_TOKENS = 24


def varied_model(vocab_size: int, seed: int = 0):
    """A tiny model whose greedy continuation changes token from step to step: with the default 0.02 init it repeats
    one token forever, which would make "same tokens" a weak check."""
    model = build_tiny_llama(vocab_size, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def prompt(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))


def greedy(decoder: Decoder, input_ids: torch.Tensor, new_tokens: int = NEW_TOKENS):
    """(tokens, logits of every step) of a greedy continuation on `decoder`'s own cache."""
    cache = decoder.new_cache(input_ids.shape[1] + new_tokens)
    logits = [decoder.prefill(input_ids, cache)]
    tokens = [logits[-1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        logits.append(decoder.step(tokens[-1], cache))
        tokens.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)[0].tolist(), torch.cat(logits), cache


def hf_greedy(model, input_ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers' own greedy generate: the plain HF path."""
    out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, input_ids.shape[1] :].tolist()


@pytest.mark.parametrize(
    ("kind", "options", "kernel"),
    [
        ("dense", None, "dense"),
        ("W4 g32", {"method": "rtn", "bits": 4, "group_size": 32}, "int4pack"),
        ("W8 per channel", {"method": "rtn", "bits": 8, "group_size": None}, "int8pack"),
        ("W4 g32 + W8 head", {"method": "rtn", "bits": 4, "group_size": 32, "lm_head": {"bits": 8}}, "int8pack"),
    ],
)
def test_compiled_greedy_tokens_equal_the_plain_hf_path(tiny_tokenizer, kind, options, kernel):
    model = varied_model(len(tiny_tokenizer))
    if options:
        run_stage(model, "quantize", **options)
    assert kernel in kernel_summary(model)  # the packed kernels run inside the compiled graph, not a dense copy
    input_ids = prompt(len(tiny_tokenizer))
    decoder = Decoder(model)
    compiled_tokens, compiled_logits, cache = greedy(decoder, input_ids)
    plain_tokens, plain_logits, _ = greedy(Decoder(model, compile=False), input_ids)

    assert decoder.path == COMPILED and decoder.step_path(cache) == COMPILED and decoder.note == ""
    if options and "lm_head" in options:  # the packed head inside the graph on its own kernel
        assert decoder.head_kernel.startswith("int8pack") and decoder._head is None
    else:
        assert decoder.head_kernel == ONEDNN_HEAD  # the dense float32 head, after the graph
    assert isinstance(cache, StaticCache) and decoder.compile_seconds > 0
    assert len(set(plain_tokens)) > NEW_TOKENS // 3  # a continuation that moves, so equality means something
    assert plain_tokens == hf_greedy(model, input_ids)
    if kind == "dense":
        assert compiled_tokens == plain_tokens
        torch.testing.assert_close(compiled_logits, plain_logits, atol=1e-4, rtol=1e-4)
        return
    # The packed kernels compute in bfloat16, and the compiled graph may run inductor's own GEMM templates
    # (decode.INDUCTOR_OPTIONS), which sum in another order than aten's kernels: where the tiny model's best two
    # tokens are that close, greedy picks may differ. So the compiled path is fed the plain path's tokens, and every
    # step's logits must agree up to that rounding.
    forced = forced_logits(decoder, input_ids, plain_tokens)
    torch.testing.assert_close(forced, plain_logits, atol=1e-1, rtol=5e-2)


def forced_logits(decoder: Decoder, input_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The logits of every step when the decoder is fed `tokens` instead of its own picks."""
    cache = decoder.new_cache(input_ids.shape[1] + len(tokens))
    logits = [decoder.prefill(input_ids, cache)]
    for token in tokens[:-1]:
        logits.append(decoder.step(torch.tensor([[token]]), cache))
    return torch.cat(logits)


def test_a_failing_compiler_falls_back_to_the_plain_path_with_a_note(tiny_tokenizer):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler found")

    model = varied_model(len(tiny_tokenizer))
    decoder = Decoder(model, backend=broken_backend)
    tokens, _, cache = greedy(decoder, prompt(len(tiny_tokenizer)))
    assert decoder.path == PLAIN and decoder.step_path(cache) == PLAIN and isinstance(cache, DynamicCache)
    assert decoder.note.startswith("torch.compile failed (") and "no C++ compiler found" in decoder.note
    assert "\n" not in decoder.note
    assert tokens == hf_greedy(model, prompt(len(tiny_tokenizer)))


def test_a_graph_that_computes_wrong_logits_is_not_used(tiny_tokenizer):
    def skewing_backend(graph_module, example_inputs):  # compiles, but every float output comes out 1.5x
        def run(*args):
            outputs = graph_module(*args)
            return [o * 1.5 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in outputs]

        return run

    model = varied_model(len(tiny_tokenizer))
    decoder = Decoder(model, backend=skewing_backend)
    tokens, _, cache = greedy(decoder, prompt(len(tiny_tokenizer)))
    assert decoder.path == PLAIN and isinstance(cache, DynamicCache)
    assert "the compiled step's logits differ from the eager step's" in decoder.note  # tuned, then untuned
    assert tokens == hf_greedy(model, prompt(len(tiny_tokenizer)))


def test_decoding_after_the_warm_up_compiles_nothing_more(tiny_tokenizer):
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = varied_model(len(tiny_tokenizer))
    decoder = Decoder(model, backend=counting_backend)
    expected, _, _ = greedy(Decoder(model, compile=False), prompt(len(tiny_tokenizer)))
    # tokens computed outside inference mode, then inside it (measure_speed's way): one graph serves both
    assert greedy(decoder, prompt(len(tiny_tokenizer)))[0] == expected
    with torch.inference_mode():
        assert greedy(decoder, prompt(len(tiny_tokenizer)))[0] == expected
    assert len(graphs) == 1


def test_each_cache_bucket_compiles_once_and_too_many_fall_back(tiny_tokenizer):
    assert [cache_length(n) for n in (1, CACHE_BUCKET, CACHE_BUCKET + 1)] == [
        CACHE_BUCKET,
        CACHE_BUCKET,
        2 * CACHE_BUCKET,
    ]
    model = varied_model(len(tiny_tokenizer))
    decoder = Decoder(model, backend="eager")  # dynamo without inductor: the bookkeeping, in a second
    with torch._dynamo.config.patch(recompile_limit=2):  # (monkeypatch cannot restore dynamo's config options)
        decoder.new_cache(10)
        seconds = decoder.compile_seconds
        decoder.new_cache(CACHE_BUCKET)  # the same bucket: nothing compiled again
        assert decoder.compile_seconds == seconds and decoder.path == COMPILED
        decoder.new_cache(CACHE_BUCKET + 1)
        assert decoder.path == COMPILED
        cache = decoder.new_cache(3 * CACHE_BUCKET)  # a third length: dynamo would stop compiling without a word
    assert decoder.path == PLAIN and "more than 2 static cache lengths" in decoder.note
    assert isinstance(cache, DynamicCache)


def test_a_static_cache_of_an_uncompiled_length_decodes_plain(tiny_tokenizer):
    model = varied_model(len(tiny_tokenizer))
    decoder = Decoder(model, backend="eager")
    assert decoder.step_path(StaticCache(config=model.config, max_cache_len=64)) == PLAIN
    assert decoder.step_path(DynamicCache(config=model.config)) == PLAIN


def test_grouped_decode_attention_equals_transformers_sdpa_with_repeated_heads():
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from slimlm.inference.decode import grouped_decode_attention

    generator = torch.Generator().manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    key, value = (torch.randn(1, 2, 40, 16, generator=generator) for _ in range(2))
    mask = torch.zeros(1, 1, 1, 40, dtype=torch.bool)
    mask[..., :17] = True  # a static cache: the first 17 slots filled
    for queries in (1, 5):  # a decode step, and a multi-token step (transformers' own function runs)
        query = torch.randn(1, 6, queries, 16, generator=generator)
        step_mask = mask.expand(1, 1, queries, 40)
        ours, _ = grouped_decode_attention(module, query, key, value, step_mask, scaling=0.25)
        reference, _ = sdpa_attention_forward(module, query, key, value, step_mask, scaling=0.25)
        assert ours.shape == reference.shape == (1, queries, 6, 16)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_the_compiled_decoder_attends_with_grouped_heads(tiny_tokenizer):
    from slimlm.inference.decode import GROUPED_SDPA

    model = varied_model(len(tiny_tokenizer))
    assert model.config._attn_implementation == "sdpa"
    Decoder(model, compile=False)
    assert model.config._attn_implementation == "sdpa"  # the plain path leaves the model as it is
    Decoder(model)
    assert model.config._attn_implementation == GROUPED_SDPA
