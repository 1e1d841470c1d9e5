import pytest
import torch

from conftest import build_tiny_llama
from slimlm import value_hessian
from slimlm.calibrate import capture_first_layer_inputs
from slimlm.modules import decoder_layers
from slimlm.quantize.gptq import GPTQOptions, per_head_solve
from slimlm.quantize.grid import QuantGrid
from slimlm.value_hessian import _received_blockwise, _received_fused, value_hessians


def _expected_value_hessians(model, windows):
    """From the model's own eager attention probabilities: H_g = 2/n Σ_t m_gt x_t x_tᵀ, m_gt = attention received
    by token t summed over queries, averaged over the query heads of KV head g."""
    model.config._attn_implementation = "eager"
    captured = {}
    layer = decoder_layers(model)[0]
    handle = layer.self_attn.v_proj.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    try:
        attentions = model(windows, output_attentions=True).attentions[0]  # [batch, heads, query, key]
    finally:
        handle.remove()
    x = captured["x"].float()
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    received = attentions.sum(dim=2)  # [batch, heads, key]
    received = received.view(received.shape[0], -1, groups, received.shape[-1]).mean(dim=2)
    n = x.shape[0] * x.shape[1]
    return [2 / n * torch.einsum("bt,bti,btj->ij", received[:, g], x, x) for g in range(received.shape[1])], received


@pytest.mark.parametrize("query_block", [7, 256])
@torch.no_grad()
def test_value_hessians_weigh_each_token_by_the_attention_it_receives(tiny_tokenizer, monkeypatch, query_block):
    monkeypatch.setattr(value_hessian, "_QUERY_BLOCK", query_block)  # blocks of queries give the same sums
    model = build_tiny_llama(len(tiny_tokenizer), seed=3)
    windows = torch.randint(0, len(tiny_tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_first_layer_inputs(model, windows)
    ours = value_hessians(decoder_layers(model)[0], inputs)
    expected, received = _expected_value_hessians(model, windows)
    assert len(ours) == model.config.num_key_value_heads
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the weights average to one over a window's tokens, so H keeps GPTQ's usual scale; the first token gets most
    torch.testing.assert_close(received.mean(dim=-1), torch.ones_like(received.mean(dim=-1)))
    assert (received[..., 0] > received[..., 1:].amax(dim=-1)).all()


def test_per_head_gptq_solves_each_row_block_with_its_own_hessian():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 32, generator=generator)
    inputs = [torch.randn(64, 32, generator=generator) * torch.logspace(-1, 0.5, 32) for _ in range(2)]
    hessians = [2 * x.T @ x / 64 for x in inputs]
    grid = QuantGrid(4, True, 16)
    options = GPTQOptions(method="gptq", blocksize=8)
    stacked, _ = per_head_solve(weight, hessians, grid, options)
    alone, _ = per_head_solve(weight[4:], hessians[1:], grid, options)
    assert stacked.codes.shape == weight.shape and stacked.scale.shape == (8, 2)
    torch.testing.assert_close(stacked.dequantize()[4:], alone.dequantize())
    swapped, _ = per_head_solve(weight, hessians[::-1], grid, options)
    assert not torch.equal(swapped.codes, stacked.codes)  # the Hessian of each block is the one that was used


@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_the_fused_received_attention_equals_the_attention_matrix_summed(spread):
    """Two calls of the fused CPU kernel (log-sum-exp with the roles swapped) give what building the causal
    attention matrix block by block and summing it over the queries gives, to float32 rounding."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 300, 16, generator=generator) * spread
    key = torch.randn(2, 3, 300, 16, generator=generator) * spread
    fused = _received_fused(query, key, 0.25)
    blockwise = _received_blockwise(query, key, 0.25)
    torch.testing.assert_close(fused, blockwise, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused.sum(dim=-1), torch.full((2, 3), 300.0), rtol=1e-5, atol=0)
