"""The probe's KL equals the KL of the whole model run with the change; its output error is tr(ΔW H ΔWᵀ)/rows;
the sensitivity cache survives a torn line and is reused instead of measuring again."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import random_windows
from slimlm.auto.probe import Probe
from slimlm.auto.sensitivity import CostCache, Item, Option, item_costs


def _full_kl(model, windows, original_logits):
    with torch.no_grad():
        changed = F.log_softmax(model(windows, use_cache=False).logits.float(), -1)
    reference = F.log_softmax(original_logits, -1)
    return float(F.kl_div(changed.flatten(0, 1), reference.flatten(0, 1), log_target=True, reduction="sum")) / (
        windows.numel()
    )


@pytest.fixture()
def probed(tiny_model):
    windows = random_windows(tiny_model, 2, 16)
    with torch.no_grad():
        logits = tiny_model(windows).logits.float()
    return tiny_model, windows, logits, Probe(tiny_model, windows)


def test_no_change_costs_nothing(probed):
    assert probed[3].kl() == pytest.approx(0.0, abs=1e-9)


def test_kl_of_a_changed_linear_is_the_whole_models(probed):
    model, windows, logits, probe = probed
    name = "model.layers.1.mlp.up_proj"
    linear = probe.modules[name]
    noisy = linear.weight + 0.05 * torch.randn_like(linear.weight)
    measured = probe.kl({name: noisy})
    original = linear.weight.data.clone()
    linear.weight.data = noisy
    assert measured == pytest.approx(_full_kl(model, windows, logits), rel=1e-4)
    linear.weight.data = original
    assert probe.kl() == pytest.approx(0.0, abs=1e-9)  # the probe put the weight back


def test_kl_with_a_layer_skipped_and_a_changed_embedding(probed):
    model, windows, logits, probe = probed
    skipped = probe.kl(skip=frozenset({0}))
    embedding = model.get_input_embeddings().weight
    noisy = embedding + 0.05 * torch.randn_like(embedding)
    changed = probe.kl({"model.embed_tokens": noisy})
    layers = model.model.layers
    first = layers[0]
    model.model.layers = torch.nn.ModuleList(list(layers)[1:])
    model.config.num_hidden_layers -= 1
    try:
        assert skipped == pytest.approx(_full_kl(model, windows, logits), rel=1e-4)
    finally:
        model.model.layers = torch.nn.ModuleList([first, *layers[1:]])
        model.config.num_hidden_layers += 1
    original = embedding.data.clone()
    embedding.data = noisy  # tied: the LM head changes with it
    assert changed == pytest.approx(_full_kl(model, windows, logits), rel=1e-4)
    embedding.data = original


def test_output_error_is_the_reconstruction_error(probed):
    model, windows, _, probe = probed
    name = "model.layers.0.self_attn.o_proj"
    linear = probe.modules[name]
    inputs = []
    handle = linear.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(windows)
    handle.remove()
    x = torch.cat(inputs).flatten(0, 1)
    delta = 0.01 * torch.randn_like(linear.weight)
    expected = float((x @ delta.T).pow(2).sum() * 2 / x.shape[0] / delta.shape[0])
    assert probe.output_error(name, linear.weight + delta) == pytest.approx(expected, rel=1e-4)


def test_cost_cache_ignores_a_torn_line_and_is_reused(tmp_path):
    path = tmp_path / "costs.jsonl"
    cache = CostCache(path)
    assert cache.get("a", lambda: 1.5) == 1.5
    with open(path, "a") as handle:
        handle.write('{"key": "b", "val')  # a run killed mid-line
    again = CostCache(path)
    assert again.get("a", lambda: pytest.fail("measured again")) == 1.5
    assert again.get("b", lambda: 2.0) == 2.0
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_item_costs_carry_the_reference_kl_by_output_error(probed, tmp_path):
    probe = probed[3]
    name = "model.layers.1.self_attn.v_proj"
    weight = probe.modules[name].weight
    options = [
        Option(f"noise{k}", 10 - k, lambda k=k: {name: weight + 0.01 * k * torch.ones_like(weight)}) for k in range(3)
    ]
    costs = item_costs(probe, Item(name, options, references=(1,)), CostCache(tmp_path / "c.jsonl"))
    assert costs[0] == 0.0  # the original's own values
    assert costs[1] == pytest.approx(probe.kl(options[1].weights()))
    assert costs[2] > costs[1]


def test_each_family_is_carried_from_its_own_reference(probed, tmp_path):
    probe = probed[3]
    name = "model.layers.1.self_attn.v_proj"
    weight = probe.modules[name].weight

    def noise(scale: float, pattern: torch.Tensor):
        return lambda: {name: weight + scale * pattern}

    flat, spiky = torch.ones_like(weight), torch.zeros_like(weight)
    spiky[:, 0] = 4.0  # one input column: an error of another shape than the flat one
    options = [
        Option("flat1", 9, noise(0.01, flat), "flat"),
        Option("flat2", 8, noise(0.02, flat), "flat"),
        Option("spiky1", 9, noise(0.01, spiky), "spiky"),
        Option("spiky2", 8, noise(0.02, spiky), "spiky"),
    ]
    costs = item_costs(probe, Item(name, options, references=(0, 2)), CostCache(tmp_path / "c.jsonl"))
    assert costs[0] == pytest.approx(probe.kl(options[0].weights()))
    assert costs[2] == pytest.approx(probe.kl(options[2].weights()))  # measured, not carried from flat1
    assert costs[3] / costs[2] == pytest.approx(4.0, rel=1e-4)  # within a family: by output error (quadratic)
    with pytest.raises(ValueError, match="no reference option for the families \\['spiky'\\]"):
        item_costs(probe, Item(name, options, references=(0,)), CostCache(tmp_path / "d.jsonl"))
