import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimlm.errors import SlimlmError
from slimlm.recipe import parse_recipe
from slimlm.surgery import count_parameters, head_dims
from test_surgery import PROMPT, assert_generates_like_before_saving, calibration, lively, lively_llama, run_stage

HEAD_DIM = 16  # the tiny LLaMA: hidden 64, 4 query heads sharing 2 KV heads, intermediate 128


def kept_rows(pruned, original):
    """Which rows of `original` (a weight matrix) the rows of `pruned` are, in order."""
    return [int((original == row).all(dim=1).nonzero()[0]) for row in pruned]


def kept_heads(pruned_q, original_q):
    rows = kept_rows(pruned_q.weight, original_q.weight)
    return [row // HEAD_DIM for row in rows[::HEAD_DIM]]


def linear_input_norms(model, windows, layer_index):
    """‖X_j‖ over all calibration tokens for the inputs of o_proj and down_proj of one layer, by full forwards."""
    layer = model.model.layers[layer_index]
    seen = {"o": [], "down": []}
    hooks = [
        layer.self_attn.o_proj.register_forward_hook(lambda _m, a, _o: seen["o"].append(a[0].flatten(0, 1))),
        layer.mlp.down_proj.register_forward_hook(lambda _m, a, _o: seen["down"].append(a[0].flatten(0, 1))),
    ]
    with torch.no_grad():
        for window in windows:
            model(window.unsqueeze(0), use_cache=False)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(chunks).norm(dim=0) for name, chunks in seen.items()}


def test_width_pruning_leaves_a_smaller_model_that_reloads_and_generates_alike(tiny_tokenizer, tmp_path):
    model = lively_llama(len(tiny_tokenizer))
    before = count_parameters(model)

    model, context = run_stage(model, "prune_width", mlp_keep=0.5, heads_keep=2)

    config = model.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (64, 2, 2)
    # hidden / heads would now give 32: head_dim must be written, not derived
    assert config.head_dim == HEAD_DIM
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert (attention.q_proj.out_features, attention.o_proj.in_features) == (32, 32)
        assert (attention.k_proj.out_features, attention.v_proj.out_features) == (32, 32)
        assert attention.num_key_value_groups == 1
        assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (64, 64, 64)
    removed_per_layer = 3 * 64 * 64 + 2 * (2 * HEAD_DIM * 64)  # gate/up rows, down columns; q rows, o columns
    assert count_parameters(model) == before - 2 * removed_per_layer
    assert any("kept 64 of 128 MLP channels, 2 of 4 query heads and 2 of 2 KV heads" in n for n in context.notes)
    assert any("genuinely smaller" in note for note in context.notes)

    assert_generates_like_before_saving(model, tmp_path / "narrow")
    saved = json.loads((tmp_path / "narrow" / "config.json").read_text())
    assert (saved["head_dim"], saved["num_attention_heads"], saved["intermediate_size"]) == (HEAD_DIM, 2, 64)


def test_kept_units_are_the_top_scored_and_the_model_equals_the_masked_original(tiny_tokenizer):
    original = lively_llama(len(tiny_tokenizer))
    windows = calibration(original)
    model, _ = run_stage(copy.deepcopy(original), "prune_width", windows, mlp_keep=0.25, heads_keep=0.5)

    # layer 0 sees the original inputs: its choice is the top |W|·‖X‖ summed over what a unit writes
    norms = linear_input_norms(original, windows, 0)
    first, pruned_first = original.model.layers[0], model.model.layers[0]
    channel_scores = (first.mlp.down_proj.weight.abs() * norms["down"]).sum(dim=0)
    channels = kept_rows(pruned_first.mlp.gate_proj.weight, first.mlp.gate_proj.weight)
    assert channels == sorted(channel_scores.topk(32).indices.tolist())
    head_scores = (first.self_attn.o_proj.weight.abs() * norms["o"]).sum(dim=0).view(4, HEAD_DIM).sum(dim=1)
    heads = kept_heads(pruned_first.self_attn.q_proj, first.self_attn.q_proj)
    assert heads == [int(head_scores[:2].argmax()), 2 + int(head_scores[2:].argmax())]  # best of each KV group

    # every layer: the smaller model computes what the original computes with the dropped units zeroed
    masked = copy.deepcopy(original)
    with torch.no_grad():
        for layer, cut in zip(masked.model.layers, model.model.layers):
            keep = kept_rows(cut.mlp.gate_proj.weight, layer.mlp.gate_proj.weight)
            assert keep == kept_rows(cut.mlp.up_proj.weight, layer.mlp.up_proj.weight)
            layer.mlp.down_proj.weight[:, [c for c in range(128) if c not in keep]] = 0
            heads = kept_heads(cut.self_attn.q_proj, layer.self_attn.q_proj)
            layer.self_attn.o_proj.weight[:, head_dims([h for h in range(4) if h not in heads], HEAD_DIM)] = 0
        torch.testing.assert_close(model(PROMPT).logits, masked(PROMPT).logits)


