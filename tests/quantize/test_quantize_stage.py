import copy

import pytest
import torch

from conftest import random_windows, run_stage
from slimlm.errors import SlimlmError
from slimlm.modules import decoder_layers, named_decoder_linears
from slimlm.quantize import gptq as gptq_module
from slimlm.quantize.grid import QuantGrid, quantize_codes
from slimlm.quantize.stage import QUANTIZED_ATTRIBUTE
from slimlm.recipe import parse_recipe


def run_quantize_stage(model, windows, **options):
    """The quantize stage with these calibration windows (the recipe's data is not loaded); returns the context."""
    return run_stage(model, "quantize", windows, **options)


def _logits(model, windows):
    with torch.no_grad():
        return model(windows, use_cache=False).logits


@pytest.mark.parametrize(
    "options",
    [
        {"method": "rtn", "bits": 4, "group_size": 32},
        {"method": "gptq", "bits": 4, "group_size": 32, "blocksize": 16},
        {"method": "gptq", "bits": 3, "group_size": None, "sym": False, "act_order": True},
    ],
)
def test_the_stage_puts_every_decoder_linear_on_its_grid(tiny_model, options):
    windows = random_windows(tiny_model)
    before = _logits(tiny_model, windows)
    context = run_quantize_stage(tiny_model, windows, pack=False, **options)  # packing: test_packed.py
    grid = QuantGrid(options["bits"], options.get("sym", True), options["group_size"])
    assert len(named_decoder_linears(tiny_model)) == 14
    for _, linear in named_decoder_linears(tiny_model):
        quantized = getattr(linear, QUANTIZED_ATTRIBUTE)
        assert quantized.grid == grid
        assert torch.equal(linear.weight, quantized.dequantize())  # float32 model: exactly the grid values
    after = _logits(tiny_model, windows)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    assert any(f"quantize: {options['method']}, {options['bits']}-bit" in note for note in context.notes)
    assert any("not packed (pack: false)" in note for note in context.notes)


def test_rtn_stage_is_round_to_nearest_of_each_weight(tiny_model):
    originals = {name: linear.weight.detach().clone() for name, linear in named_decoder_linears(tiny_model)}
    run_quantize_stage(tiny_model, random_windows(tiny_model), method="rtn", bits=8, group_size=None, pack=False)
    for name, linear in named_decoder_linears(tiny_model):
        expected = quantize_codes(originals[name], QuantGrid(8, True, None))
        assert torch.equal(getattr(linear, QUANTIZED_ATTRIBUTE).codes, expected.codes)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_only_the_targets_are_quantized(tiny_model, method):
    originals = {name: linear.weight.detach().clone() for name, linear in named_decoder_linears(tiny_model)}
    run_quantize_stage(
        tiny_model, random_windows(tiny_model), method=method, targets=["v_proj", "down_proj"], pack=False
    )
    assert len(named_decoder_linears(tiny_model)) == 14
    for name, linear in named_decoder_linears(tiny_model):
        targeted = name.endswith(("v_proj", "down_proj"))
        assert hasattr(linear, QUANTIZED_ATTRIBUTE) == targeted
        assert torch.equal(linear.weight, originals[name]) != targeted


def test_gptq_is_true_sequential_within_a_layer(tiny_model, monkeypatch):
    observed = []
    original = gptq_module.true_sequential

    def recording(layer, inputs, names, visit_set, **kwargs):
        def visit(set_names, stats):
            observed.append(list(set_names))
            visit_set(set_names, stats)

        return original(layer, inputs, names, visit, **kwargs)

    monkeypatch.setattr(gptq_module, "true_sequential", recording)
    run_quantize_stage(
        tiny_model, random_windows(tiny_model), method="gptq", targets=["q_proj", "v_proj", "o_proj", "down_proj"]
    )
    per_layer = [["self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.down_proj"]]
    assert observed == per_layer * len(decoder_layers(tiny_model))


MIXED = {"q_proj": {"bits": 3, "group_size": 16}, "down_proj": {"bits": 8, "group_size": None}}


def _mixed_grid(name: str) -> QuantGrid:
    if name.endswith("q_proj"):
        return QuantGrid(3, True, 16)
    return QuantGrid(8, True, None) if name.endswith("down_proj") else QuantGrid(4, True, 32)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_per_projection_grids_are_taken_in_one_stage(tiny_model, method):
    context = run_quantize_stage(
        tiny_model, random_windows(tiny_model), method=method, bits=4, group_size=32, per_projection=MIXED, pack=False
    )
    for name, linear in named_decoder_linears(tiny_model):
        quantized = getattr(linear, QUANTIZED_ATTRIBUTE)
        assert quantized.grid == _mixed_grid(name), name
        assert torch.equal(linear.weight, quantized.dequantize())
    note = next(n for n in context.notes if n.startswith(f"quantize: {method},"))
    assert "group size 32; q_proj 3-bit group size 16; down_proj 8-bit per output channel" in note


def test_gptq_per_projection_solves_each_grid_as_a_stage_of_that_grid_would(tiny_model):
    """Layer 0's q_proj reads the original embeddings either way: its own 3-bit solve in a mixed stage (k and v at 4
    bits, solved apart) gives the codes of a uniform 3-bit stage, where q, k and v are one stacked solve."""
    windows, uniform = random_windows(tiny_model), copy.deepcopy(tiny_model)
    run_quantize_stage(tiny_model, windows, method="gptq", group_size=32, per_projection=MIXED, pack=False)
    run_quantize_stage(uniform, windows, method="gptq", bits=3, group_size=16, pack=False)
    mixed, alone = (getattr(decoder_layers(m)[0].self_attn.q_proj, QUANTIZED_ATTRIBUTE) for m in (tiny_model, uniform))
    assert mixed.grid == alone.grid and torch.equal(mixed.codes, alone.codes)
    k_proj = getattr(decoder_layers(tiny_model)[0].self_attn.k_proj, QUANTIZED_ATTRIBUTE)
    assert k_proj.grid == QuantGrid(4, True, 32)


