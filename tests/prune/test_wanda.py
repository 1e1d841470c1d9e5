import copy

import pytest
import torch

from conftest import random_windows, run_prune_stage
from slimlm.calibrate import InputStats
from slimlm.modules import decoder_layers, layer_linears, named_decoder_linears
from slimlm.prune.masks import unstructured_mask
from slimlm.prune.unstructured import PruneOptions, apply_mask
from slimlm.prune.wanda import wanda_scores


def _linear_inputs(model, layer_index, windows):
    """Every input the Linears of one layer see in a full forward of `model`, per Linear: [tokens, in_features]."""
    linears = layer_linears(decoder_layers(model)[layer_index])
    seen = {name: [] for name in linears}
    handles = [
        linear.register_forward_hook(lambda _m, args, _o, n=name: seen[n].append(args[0].flatten(0, -2)))
        for name, linear in linears.items()
    ]
    with torch.no_grad():
        model(windows, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


def _top_per_row(scores, keep):
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(keep, dim=1).indices, True)


def test_wanda_keeps_the_top_weight_times_input_norm_of_every_row(tiny_model):
    windows = random_windows(tiny_model)
    dense = copy.deepcopy(tiny_model)
    context = run_prune_stage(tiny_model, windows, method="wanda", sparsity=0.5)
    pruned_layers, dense_layers = decoder_layers(tiny_model), decoder_layers(dense)
    for index in range(len(pruned_layers)):
        # a layer is scored on the outputs of the pruned layers before it, with its own weights still dense
        reference = copy.deepcopy(dense)
        for earlier in range(index):
            decoder_layers(reference)[earlier].load_state_dict(pruned_layers[earlier].state_dict())
        inputs = _linear_inputs(reference, index, windows)
        for name, linear in layer_linears(pruned_layers[index]).items():
            original = layer_linears(dense_layers[index])[name].weight
            scores = original.abs() * inputs[name].norm(dim=0)
            expected = _top_per_row(scores, original.shape[1] // 2)
            assert torch.equal(linear.weight != 0, expected), f"layer {index} {name}"
            assert torch.equal(linear.weight[expected], original[expected])  # kept weights are not changed
    assert any("wanda" in note for note in context.notes)
    assert any("4 windows × 16 tokens" in note for note in context.notes)


def test_wanda_with_uniform_input_norms_is_magnitude_per_row(tiny_model):
    linear = tiny_model.model.layers[0].mlp.down_proj
    stats = InputStats(linear.in_features, "cpu", hessian=False)
    stats.add(torch.full((10, linear.in_features), 0.3))  # every channel has the same norm
    weight = linear.weight.detach().clone()
    options = PruneOptions(method="wanda", sparsity=0.6)
    kept = apply_mask(weight, wanda_scores(linear, stats), options, per_row=True)
    assert torch.equal(kept, unstructured_mask(linear.weight.abs(), 0.6, per_row=True))


def test_wanda_two_four_is_exact_and_keeps_the_top_two_of_every_four(tiny_model):
    windows = random_windows(tiny_model)
    first_layer = layer_linears(decoder_layers(tiny_model)[0])
    original = {name: linear.weight.detach().clone() for name, linear in first_layer.items()}
    inputs = _linear_inputs(tiny_model, 0, windows)
    run_prune_stage(tiny_model, windows, method="wanda", pattern="2:4")
    for _, linear in named_decoder_linears(tiny_model):
        groups = (linear.weight != 0).view(linear.weight.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all()
    for name, linear in first_layer.items():
        scores = (original[name].abs() * inputs[name].norm(dim=0)).view(original[name].shape[0], -1, 4)
        expected = _top_per_row(scores.flatten(0, 1), 2).view_as(linear.weight)
        assert torch.equal(linear.weight != 0, expected)


def test_wanda_prunes_each_matrix_to_the_target(tiny_model):
    run_prune_stage(tiny_model, random_windows(tiny_model), method="wanda", sparsity=0.3)
    for _, linear in named_decoder_linears(tiny_model):
        rows, columns = linear.weight.shape
        assert (linear.weight == 0).sum().item() == rows * int(columns * 0.3)  # the same count in every row
        assert (linear.weight == 0).float().mean().item() == pytest.approx(0.3, abs=1 / columns)
