import itertools

import pytest
import torch

from conftest import build_tiny_llama
from slimlm.modules import decoder_layers, named_decoder_linears
from slimlm.quantize.codebook import CodebookLinear, pack_codebooks
from slimlm.quantize.grid import QuantGrid, fake_quantize
from slimlm.quantize.kmeans import (
    CODEBOOK_ATTRIBUTE,
    SharedCodebook,
    SortedValues,
    cluster_weight,
    lloyd,
    store_codebook,
)
from slimlm.storage import weight_modules


def _gaussian(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_hand_made_clusters_converge_to_their_means():
    centres = [-3.0, -1.0, 0.5, 4.0]
    offsets = [[-0.2, 0.2], [-0.1, 0.0, 0.1], [-0.05, -0.05, 0.1], [-0.3, 0.1, 0.2]]  # each sums to zero
    values = [c + o for c, spread in zip(centres, offsets) for o in spread]
    weight = torch.tensor(values)[torch.randperm(len(values), generator=torch.Generator().manual_seed(1))]
    codes = cluster_weight(weight.unsqueeze(0), bits=2)
    assert codes.codebook.float().squeeze(0).tolist() == pytest.approx(centres, abs=1e-3)
    expected = torch.tensor([min(range(4), key=lambda k: abs(v - centres[k])) for v in weight.tolist()])
    assert torch.equal(codes.indices.squeeze(0).long(), expected)


@pytest.mark.parametrize("bits, rows", [(2, None), (3, 4), (4, 1)])
def test_at_most_two_to_the_bits_values_per_codebook(bits, rows):
    weight = _gaussian(16, 64)
    codes = cluster_weight(weight, bits, rows_per_codebook=rows)
    decoded = codes.dequantize()
    per_codebook = decoded.reshape(codes.codebook.shape[0], -1)
    assert codes.codebook.shape == (16 // (rows or 16), 2**bits) and codes.codebook.dtype == torch.float16
    assert codes.indices.dtype == torch.uint8 and codes.indices.shape == weight.shape
    assert all(group.unique().numel() <= 2**bits for group in per_codebook)
    assert all(
        set(group.unique().tolist()) <= set(book.float().tolist()) for group, book in zip(per_codebook, codes.codebook)
    )


def test_lloyd_error_never_rises_and_matches_a_direct_count():
    values = _gaussian(1, 4096)
    data = SortedValues.of(values, torch.ones_like(values))
    start = torch.linspace(-4, -3, 16).unsqueeze(0)  # a bad start: every centroid in the left tail
    centroids, history = lloyd(data, start, iterations=200)
    assert len(history) > 10 and history[-1] < history[0] / 10
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in itertools.pairwise(history))
    nearest = (values.T - centroids).abs().argmin(dim=1)
    direct = float((values.squeeze(0) - centroids[0, nearest]).pow(2).mean())
    assert data.error(centroids) == pytest.approx(direct, rel=1e-5)
    assert direct <= history[-1] * (1 + 1e-9)  # re-assigning to the final centroids can only lower it further


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_beats_round_to_nearest_on_gaussian_weights(bits):
    weight = _gaussian(128, 256)
    kmeans_error = (cluster_weight(weight, bits).dequantize() - weight).pow(2).mean()
    rtn_error = (fake_quantize(weight, QuantGrid(bits, sym=False, group_size=None)) - weight).pow(2).mean()
    assert kmeans_error < rtn_error


def test_activation_weighting_lowers_the_weighted_error():
    weight = _gaussian(32, 64)
    weight[:, :8] *= 0.1  # small weights on loud channels: unweighted clustering gives them few levels
    energy = torch.ones(64)
    energy[:8] = 100.0

    def weighted_error(codes):
        return float(((codes.dequantize() - weight).pow(2) * energy).sum())

    plain, weighted = cluster_weight(weight, 3), cluster_weight(weight, 3, channel_energy=energy)
    assert weighted_error(weighted) < 0.6 * weighted_error(plain)


def test_codebook_linears_store_what_the_codes_take_by_hand():
    model = build_tiny_llama(300, layers=2, tie=True)
    for _, linear in named_decoder_linears(model):
        store_codebook([linear], cluster_weight(linear.weight, 4))
    before = {name: linear.weight.detach().clone() for name, linear in named_decoder_linears(model)}
    assert pack_codebooks(model) == 14 and not named_decoder_linears(model)
    # per layer: q 64×64, k/v 32×64, o 64×64, gate/up 128×64, down 64×128; 7 codebooks of 16 float16 values
    per_layer = 7 * 16 * 2 + (4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192) * 4 // 8
    modules = dict(weight_modules(model))
    assert sum(module.own_bytes() for module in modules.values()) == 2 * per_layer
    assert all(isinstance(module, CodebookLinear) for module in modules.values())
    assert all(torch.equal(modules[name].dequantize_weight(), weight) for name, weight in before.items())


def test_packed_bytes_round_up_per_tensor():
    codes = SharedCodebook(torch.zeros(1, 8, dtype=torch.float16), torch.zeros(3, 5, dtype=torch.uint8), bits=3)
    assert codes.packed_bytes() == 8 * 2 + 6  # 45 bits of indices take 6 bytes


def test_codes_ride_on_every_user_of_a_tied_tensor():
    model = build_tiny_llama(300, layers=2)
    first, second = (layer.mlp.up_proj for layer in decoder_layers(model))
    second.weight = first.weight
    store_codebook([first, second], cluster_weight(first.weight, 2))
    assert getattr(first, CODEBOOK_ATTRIBUTE) is getattr(second, CODEBOOK_ATTRIBUTE)
    assert torch.equal(second.weight, getattr(second, CODEBOOK_ATTRIBUTE).dequantize())
