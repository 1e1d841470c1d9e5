import copy
import re

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.prune.depth import (
    angular_distance,
    boundary_distances,
    calibration_perplexity,
    layers_skipped,
    rank_perplexity,
)
from slimlm.recipe import parse_recipe
from slimlm.surgery import count_parameters, remove_decoder_layers
from test_surgery import assert_generates_like_before_saving, calibration, lively_llama, run_stage


def make_identity(model, *indices):
    """Zero what a layer writes into the residual stream (o_proj, down_proj): its output is its input."""
    with torch.no_grad():
        for index in indices:
            layer = model.model.layers[index]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def boundaries_by_hooks(model, windows):
    """x_0 … x_L from hooks on the decoder layers in full forwards, one window at a time: [boundary][window]."""
    layers = model.model.layers
    seen = [[] for _ in range(len(layers) + 1)]
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0])) for i, layer in enumerate(layers)
    ]
    handles.append(layers[-1].register_forward_hook(lambda _m, _a, out: seen[-1].append(out)))
    with torch.no_grad():
        for window in windows:
            model(window.unsqueeze(0), use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def test_block_influence_removes_the_identity_layer_first(tiny_tokenizer, tmp_path):
    model = make_identity(lively_llama(len(tiny_tokenizer), layers=4), 2)
    model, context = run_stage(model, "prune_depth", remove=1, criterion="block_influence")
    assert model.config.num_hidden_layers == 3
    assert any("removed layers [2] of 4" in note and "BI = 1 − mean cos" in note for note in context.notes)
    assert any("genuinely smaller" in note for note in context.notes)


def test_boundary_distances_match_hidden_states_of_full_forwards(tiny_tokenizer):
    model = lively_llama(len(tiny_tokenizer), layers=4)
    windows = calibration(model)
    seen = boundaries_by_hooks(model, windows)
    for gap in (1, 2):
        expected = []
        for start in range(len(seen) - gap):
            cosines = torch.cat(
                [torch.cosine_similarity(a, b, dim=-1).flatten() for a, b in zip(seen[start], seen[start + gap])]
            )
            expected.append(angular_distance(cosines).mean().item())
        got = boundary_distances(model, windows, gap, angular_distance)
        assert got == pytest.approx(expected, abs=1e-5)


def test_angular_removes_the_block_whose_ends_agree(tiny_tokenizer):
    # Layers 3 and 4 pass the residual through, so x_3 = x_5; layer 1 alone is an identity too, which tempts a
    # per-layer criterion but makes no block of two.
    model = make_identity(lively_llama(len(tiny_tokenizer), layers=6), 1, 3, 4)
    model, context = run_stage(model, "prune_depth", remove=2, criterion="angular")
    assert model.config.num_hidden_layers == 4
    note = next(note for note in context.notes if "removed layers" in note)
    assert "removed layers [3, 4] of 6" in note and "contiguous block" in note
    scores = {run: float(score) for run, score in re.findall(r"(\d+-\d+): ([-0-9.e]+)", note)}
    assert scores["3-4"] < 1e-3 < min(score for run, score in scores.items() if run != "3-4")


def test_block_influence_block_removes_the_contiguous_run_of_lowest_total_influence(tiny_tokenizer):
    model = make_identity(lively_llama(len(tiny_tokenizer), layers=6), 0, 3, 4)
    model, context = run_stage(model, "prune_depth", remove=2, criterion="block_influence", block=True)
    assert any("removed layers [3, 4] of 6" in note for note in context.notes)


def test_perplexity_removes_the_layer_whose_absence_hurts_least(tiny_tokenizer):
    model = make_identity(lively_llama(len(tiny_tokenizer), layers=4), 1)
    windows = calibration(model)
    base = calibration_perplexity(model, windows)
    with layers_skipped(model, (1,)):  # skipping an identity layer changes nothing: the skip is faithful
        assert calibration_perplexity(model, windows) == pytest.approx(base, rel=1e-5)
    # each score is the perplexity of the model really cut by that layer (random layers may even help)
    expected = []
    for index in range(4):
        cut = copy.deepcopy(model)
        remove_decoder_layers(cut, [index])
        expected.append(calibration_perplexity(cut, windows))

    ranking = rank_perplexity(model, windows, 1, contiguous=False)
    assert ranking.candidates == [(0,), (1,), (2,), (3,)]
    assert ranking.scores == pytest.approx(expected, rel=1e-5)

    model, context = run_stage(model, "prune_depth", windows, remove=1, criterion="perplexity")

    note = next(note for note in context.notes if "removed layers" in note)
    assert f"removed layers [{min(range(4), key=expected.__getitem__)}] of 4" in note and "one-shot" in note


def test_keep_ratio_sets_the_count_and_the_result_reloads_and_generates_alike(tiny_tokenizer, tmp_path):
    model = lively_llama(len(tiny_tokenizer), layers=4)
    per_layer, before = count_parameters(model.model.layers[0]), count_parameters(model)
    model, _ = run_stage(model, "prune_depth", keep_ratio=0.5)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert count_parameters(model) == before - 2 * per_layer
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert_generates_like_before_saving(model, tmp_path / "depth")


def test_keep_ratio_one_removes_nothing(tiny_tokenizer):
    model, context = run_stage(lively_llama(len(tiny_tokenizer), layers=3), "prune_depth", keep_ratio=1.0)
    assert model.config.num_hidden_layers == 3
    assert any("nothing removed" in note for note in context.notes)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"remove": 2, "keep_ratio": 0.5}, "stages[0].prune_depth: give exactly one of remove"),
        ({}, "stages[0].prune_depth: give exactly one of remove"),
        ({"remove": 0}, "stages[0].prune_depth.remove: Input should be greater than 0"),
        ({"keep_ratio": 0}, "stages[0].prune_depth.keep_ratio: Input should be greater than 0"),
        ({"keep_ratio": 1.5}, "stages[0].prune_depth.keep_ratio: Input should be less than or equal to 1"),
        (
            {"remove": 1, "criterion": "angular", "block": False},
            "stages[0].prune_depth.block: angular scores contiguous",
        ),
        ({"remove": 1, "criterion": "cosine"}, "stages[0].prune_depth.criterion: Input should be 'block_influence'"),
        ({"remove": 1, "layers": [3]}, "stages[0].prune_depth: give exactly one of remove"),
        ({"layers": 3}, "stages[0].prune_depth.layers: Input should be a valid list"),
        ({"layers": [1, 1]}, "stages[0].prune_depth: layers [1, 1]: an index appears twice"),
        ({"layers": [-1]}, "stages[0].prune_depth.layers[0]: Input should be greater than or equal to 0"),
        ({"width": 3}, "stages[0].prune_depth.width: unknown option"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(SlimlmError) as err:
        parse_recipe({"model": "m", "stages": [{"prune_depth": options}]})
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"remove": 3}, "prune_depth.remove: 3 would leave no layer of the model's 3; must be below 3"),
        ({"remove": 5}, "prune_depth.remove: 5 would leave no layer"),
        ({"keep_ratio": 0.1}, "prune_depth.keep_ratio: 0.1 keeps no layer of the model's 3"),
        ({"layers": [3]}, "prune_depth.layers: [3] must name layers of the model's 3 (0-2)"),
        ({"layers": [0, 1, 2]}, "prune_depth.layers: [0, 1, 2] must name layers of the model's 3 (0-2) and leave"),
    ],
)
def test_removing_every_layer_is_refused_once_the_model_is_known(tiny_tokenizer, options, message):
    model = lively_llama(len(tiny_tokenizer), layers=3)
    with pytest.raises(SlimlmError, match=re.escape(message)):
        run_stage(model, "prune_depth", **options)
    assert model.config.num_hidden_layers == 3  # refused before anything is cut


def test_named_layers_go_without_any_ranking(tiny_tokenizer):
    model = lively_llama(len(tiny_tokenizer), layers=5)
    survivors = [model.model.layers[i] for i in (0, 2, 4)]
    model, context = run_stage(model, "prune_depth", layers=[3, 1])
    assert list(model.model.layers) == survivors  # the same modules, in order
    assert model.config.slimlm_kept_layers == [0, 2, 4]
    note = next(note for note in context.notes if "removed layers" in note)
    assert "(named)" in note and "removed layers [1, 3] of 5" in note
