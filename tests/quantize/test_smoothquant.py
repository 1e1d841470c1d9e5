import copy

import pytest
import torch
from test_awq import _logit_error, _with_outlier_channels
from test_quantize_stage import run_quantize_stage

from conftest import random_windows
from slimlm.errors import SlimlmError
from slimlm.quantize.smoothquant import replace_with_w8a8, smoothing_scales
from slimlm.quantize.w8a8 import W8A8Linear, quantize_per_token


def test_per_token_int8_round_trip_is_within_half_a_step():
    x = torch.randn(5, 64) * torch.tensor([1.0, 10.0, 0.1, 3.0, 50.0]).unsqueeze(1)
    codes, scale = quantize_per_token(x)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    assert ((codes.float() * scale - x).abs() <= scale / 2 + 1e-6).all()


def test_smoothing_scales_follow_the_formula():
    activation_max = torch.tensor([4.0, 1.0, 100.0])
    weights = [torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-4.0, 1.0, 0.25]])]
    expected = torch.tensor([4.0**0.5 / 4.0**0.5, 1.0 / 2.0**0.5, 100.0**0.5 / 0.5**0.5])
    torch.testing.assert_close(smoothing_scales(activation_max, weights, 0.5), expected)


def test_w8a8_linear_kernels_agree_and_approximate_the_float_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(3, 7, 64)
    real = W8A8Linear.from_linear(linear, kernel="int_mm")
    simulated = W8A8Linear.from_linear(linear, kernel="simulated")
    assert real.weight_int8.dtype == torch.int8
    torch.testing.assert_close(real(x), simulated(x), rtol=1e-5, atol=1e-5)  # same integers either way
    relative = (real(x) - linear(x)).norm() / linear(x).norm()
    assert 0 < relative < 0.02


def test_smoothquant_beats_plain_w8a8_with_outlier_activations(tiny_model):
    original = _with_outlier_channels(tiny_model, factor=100.0)
    windows = random_windows(original, samples=4, seq_len=32)
    plain = copy.deepcopy(original)
    for layer in plain.model.layers:
        replace_with_w8a8(
            layer,
            [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ],
            "int_mm",
        )
    smooth = copy.deepcopy(original)
    context = run_quantize_stage(smooth, windows, method="smoothquant", bits=8, group_size=None)
    assert sum(isinstance(m, W8A8Linear) for m in smooth.modules()) == 2 * 7
    assert _logit_error(smooth, original, windows) < 0.5 * _logit_error(plain, original, windows)
    assert any("torch._int_mm" in note for note in context.notes)


def test_smoothquant_refuses_other_bit_widths(tiny_model):
    with pytest.raises(SlimlmError, match=r"quantize\.bits: Input should be 8"):
        run_quantize_stage(tiny_model, random_windows(tiny_model), method="smoothquant", bits=4, group_size=None)


def test_w8a8_models_count_their_int8_weights_and_name_their_kernel(tiny_model):
    from slimlm.evaluate.footprint import parameter_counts
    from slimlm.storage import kernel_summary as kernel_label

    before = parameter_counts(tiny_model)
    model = copy.deepcopy(tiny_model)
    run_quantize_stage(model, random_windows(model, 2, 16), method="smoothquant", bits=8, group_size=None)
    after = parameter_counts(model)
    assert after["total"] == before["total"] and after["linear_total"] == before["linear_total"]
    linears = 7 * model.config.num_hidden_layers
    assert kernel_label(model) == f"W8A8 int8×int8 (torch._int_mm) ×{linears}"
