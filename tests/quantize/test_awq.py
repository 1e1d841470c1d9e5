import copy

import torch
from test_quantize_stage import run_quantize_stage

from conftest import random_windows
from slimlm.calibrate import capture_first_layer_inputs, run_layer
from slimlm.quantize.awq import search_scales
from slimlm.quantize.grid import QuantGrid, fake_quantize
from slimlm.surgery import fold_channel_scales


def _with_outlier_channels(model, channels=(3, 17, 40), factor=30.0):
    """Real LLMs have a few input channels with huge activations; a random tiny model needs them put in."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(channels)] *= factor
    return model


def test_folding_scales_leaves_the_layer_function_unchanged(tiny_model):
    windows = random_windows(tiny_model, samples=2, seq_len=12)
    inputs = capture_first_layer_inputs(tiny_model, windows)
    layer = tiny_model.model.layers[0]
    before = run_layer(layer, inputs)
    scales = torch.rand(64) + 0.5
    fold_channel_scales(
        layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], scales
    )
    mlp_scales = torch.rand(128) + 0.5
    fold_channel_scales(layer.mlp.up_proj, [layer.mlp.down_proj], mlp_scales)
    after = run_layer(layer, inputs)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_scale_search_protects_outlier_channels():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=generator)
    x[:, [5, 9]] *= 40  # two outlier input channels
    weight = torch.randn(32, 64, generator=generator) * 0.02
    grid = QuantGrid(3, True, 16)
    scales, alpha, relative = search_scales(x, [weight], [grid])
    assert alpha > 0 and relative < 0.8  # a real gain over plain rounding (α = 0)
    assert scales[[5, 9]].min() > scales.median()
    rtn_error = (x @ (fake_quantize(weight, grid) - weight).T).pow(2).mean()
    awq_error = ((x / scales) @ fake_quantize(weight * scales, grid).T - x @ weight.T).pow(2).mean()
    assert awq_error < 0.8 * rtn_error


def _logit_error(model, reference, windows):
    with torch.no_grad():
        return (model(windows).logits - reference(windows).logits).pow(2).mean().item()


def test_awq_stage_beats_rtn_on_a_model_with_outlier_activations(tiny_model):
    original = _with_outlier_channels(tiny_model)
    windows = random_windows(original, samples=4, seq_len=32)
    options = {"bits": 3, "group_size": 16}
    rtn, awq = copy.deepcopy(original), copy.deepcopy(original)
    run_quantize_stage(rtn, windows, method="rtn", **options)
    context = run_quantize_stage(awq, windows, method="awq", **options)
    assert _logit_error(awq, original, windows) < 0.8 * _logit_error(rtn, original, windows)
    note = next(n for n in context.notes if n.startswith("awq:"))
    assert "layer 0:" in note and "self_attn.v_proj→o_proj" not in note  # GQA (4 heads, 2 KV heads): v→o skipped