def test_a_per_projection_group_size_that_does_not_divide_fails_in_one_line(tiny_model):
    with pytest.raises(SlimlmError) as error:
        run_quantize_stage(
            tiny_model,
            random_windows(tiny_model),
            method="rtn",
            per_projection={"o_proj": {"bits": 4, "group_size": 48}},
        )
    assert str(error.value).startswith(
        "quantize.per_projection.o_proj.group_size: 48 does not divide the 64 input features of "
        "model.layers.0.self_attn.o_proj"
    )


def test_a_dead_input_in_the_model_is_noted_and_causes_no_nan(tiny_model):
    decoder_layers(tiny_model)[0].input_layernorm.weight.data[3] = 0  # q/k/v of layer 0 never see channel 3
    context = run_quantize_stage(
        tiny_model, random_windows(tiny_model), method="gptq", bits=3, act_order=True, pack=False
    )
    for _, linear in named_decoder_linears(tiny_model):
        assert torch.isfinite(linear.weight).all()
    assert (decoder_layers(tiny_model)[0].self_attn.q_proj.weight[:, 3] == 0).all()
    assert any("layers.0.self_attn.q_proj had 1 inputs always zero" in note for note in context.notes)


def test_a_group_size_that_does_not_divide_a_target_fails_in_one_line(tiny_model):
    with pytest.raises(SlimlmError) as error:
        run_quantize_stage(tiny_model, random_windows(tiny_model), method="rtn", group_size=48)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "quantize.group_size: 48 does not divide the 64 input features of model.layers.0.self_attn.q_proj"
    )
    assert not any(hasattr(linear, QUANTIZED_ATTRIBUTE) for _, linear in named_decoder_linears(tiny_model))


def test_non_finite_weights_are_reported_with_the_module_name(tiny_model):
    decoder_layers(tiny_model)[1].mlp.up_proj.weight.data[0, 0] = float("inf")
    with pytest.raises(SlimlmError, match=r"quantize \(rtn\): model\.layers\.1\.mlp\.up_proj\.weight has non-finite"):
        run_quantize_stage(tiny_model, random_windows(tiny_model), method="rtn")


def test_bfloat16_rounding_off_the_grid_is_noted(tiny_model):
    tiny_model.to(torch.bfloat16)
    context = run_quantize_stage(tiny_model, random_windows(tiny_model), method="rtn", bits=8)
    assert any("rounded to bfloat16 and sit slightly off the grid" in note for note in context.notes)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 9}, "stages[0].quantize.bits: Input should be less than or equal to 8"),
        ({"bits": 1}, "stages[0].quantize.bits: Input should be greater than or equal to 2"),
        (
            {"targets": ["q_proj", "qkv_proj"]},
            "stages[0].quantize.targets[1]: Input should be 'q_proj', 'k_proj', "
            "'v_proj', 'o_proj', 'gate_proj', 'up_proj' or 'down_proj'",
        ),
        ({"targets": []}, "stages[0].quantize.targets: List should have at least 1 item"),
        ({"method": "gptq", "damp": 0}, "stages[0].quantize.damp: Input should be greater than 0"),
        ({"method": "gptq", "damp": 1}, "stages[0].quantize.damp: Input should be less than 1"),
        ({"group_size": 0}, "stages[0].quantize.group_size: Input should be greater than 0"),
        ({"group_size": -1}, "stages[0].quantize.group_size: Input should be greater than 0"),
        ({"method": "hqq"}, "stages[0].quantize.method: unknown method 'hqq'; known: awq, gptq, rtn, smoothquant"),
        ({"method": "gptq", "blocksize": 0}, "stages[0].quantize.blocksize: Input should be greater than or equal"),
        ({"bitz": 4}, "stages[0].quantize.bitz: unknown option"),
        # each method takes its own options only
        ({"act_order": True}, "stages[0].quantize.act_order: unknown option"),
        ({"method": "awq", "damp": 0.1}, "stages[0].quantize.damp: unknown option"),
        ({"method": "gptq", "search_tokens": 64}, "stages[0].quantize.search_tokens: unknown option"),
        ({"method": "smoothquant", "pack": False}, "stages[0].quantize.pack: unknown option"),
        ({"method": "smoothquant", "bits": 4}, "stages[0].quantize.bits: Input should be 8"),
        ({"method": "smoothquant", "alpha": 1.5}, "stages[0].quantize.alpha: Input should be less than or equal to 1"),
        ({"alpha": 0.5}, "stages[0].quantize.alpha: unknown option"),
        (
            {"targets": ["v_proj"], "per_projection": {"q_proj": {"bits": 3, "group_size": 64}}},
            "stages[0].quantize: per_projection: q_proj not among the targets (v_proj)",
        ),
        (
            {"per_projection": {"q_proj": {"bits": 9, "group_size": 64}}},
            "stages[0].quantize.per_projection.q_proj.bits: Input should be less than or equal to 8",
        ),
        ({"per_projection": {"q_proj": {"bits": 3}}}, "stages[0].quantize.per_projection.q_proj.group_size: Field"),
        ({"per_projection": {"qkv": {"bits": 3, "group_size": 64}}}, "stages[0].quantize.per_projection.qkv"),
    ],
)
def test_options_are_validated_in_one_line(options, message):
    with pytest.raises(SlimlmError) as error:
        parse_recipe({"model": "m", "stages": [{"quantize": options}]})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
