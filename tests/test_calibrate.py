import copy

import pytest
import torch

from slimlm import calibrate
from slimlm.calibrate import capture_first_layer_inputs, observe_layer, run_layer, true_sequential, walk_layers
from slimlm.modules import PROJECTIONS, SEQUENTIAL_SETS, decoder_layers


def test_layer_by_layer_walk_reproduces_the_full_forward(tiny_model):
    windows = torch.randint(0, tiny_model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny_model(windows, output_hidden_states=True).hidden_states
    seen = []

    def visit(index, layer, inputs):
        seen.append(index)
        assert torch.allclose(torch.cat(inputs.hidden), full[index], atol=1e-5)

    walk_layers(tiny_model, windows, visit, batch_size=2)
    assert seen == list(range(tiny_model.config.num_hidden_layers))


def test_statistics_match_a_direct_computation(tiny_model):
    windows = torch.randint(0, tiny_model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    inputs = capture_first_layer_inputs(tiny_model, windows)
    layer = decoder_layers(tiny_model)[0]
    captured = []
    handle = layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    stats = observe_layer(layer, inputs, names=["mlp.down_proj"], hessian=True)["mlp.down_proj"]
    handle.remove()
    x = torch.cat(captured)
    assert stats.count == 16
    assert torch.allclose(stats.channel_norm(), x.norm(dim=0), atol=1e-5)
    assert torch.allclose(stats.hessian(), 2 * x.T @ x / 16, atol=1e-5)
    assert stats.xtx.dtype == torch.float32


def test_modifying_a_layer_changes_what_the_next_layer_sees(tiny_model):
    windows = torch.randint(0, tiny_model.config.vocab_size, (1, 8))
    inputs = capture_first_layer_inputs(tiny_model, windows)
    before = run_layer(decoder_layers(tiny_model)[0], inputs)[0]
    seen = {}

    def visit(index, layer, inputs):
        if index == 0:
            layer.mlp.down_proj.weight.data.zero_()
        else:
            seen[index] = torch.cat(inputs.hidden)

    walk_layers(tiny_model, windows, visit)
    assert not torch.allclose(seen[1], before)


def test_linears_reading_one_input_share_one_statistic(tiny_model):
    windows = torch.randint(0, tiny_model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    inputs = capture_first_layer_inputs(tiny_model, windows)
    stats = observe_layer(decoder_layers(tiny_model)[0], inputs, hessian=True)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert len({id(s) for s in stats.values()}) == 4  # q/k/v, o, gate/up, down


def _sequential_run(layer, inputs):
    """true_sequential with a visitor that records each set's Hessian and then changes the set's weights."""
    seen = []

    def visit(names, stats):
        seen.append((tuple(names), stats[names[0]].hessian().clone()))
        for name in names:
            weight = layer.get_submodule(name).weight
            weight.data.copy_((weight * 8).round() / 8)  # a coarse grid: every later input changes

    return true_sequential(layer, inputs, PROJECTIONS, visit), seen


@pytest.mark.parametrize("keep_mlp_inputs", [True, False])
def test_true_sequential_is_bit_identical_to_a_pass_per_set(tiny_model, monkeypatch, keep_mlp_inputs):
    windows = torch.randint(0, tiny_model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(3))
    inputs = capture_first_layer_inputs(tiny_model, windows, batch_size=2)
    layer = decoder_layers(tiny_model)[0]
    if not keep_mlp_inputs:
        monkeypatch.setattr(calibrate, "_KEPT_MLP_BYTES", 0)
    fast_outputs, fast_seen = _sequential_run(copy.deepcopy(layer), inputs)
    assert calibrate._RESIDUAL_FORM[type(layer)]  # the LLaMA layer took the decomposed path
    monkeypatch.setitem(calibrate._RESIDUAL_FORM, type(layer), False)
    slow_outputs, slow_seen = _sequential_run(copy.deepcopy(layer), inputs)
    assert [names for names, _ in fast_seen] == [names for names, _ in slow_seen] == list(SEQUENTIAL_SETS)
    for (_, fast), (_, slow) in zip(fast_seen, slow_seen, strict=True):
        assert torch.equal(fast, slow)
    for fast, slow in zip(fast_outputs, slow_outputs, strict=True):
        assert torch.equal(fast, slow)


def test_a_layer_of_another_form_takes_the_pass_per_set_path(tiny_model, monkeypatch):
    windows = torch.randint(0, tiny_model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(4))
    inputs = capture_first_layer_inputs(tiny_model, windows)
    layer = decoder_layers(tiny_model)[0]
    monkeypatch.setattr(calibrate, "_RESIDUAL_FORM", {})
    original = layer.forward
    # a layer whose output is scaled after the residual sum: the decomposition would get it wrong
    monkeypatch.setattr(layer, "forward", lambda *a, **k: original(*a, **k) * 0.5)
    outputs, _ = _sequential_run(layer, inputs)
    assert calibrate._RESIDUAL_FORM[type(layer)] is False
    assert all(torch.equal(out, ref) for out, ref in zip(outputs, run_layer(layer, inputs), strict=True))


def test_a_visitor_that_only_measures_runs_each_layer_once(tiny_model, monkeypatch):
    windows = torch.randint(0, tiny_model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = tiny_model(windows, output_hidden_states=True).hidden_states
    passes, seen = [], {}
    counted = calibrate.run_layer
    monkeypatch.setattr(calibrate, "run_layer", lambda layer, inputs: passes.append(1) or counted(layer, inputs))

    def measure(index, layer, inputs):
        seen[index] = torch.cat(inputs.hidden)
        _, outputs = calibrate.observe_and_run(layer, inputs)
        return outputs

    walk_layers(tiny_model, windows, measure)
    assert len(passes) == tiny_model.config.num_hidden_layers  # the walk used the visitor's outputs
    for index, hidden in seen.items():
        torch.testing.assert_close(hidden, full[index], atol=1e-5, rtol=1e-5)
