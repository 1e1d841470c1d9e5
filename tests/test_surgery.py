"""Layer surgery: smaller modules compute exactly what the masked originals compute, and models stay reloadable.

The helpers at the top are shared with tests/prune/test_depth.py and test_width.py.
"""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen2ForCausalLM

import conftest
from conftest import build_tiny_llama
from slimlm.models import save_model
from slimlm.surgery import (
    config_rejection,
    count_parameters,
    head_dims,
    keep_attention_heads,
    keep_mlp_channels,
    remove_decoder_layers,
    slice_linear,
)

PROMPT = torch.tensor([[5, 6, 7, 8]])


def lively(model, seed=1, std=0.15):
    """Larger random weights: a tiny model at the default init generates one token over and over, which makes
    generation comparisons meaningless."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def lively_llama(vocab_size, layers=2):
    return lively(build_tiny_llama(vocab_size, layers=layers))


def calibration(model, samples=4, seq_len=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=generator)


def run_stage(model, name, windows=None, **options):
    """A stage as the pipeline runs it (options parsed from a recipe), on given calibration windows; the stages
    tested here change the model in place."""
    return model, conftest.run_stage(model, name, calibration(model) if windows is None else windows, **options)


def greedy(model, use_cache=True, new_tokens=12):
    return model.generate(
        PROMPT, max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=model.config.pad_token_id
    )


def reloaded(model, folder):
    save_model(model, None, folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def assert_generates_like_before_saving(model, folder):
    """Greedy text with the KV cache = without it = after save_pretrained → from_pretrained."""
    expected = greedy(model, use_cache=False)
    assert torch.equal(greedy(model, use_cache=True), expected)
    again = reloaded(model, folder)
    assert torch.equal(greedy(again, use_cache=True), expected)
    return again


# ---------------------------------------------------------------- slicing Linears


def test_slice_linear_keeps_the_chosen_outputs_and_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5, bias=True)
    rows, cols = [4, 0, 2], [1, 3, 5]
    x = torch.randn(7, 6)
    by_rows = slice_linear(linear, rows=rows)
    assert (by_rows.in_features, by_rows.out_features) == (6, 3)
    torch.testing.assert_close(by_rows(x), linear(x)[:, rows])
    by_cols = slice_linear(linear, cols=cols)
    masked = x.clone()
    masked[:, [0, 2, 4]] = 0  # dropping an input = feeding it zeros
    torch.testing.assert_close(by_cols(x[:, cols]), linear(masked))
    both = slice_linear(linear.to(torch.bfloat16), rows=rows, cols=cols)
    assert both.weight.dtype == torch.bfloat16 and both.weight.shape == (3, 3)


def test_head_dims_are_the_feature_ranges_of_the_heads():
    assert head_dims([2, 0], 3).tolist() == [6, 7, 8, 0, 1, 2]


# ---------------------------------------------------------------- removing layers


class _Pass(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_removing_layers_equals_skipping_them(tiny_tokenizer, tmp_path):
    model = lively_llama(len(tiny_tokenizer), layers=4)
    skipping = copy.deepcopy(model)
    skipping.model.layers[1], skipping.model.layers[2] = _Pass(), _Pass()
    params_per_layer = count_parameters(model.model.layers[0])
    before = count_parameters(model)

    kept = remove_decoder_layers(model, [1, 2])

    assert kept == [0, 3]
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]  # KV cache slots
    assert count_parameters(model) == before - 2 * params_per_layer
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, skipping(PROMPT).logits)
    again = assert_generates_like_before_saving(model, tmp_path / "shallow")
    assert again.config.num_hidden_layers == 2
    assert json.loads((tmp_path / "shallow" / "config.json").read_text())["num_hidden_layers"] == 2


def test_removing_layers_slices_layer_types(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tiny_tokenizer),
        max_position_embeddings=512,
        use_sliding_window=True,
        sliding_window=3,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=2,
        eos_token_id=2,
        bos_token_id=1,
    )
    model = lively(Qwen2ForCausalLM(config).eval())

    remove_decoder_layers(model, [0])

    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [3, None, 3]
    again = assert_generates_like_before_saving(model, tmp_path / "qwen")
    assert again.config.layer_types == model.config.layer_types


def test_removing_every_layer_or_a_missing_one_is_refused(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer), layers=2)
    with pytest.raises(ValueError, match="no model"):
        remove_decoder_layers(model, [0, 1])
    with pytest.raises(IndexError):
        remove_decoder_layers(model, [2])


# ---------------------------------------------------------------- narrowing MLPs and attention


def test_keeping_mlp_channels_equals_zeroing_the_others(tiny_tokenizer):
    layer = lively_llama(len(tiny_tokenizer)).model.layers[0]
    mlp = layer.mlp
    masked = copy.deepcopy(mlp)
    kept = torch.arange(0, 128, 3)
    dropped = torch.ones(128, dtype=torch.bool)
    dropped[kept] = False
    with torch.no_grad():
        masked.down_proj.weight[:, dropped] = 0

    keep_mlp_channels(layer, kept)

    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (43, 43, 43)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(mlp(x), masked(x))


def _attention_output(model, x):
    layer = model.model.layers[0]
    position_ids = torch.arange(x.shape[1]).unsqueeze(0)
    position_embeddings = model.model.rotary_emb(x, position_ids)
    with torch.no_grad():
        return layer.self_attn(x, position_embeddings=position_embeddings, attention_mask=None)[0]


@pytest.mark.parametrize("query_heads, kv_heads, expected_groups", [([1, 3], [0, 1], 1), ([2, 3], [1], 2)])
def test_keeping_heads_equals_zeroing_the_others(tiny_tokenizer, query_heads, kv_heads, expected_groups):
    model = lively_llama(len(tiny_tokenizer))  # 4 query heads of 16 dims sharing 2 KV heads
    masked = copy.deepcopy(model)
    dropped = [h for h in range(4) if h not in query_heads]
    with torch.no_grad():
        masked.model.layers[0].self_attn.o_proj.weight[:, head_dims(dropped, 16)] = 0
    attention = model.model.layers[0].self_attn

    keep_attention_heads(model.model.layers[0], query_heads, kv_heads)

    assert attention.q_proj.out_features == attention.o_proj.in_features == 16 * len(query_heads)
    assert attention.k_proj.out_features == attention.v_proj.out_features == 16 * len(kv_heads)
    assert attention.num_key_value_groups == expected_groups
    x = torch.randn(1, 6, 64)
    torch.testing.assert_close(_attention_output(model, x), _attention_output(masked, x))


def test_config_rejection_reports_what_transformers_would_refuse():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert config_rejection(config, {"num_attention_heads": 2, "head_dim": 16}) is None
    assert "not a multiple" in config_rejection(config, {"num_attention_heads": 3})
    assert config.num_attention_heads == 4  # tried on a copy
