import torch

from slimlm.calibrate import capture_first_layer_inputs, observe_layer, run_layer, walk_layers
from slimlm.modules import decoder_layers


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
    handle = layer.mlp.down_proj.register_forward_hook(
        lambda m, a, o: captured.append(a[0].reshape(-1, a[0].shape[-1]))
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
