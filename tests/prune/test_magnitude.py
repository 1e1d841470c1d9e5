import pytest
import torch

from conftest import run_stage
from slimlm.modules import named_decoder_linears


def _run_prune(model, **options):
    return run_stage(model, "prune", **options)


def test_magnitude_prunes_each_matrix_to_the_target_and_keeps_the_largest(tiny_model):
    before = {name: linear.weight.detach().clone() for name, linear in named_decoder_linears(tiny_model)}
    embed = tiny_model.model.embed_tokens.weight.detach().clone()
    context = _run_prune(tiny_model, method="magnitude", sparsity=0.5)
    for name, linear in named_decoder_linears(tiny_model):
        weight, original = linear.weight.detach(), before[name]
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=1 / weight.numel())
        kept = original[weight != 0].abs()
        dropped = original[weight == 0].abs()
        assert kept.min() >= dropped.max()
        assert torch.equal(weight[weight != 0], original[weight != 0])
    assert torch.equal(tiny_model.model.embed_tokens.weight, embed)  # embeddings and LM head are not pruned
    assert any("no faster" in note for note in context.notes)


def test_magnitude_two_four(tiny_model):
    _run_prune(tiny_model, method="magnitude", pattern="2:4")
    for _, linear in named_decoder_linears(tiny_model):
        groups = (linear.weight != 0).view(linear.weight.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all()
