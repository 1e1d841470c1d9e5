import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import build_tiny_llama, random_windows
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import _unique_parameters, parameter_counts
from slimlm.modules import decoder_layers
from slimlm.quantize.codebook import pack_codebooks
from slimlm.quantize.kmeans import CODEBOOK_ATTRIBUTE, cluster_weight, store_codebook
from slimlm.quantize.tie import adjacent_similarities, select_pairs, similarity, tie_group, tie_groups
from slimlm.storage import TIED_KEY as TIED_PARAMETERS_KEY
from slimlm.storage import retie as retie_parameters
from slimlm.storage import untied_state_dict, weight_modules


def _near_copy(model, projection, source, target, noise, seed=0):
    """Make `target`'s projection a slightly perturbed copy of `source`'s (relative distance about `noise`)."""
    layers = decoder_layers(model)
    weight = layers[source].get_submodule(projection).weight.detach()
    perturbation = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    layers[target].get_submodule(projection).weight.data = (
        weight + noise * weight.norm() / perturbation.norm() * perturbation
    )


@pytest.fixture()
def model():
    """Four layers; up_proj 1→2 nearly equal (1e-3 apart), down_proj 2→3 close (1e-2), everything else random."""
    built = build_tiny_llama(300, layers=4)
    _near_copy(built, "mlp.up_proj", 1, 2, 1e-3)
    _near_copy(built, "mlp.down_proj", 2, 3, 1e-2)
    return built


def _tie(model, **rule):
    selected = select_pairs(adjacent_similarities(model, ["mlp.up_proj", "mlp.down_proj", "self_attn.q_proj"]), **rule)
    return selected, [m for p, layers in tie_groups(selected) for m in tie_group(model, p, layers, "first")]


def test_similarity_of_known_pairs():
    weight = torch.randn(8, 8)
    assert similarity(weight, 2 * weight) == pytest.approx((1.0, 1.0))
    assert similarity(weight, -weight) == pytest.approx((2.0, -1.0))


def test_threshold_and_count_select_the_near_identical_pairs(model):
    pairs = adjacent_similarities(model, ["mlp.up_proj", "mlp.down_proj"])
    assert len(pairs) == 6
    chosen = {(p.projection, p.layer) for p in select_pairs(pairs, threshold=0.1)}
    assert chosen == {("mlp.up_proj", 1), ("mlp.down_proj", 2)}
    assert [(p.projection, p.layer) for p in select_pairs(pairs, count=1)] == [("mlp.up_proj", 1)]
    assert select_pairs(pairs, count=1)[0].distance == pytest.approx(1e-3, rel=1e-3)


def test_tied_parameters_are_counted_once_and_compute_the_same(model):
    before, unique_before = parameter_counts(model)["total"], len(_unique_parameters(model))
    _tie(model, count=1)
    layers = decoder_layers(model)
    assert layers[2].mlp.up_proj.weight is layers[1].mlp.up_proj.weight
    assert parameter_counts(model)["total"] == before - 128 * 64
    assert len(_unique_parameters(model)) == unique_before - 1
    x = torch.randn(5, 64)
    assert torch.equal(layers[1].mlp.up_proj(x), layers[2].mlp.up_proj(x))
    assert getattr(model.config, TIED_PARAMETERS_KEY) == {
        "model.layers.2.mlp.up_proj.weight": "model.layers.1.mlp.up_proj.weight"
    }


def test_chained_pairs_share_the_first_layers_tensor_and_mean_merges_them():
    model = build_tiny_llama(300, layers=4)
    _near_copy(model, "self_attn.q_proj", 0, 1, 1e-3, seed=1)
    _near_copy(model, "self_attn.q_proj", 1, 2, 1e-3, seed=2)
    originals = [layer.self_attn.q_proj.weight.detach().clone() for layer in decoder_layers(model)]
    selected = select_pairs(adjacent_similarities(model, ["self_attn.q_proj"]), threshold=0.01)
    assert tie_groups(selected) == [("self_attn.q_proj", [0, 1, 2])]
    members = tie_group(model, "self_attn.q_proj", [0, 1, 2], "mean")
    shared = decoder_layers(model)[0].self_attn.q_proj.weight
    assert all(decoder_layers(model)[i].self_attn.q_proj.weight is shared for i in (1, 2))
    assert torch.allclose(shared, torch.stack(originals[:3]).mean(dim=0))
    assert decoder_layers(model)[3].self_attn.q_proj.weight is not shared
    assert getattr(model.config, TIED_PARAMETERS_KEY) == {
        f"model.layers.{i}.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight" for i in (1, 2)
    }
    assert [m.name for m in members] == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1, 2)]
    assert all(0 < m.change < 2e-3 for m in members)


