import copy

import pytest

from conftest import build_tiny_llama, random_windows, run_prune_stage
from slimlm.errors import SlimlmError
from slimlm.modules import decoder_layers, layer_linears
from slimlm.prune.owl import MAX_LAYER_SPARSITY, measure_outlier_ratios, owl_sparsities
from slimlm.recipe import parse_recipe

PLANTED_LAYER = 1


@pytest.fixture()
def model_with_outliers(tiny_tokenizer):
    """Four layers; in one, 8 input channels of q/k/gate weigh 6× more: many scores well above the layer's mean
    (a few huge ones would instead raise the mean and leave fewer scores above M × mean)."""
    model = build_tiny_llama(len(tiny_tokenizer), layers=4)
    layer = decoder_layers(model)[PLANTED_LAYER]
    for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.gate_proj):
        linear.weight.data[:, :8] *= 6
    return model


def _layer_sparsity(layer):
    weights = [linear.weight for linear in layer_linears(layer).values()]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


def test_owl_sparsities_follow_the_reference_formula():
    ratios = [0.01, 0.04, 0.02, 0.03]
    sparsities = owl_sparsities(ratios, 0.5, 0.08)
    assert sum(sparsities) / 4 == pytest.approx(0.5)
    assert max(sparsities) - min(sparsities) == pytest.approx(2 * 0.08)  # the reference's 2λ spread
    assert sorted(range(4), key=sparsities.__getitem__) == sorted(range(4), key=lambda i: -ratios[i])
    assert owl_sparsities([0.02, 0.02, 0.02], 0.5, 0.08) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("target", [0.05, 0.95])
def test_owl_sparsities_near_the_bounds_shrink_the_spread_and_keep_the_mean(target):
    sparsities = owl_sparsities([0.0, 0.0, 0.0, 1.0], target, 0.3)
    assert sum(sparsities) / 4 == pytest.approx(target)
    assert all(0 <= s <= MAX_LAYER_SPARSITY for s in sparsities)
    assert min(sparsities) < target < max(sparsities)


def test_the_layer_with_planted_outliers_is_pruned_least_and_the_mean_is_the_target(model_with_outliers):
    windows = random_windows(model_with_outliers)
    context = run_prune_stage(model_with_outliers, windows, method="magnitude", sparsity=0.5, allocation="owl")
    layers = decoder_layers(model_with_outliers)
    sparsities = [_layer_sparsity(layer) for layer in layers]
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.5, abs=1e-3)
    assert min(sparsities) == sparsities[PLANTED_LAYER] < 0.45
    assert all(s > 0.5 for i, s in enumerate(sparsities) if i != PLANTED_LAYER)
    note = next(note for note in context.notes if note.startswith("owl allocation"))
    assert f"(layer {PLANTED_LAYER})" in note and "mean 50.0%" in note
    assert any("calibration: 4 windows × 16 tokens" in note for note in context.notes)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_matrix_gets_its_layers_owl_sparsity(model_with_outliers, method):
    windows = random_windows(model_with_outliers)
    allocated = owl_sparsities(measure_outlier_ratios(copy.deepcopy(model_with_outliers), windows, 5.0), 0.5, 0.08)
    run_prune_stage(model_with_outliers, windows, method=method, sparsity=0.5, allocation="owl")
    for index, layer in enumerate(decoder_layers(model_with_outliers)):
        for name, linear in layer_linears(layer).items():
            rows, columns = linear.weight.shape
            if method == "wanda":  # the same count in every row
                expected = rows * int(columns * allocated[index])
            else:
                expected = int(rows * columns * allocated[index])
            assert (linear.weight == 0).sum().item() == expected, f"layer {index} {name}"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"pattern": "2:4", "allocation": "owl"},
            "stages[0].prune.allocation: owl allocates unstructured sparsity only",
        ),
        ({"allocation": "owl", "owl_threshold": 0}, "stages[0].prune.owl_threshold: "),
        ({"allocation": "owl", "owl_lambda": 0.7}, "stages[0].prune.owl_lambda: "),
        ({"allocation": "outliers"}, "stages[0].prune.allocation: "),
        ({"owl_lambda": 0.1}, "stages[0].prune.owl_lambda: only with allocation: owl"),
    ],
)
def test_owl_options_are_validated_in_one_line(options, message):
    with pytest.raises(SlimlmError) as error:
        parse_recipe({"model": "m", "stages": [{"prune": options}]})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
