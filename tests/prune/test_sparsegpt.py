import copy

import pytest
import torch

from conftest import random_windows, run_prune_stage
from slimlm.calibrate import capture_first_layer_inputs, observe_layer
from slimlm.errors import SlimlmError
from slimlm.modules import decoder_layers, layer_linears, named_decoder_linears
from slimlm.prune.masks import nm_mask, unstructured_mask
from slimlm.prune.sparsegpt import SparseGPT, inverse_hessian_factor
from slimlm.recipe import parse_recipe


def _hessian(inputs: torch.Tensor) -> torch.Tensor:
    return 2 * inputs.T @ inputs / inputs.shape[0]


@pytest.mark.parametrize("sparsity", [0.5, 0.37])
def test_sparsegpt_prunes_each_matrix_to_exactly_the_target(tiny_model, sparsity):
    # blocksize 16 puts several mask blocks in every matrix: their drop counts must add up to the matrix's
    run_prune_stage(tiny_model, random_windows(tiny_model), method="sparsegpt", sparsity=sparsity, blocksize=16)
    for _, linear in named_decoder_linears(tiny_model):
        assert torch.isfinite(linear.weight).all()
        assert (linear.weight == 0).sum().item() == int(linear.weight.numel() * sparsity)


def test_sparsegpt_two_four_is_exact(tiny_model):
    context = run_prune_stage(tiny_model, random_windows(tiny_model), method="sparsegpt", pattern="2:4", blocksize=32)
    for _, linear in named_decoder_linears(tiny_model):
        assert ((linear.weight != 0).view(linear.weight.shape[0], -1, 4).sum(-1) == 2).all()
    assert any("sparsegpt: blocksize 32" in note for note in context.notes)


def test_singular_hessian_with_a_dead_input_gives_no_nan_and_the_exact_count():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 64, generator=generator)  # 8 tokens for 64 inputs: H has rank 8
    inputs[:, 5] = 0  # an input channel that is always zero
    weight = torch.randn(32, 64, generator=generator)
    pruner = SparseGPT(weight, _hessian(inputs))
    pruned = pruner.prune(0.5, blocksize=16)
    assert pruner.dead_inputs == 1
    assert torch.isfinite(pruned).all()
    assert (pruned[:, 5] == 0).all()
    assert (pruned == 0).sum().item() == 32 * 64 // 2
    two_four = SparseGPT(weight, _hessian(inputs)).prune(0.5, nm=(2, 4), blocksize=16)
    assert torch.isfinite(two_four).all() and ((two_four != 0).view(32, 16, 4).sum(-1) <= 2).all()


def test_all_dead_or_non_finite_statistics_still_give_finite_weights():
    weight = torch.randn(8, 16)
    all_dead = SparseGPT(weight, torch.zeros(16, 16)).prune(0.5)
    assert torch.isfinite(all_dead).all() and (all_dead == 0).all()  # nothing ever reached these inputs
    broken = torch.eye(16)
    broken[3, 3] = float("nan")
    pruner = SparseGPT(weight, broken)
    pruned = pruner.prune(0.5)
    assert pruner.damp_used is None  # no compensation: the smallest |w| of each block are dropped
    assert torch.equal(pruned != 0, unstructured_mask(weight.abs(), 0.5))
    assert torch.equal(pruned[pruned != 0], weight[pruned != 0])


def test_damping_escalates_until_the_cholesky_factorization_succeeds():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(4, 32, generator=generator)
    hessian = _hessian(inputs)
    hessian -= 0.05 * hessian.diagonal().mean() * torch.eye(32)  # indefinite: 1 % damping is not enough
    upper, damp_used = inverse_hessian_factor(hessian, 0.01)
    assert damp_used == pytest.approx(0.1)
    assert torch.isfinite(upper).all()
    assert torch.allclose(
        upper.T @ upper, torch.linalg.inv(hessian + 0.1 * hessian.diagonal().mean() * torch.eye(32)), atol=1e-4
    )