def test_a_later_tie_joins_an_earlier_group_without_breaking_it():
    model = build_tiny_llama(300, layers=3)
    tie_group(model, "mlp.up_proj", [1, 2], "first")
    tie_group(model, "mlp.up_proj", [0, 1], "first")  # layer 2 follows layer 1 into layer 0's tensor
    weights = [layer.mlp.up_proj.weight for layer in decoder_layers(model)]
    assert weights[1] is weights[0] and weights[2] is weights[0]
    assert getattr(model.config, TIED_PARAMETERS_KEY) == {
        f"model.layers.{i}.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight" for i in (1, 2)
    }


def test_first_merge_hands_the_sources_codes_to_the_targets(model):
    source = decoder_layers(model)[1].mlp.up_proj
    store_codebook([source], cluster_weight(source.weight, 3))
    tie_group(model, "mlp.up_proj", [1, 2], "first")
    assert getattr(decoder_layers(model)[2].mlp.up_proj, CODEBOOK_ATTRIBUTE) is getattr(source, CODEBOOK_ATTRIBUTE)
    pack_codebooks(model)  # the tied users share one codebook module, stored once
    assert decoder_layers(model)[2].mlp.up_proj is decoder_layers(model)[1].mlp.up_proj
    assert [name for name, _ in weight_modules(model)] == ["model.layers.1.mlp.up_proj"]
    assert getattr(model.config, TIED_PARAMETERS_KEY) == {"model.layers.2.mlp.up_proj": "model.layers.1.mlp.up_proj"}


def test_transformers_refuses_to_save_undeclared_ties(model, tmp_path):
    _tie(model, count=1)
    with pytest.raises(RuntimeError, match="shared tensors"):
        model.save_pretrained(tmp_path / "plain", safe_serialization=True)


def test_round_trip_saves_each_tied_tensor_once_and_reties_on_load(model, tmp_path):
    _tie(model, threshold=0.1)
    windows = random_windows(model, samples=2, seq_len=8)
    with torch.no_grad():
        expected = model(windows, use_cache=False).logits
    model.save_pretrained(tmp_path, safe_serialization=True, state_dict=untied_state_dict(model))
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        names = set(saved.keys())
    assert "model.layers.2.mlp.up_proj.weight" not in names and "model.layers.1.mlp.up_proj.weight" in names
    assert "model.layers.3.mlp.down_proj.weight" not in names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert retie_parameters(loaded) == 2
    layers = decoder_layers(loaded)
    assert layers[2].mlp.up_proj.weight is layers[1].mlp.up_proj.weight
    assert layers[3].mlp.down_proj.weight is layers[2].mlp.down_proj.weight
    with torch.no_grad():
        assert torch.equal(loaded(windows, use_cache=False).logits, expected)
    assert parameter_counts(loaded)["total"] == parameter_counts(model)["total"]


def test_retie_names_a_bad_entry(model):
    up = "model.layers.0.mlp.up_proj.weight"
    setattr(model.config, TIED_PARAMETERS_KEY, {"model.layers.9.mlp.up_proj.weight": up})
    with pytest.raises(SlimlmError, match=r"slimlm_tied_parameters: model\.layers\.9") as err:
        retie_parameters(model)
    assert "\n" not in str(err.value)
    setattr(model.config, TIED_PARAMETERS_KEY, {up: "model.layers.0.mlp.down_proj.weight"})
    with pytest.raises(SlimlmError, match="shape"):
        retie_parameters(model)