def test_whole_kv_groups_go_with_their_query_heads(tiny_tokenizer, tmp_path):
    original = lively_llama(len(tiny_tokenizer))
    model, context = run_stage(copy.deepcopy(original), "prune_width", heads_keep=2, gqa="whole_groups")

    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    assert model.config.intermediate_size == 128
    for layer, before in zip(model.model.layers, original.model.layers):
        attention = layer.self_attn
        assert kept_heads(attention.q_proj, before.self_attn.q_proj) in ([0, 1], [2, 3])
        group = kept_heads(attention.q_proj, before.self_attn.q_proj)[0] // 2
        assert kept_rows(attention.k_proj.weight, before.self_attn.k_proj.weight) == list(head_dims([group], 16))
        assert (attention.k_proj.out_features, attention.num_key_value_groups) == (HEAD_DIM, 2)
        assert layer.mlp.down_proj.in_features == 128
    assert any("gqa: whole_groups" in note for note in context.notes)
    assert_generates_like_before_saving(model, tmp_path / "groups")


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "stages[0].prune_width: give mlp_keep and/or heads_keep"),
        ({"mlp_keep": 0}, "stages[0].prune_width.mlp_keep: must keep at least 1"),
        ({"mlp_keep": 0.0}, "stages[0].prune_width.mlp_keep: must be a fraction in (0, 1]"),
        ({"heads_keep": 1.5}, "stages[0].prune_width.heads_keep: must be a fraction in (0, 1]"),
        ({"heads_keep": -2}, "stages[0].prune_width.heads_keep: must keep at least 1"),
        ({"heads_keep": "six"}, "stages[0].prune_width.heads_keep: must be a count (int ≥ 1) or a fraction in (0, 1]"),
        ({"mlp_keep": True}, "stages[0].prune_width.mlp_keep: must be a count"),
        ({"heads_keep": 2, "gqa": "mixed"}, "stages[0].prune_width.gqa: Input should be 'within_groups'"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(SlimlmError) as err:
        parse_recipe({"model": "m", "stages": [{"prune_width": options}]})
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"heads_keep": 3},
            "prune_width.heads_keep: 3 of 4 query heads breaks GQA: each of the 2 KV groups must keep "
            "the same number of its 2 query heads; valid counts: 2, 4",
        ),
        (
            {"heads_keep": 1, "gqa": "whole_groups"},
            "prune_width.heads_keep: 1 of 4 query heads breaks GQA: gqa whole_groups removes whole KV groups of 2 "
            "query heads; valid counts: 2, 4",
        ),
        ({"heads_keep": 0.1}, "prune_width.heads_keep: 0.1 keeps no attention head of 4"),
        ({"heads_keep": 5}, "prune_width.heads_keep: 5 is more than the 4 attention heads"),
        ({"mlp_keep": 0.001}, "prune_width.mlp_keep: 0.001 keeps no MLP channel of 128"),
        ({"mlp_keep": 129}, "prune_width.mlp_keep: 129 is more than the 128 MLP channels"),
    ],
)
def test_widths_the_model_cannot_take_are_refused_before_any_cut(tiny_tokenizer, options, message):
    model = lively_llama(len(tiny_tokenizer))
    with pytest.raises(SlimlmError) as err:
        run_stage(model, "prune_width", **options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert model.model.layers[0].self_attn.q_proj.out_features == 64  # nothing was cut


def test_head_counts_transformers_would_not_reload_are_refused(tiny_tokenizer):
    # One KV head: GQA allows any count, but LlamaConfig refuses a hidden size not divisible by the head count.
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=len(tiny_tokenizer),
    )
    model = lively(LlamaForCausalLM(config).eval())
    with pytest.raises(
        SlimlmError,
        match=r"3 of 4 query heads is refused by transformers' LlamaConfig \(The hidden "
        r"size \(64\) is not a multiple .*\); valid counts: 1, 2, 4$",
    ):
        run_stage(model, "prune_width", heads_keep=3)