def test_a_dead_input_in_the_model_is_noted_and_causes_no_nan(tiny_model):
    decoder_layers(tiny_model)[0].input_layernorm.weight.data[3] = 0  # q/k/v of layer 0 never see channel 3
    context = run_prune_stage(tiny_model, random_windows(tiny_model), method="sparsegpt", sparsity=0.5)
    for _, linear in named_decoder_linears(tiny_model):
        assert torch.isfinite(linear.weight).all()
        assert (linear.weight == 0).sum().item() == linear.weight.numel() // 2
    assert any("layers.0.self_attn.q_proj had 1 inputs always zero" in note for note in context.notes)


def _reconstruction_error(original, pruned, hessian, tokens):
    """‖WX − ŴX‖² over the calibration tokens, from H = 2/n·XᵀX."""
    delta = (original - pruned).double()
    return (delta @ hessian.double() @ delta.T).trace().item() * tokens / 2


@pytest.mark.parametrize("name", ["self_attn.q_proj", "mlp.down_proj"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_obs_update_reconstructs_the_layer_better_than_magnitude_and_wanda(tiny_model, name, pattern):
    windows = random_windows(tiny_model, samples=8, seq_len=32)
    layer = decoder_layers(tiny_model)[0]
    stats = observe_layer(layer, capture_first_layer_inputs(tiny_model, windows), [name], hessian=True)[name]
    weight = layer_linears(layer)[name].weight.detach().float()
    hessian = stats.hessian()
    wanda_scores = weight.abs() * stats.channel_norm()
    if pattern == "2:4":
        masks = {"magnitude": nm_mask(weight.abs(), 2, 4), "wanda": nm_mask(wanda_scores, 2, 4)}
        sparsegpt = SparseGPT(weight, hessian).prune(0.5, nm=(2, 4), blocksize=32)
    else:
        masks = {
            "magnitude": unstructured_mask(weight.abs(), 0.5),
            "wanda": unstructured_mask(wanda_scores, 0.5, per_row=True),
        }
        sparsegpt = SparseGPT(weight, hessian).prune(0.5, blocksize=32)
    assert (sparsegpt == 0).sum() == (masks["magnitude"] == 0).sum() == (masks["wanda"] == 0).sum()
    errors = {
        method: _reconstruction_error(weight, weight * mask, hessian, stats.count) for method, mask in masks.items()
    }
    ours = _reconstruction_error(weight, sparsegpt, hessian, stats.count)
    assert ours < 0.9 * min(errors.values()), (ours, errors)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"method": "sparsegpt", "pattern": "2:4", "blocksize": 6},
            "stages[0].prune.blocksize: must be a multiple of M=4 for sparsegpt with pattern 2:4",
        ),
        ({"method": "sparsegpt", "damp": 0}, "stages[0].prune.damp: "),
        ({"method": "sparsegpt", "blocksize": 0}, "stages[0].prune.blocksize: "),
        ({"method": "wanda", "blocksize": 64}, "stages[0].prune.blocksize: unknown option"),
        ({"damp": 0.1}, "stages[0].prune.damp: unknown option"),
    ],
)
def test_sparsegpt_options_are_validated_in_one_line(options, message):
    with pytest.raises(SlimlmError) as error:
        parse_recipe({"model": "m", "stages": [{"prune": options}]})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_attention_weighted_v_prunes_each_kv_head_with_its_own_hessian(tiny_model):
    plain, weighted = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    windows = random_windows(tiny_model)
    run_prune_stage(plain, windows, method="sparsegpt", sparsity=0.5, attention_weighted_v=False)
    run_prune_stage(weighted, windows, method="sparsegpt", sparsity=0.5)  # the default
    heads = tiny_model.config.num_key_value_heads
    for layer_plain, layer_weighted in zip(decoder_layers(plain), decoder_layers(weighted), strict=True):
        value = layer_weighted.self_attn.v_proj.weight
        for block in value.split(value.shape[0] // heads):  # every head's rows pruned to the target on its own
            assert int((block == 0).sum()) == block.numel() // 2
        assert not torch.equal(value, layer_plain.self_attn.v_proj.weight)  # another Hessian was used
    first_plain, first_weighted = decoder_layers(plain)[0], decoder_layers(weighted)[0]  # same inputs: q_proj alike
    assert torch.equal(first_weighted.self_attn.q_proj.weight, first_plain.self_attn.q_proj.weight)
