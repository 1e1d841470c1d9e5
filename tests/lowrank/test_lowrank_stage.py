"""The lowrank stage on tiny LLaMA models: SVD factorization, EoRA after quantization, and their errors."""

import copy

import pytest
import torch
from torch import nn

import conftest
from conftest import build_tiny_llama, random_windows
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import parameter_counts
from slimlm.lowrank.layers import CompensatedLinear, LowRankLinear
from slimlm.modules import decoder_layers, named_decoder_linears
from slimlm.recipe import parse_recipe
from slimlm.surgery import keep_mlp_channels

VOCAB = 300


@pytest.fixture()
def original():
    return build_tiny_llama(VOCAB)


def run_stage(model, original, name, **options):
    """One stage with seeded random calibration windows and `original` as the uncompressed model."""
    return conftest.run_stage(model, name, original=original, **options)


def _log_probs(model, windows):
    with torch.no_grad():
        return model(windows, use_cache=False).logits.log_softmax(-1)


def _kl(reference, model, windows) -> float:
    """Mean KL(reference ‖ model) of the next-token distributions."""
    p, q = _log_probs(reference, windows), _log_probs(model, windows)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_full_rank_svd_keeps_the_model(original):
    model = copy.deepcopy(original)
    context = run_stage(model, original, "lowrank", method="svd", rank_ratio=1.0, targets=["up_proj", "down_proj"])
    windows = random_windows(model, 2, 16, seed=1)
    torch.testing.assert_close(_log_probs(model, windows), _log_probs(original, windows), rtol=1e-4, atol=1e-4)
    for layer in decoder_layers(model):
        assert isinstance(layer.mlp.up_proj, LowRankLinear) and isinstance(layer.mlp.down_proj, LowRankLinear)
        assert type(layer.mlp.gate_proj) is nn.Linear and type(layer.self_attn.q_proj) is nn.Linear
    assert any("rank_ratio 1.0 of min(in, out): rank 64" in note for note in context.notes)
    assert any("4 of 4 factorized Linears are not smaller" in note for note in context.notes)


def test_svd_default_targets_the_mlp_and_shrinks_it(original):
    model = copy.deepcopy(original)
    before = parameter_counts(model)
    context = run_stage(model, original, "lowrank", method="svd", rank=16)
    factorized = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    assert len(factorized) == 6 and all(".mlp." in name for name in factorized)
    # each MLP matrix: 128·64 weights → 16·(128 + 64) factor weights; the footprint counts the factors
    assert parameter_counts(model)["total"] == before["total"] - 6 * (128 * 64 - 16 * 192)
    # the factorized projections are no longer decoder Linears: pruning and quantization leave them alone
    assert [name for name, _ in named_decoder_linears(model) if ".mlp." in name] == []
    assert any("lowrank: truncated SVD (rank 16) of 6 decoder Linears" in note for note in context.notes)
    assert not any("not smaller" in note for note in context.notes)


def test_eora_after_rtn_lowers_the_error_against_the_original(original):
    model = copy.deepcopy(original)
    run_stage(model, original, "quantize", method="rtn", bits=3, group_size=16, pack=False)
    windows = random_windows(model, 4, 32, seed=1)
    quantized_kl = _kl(original, model, windows)
    quantized_weights = {name: linear.weight.clone() for name, linear in named_decoder_linears(model)}
    context = run_stage(model, original, "lowrank", method="eora", rank=16)
    compensated_kl = _kl(original, model, windows)
    assert compensated_kl < 0.5 * quantized_kl
    wrapped = {name: module for name, module in model.named_modules() if isinstance(module, CompensatedLinear)}
    assert sorted(wrapped) == sorted(quantized_weights)
    for name, module in wrapped.items():  # the quantized weights are kept as they are, the factors beside them
        assert torch.equal(module.base.weight, quantized_weights[name]) and module.a.dtype == torch.float16
    assert any("EoRA (rank 16) compensates the compression error of 14 decoder Linears" in n for n in context.notes)


def test_eora_leaves_uncompressed_targets_alone(original):
    model = copy.deepcopy(original)
    run_stage(model, original, "quantize", method="rtn", bits=3, group_size=16, targets=["down_proj"], pack=False)
    context = run_stage(model, original, "lowrank", method="eora", rank_ratio=0.25)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, CompensatedLinear)]
    assert wrapped == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert any("12 targets equal the original" in note for note in context.notes)


def test_eora_refuses_a_width_pruned_model(original):
    model = copy.deepcopy(original)
    keep_mlp_channels(decoder_layers(model)[1], list(range(96)))
    with pytest.raises(SlimlmError) as error:
        run_stage(model, original, "lowrank", method="eora", rank=4, targets=["up_proj"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "lowrank (eora): model.layers.1.mlp.up_proj has a [96, 64] weight but the original has a [128, 64] weight"
    )


@pytest.mark.parametrize("method", ["svd", "eora"])
def test_a_rank_above_the_full_rank_names_the_module_and_changes_nothing(original, method):
    model = copy.deepcopy(original)
    run_stage(model, original, "quantize", method="rtn", bits=4, group_size=16, pack=False)
    with pytest.raises(SlimlmError) as error:
        run_stage(model, original, "lowrank", method=method, rank=33, targets=["q_proj", "k_proj"])
    assert str(error.value) == (
        "lowrank.rank: 33 exceeds the full rank 32 of model.layers.0.self_attn.k_proj (32 "
        "outputs × 64 inputs); use at most 32, or a rank_ratio"
    )
    assert len(named_decoder_linears(model)) == 14  # nothing replaced or wrapped


def test_factors_overflowing_float16_are_an_error(original):
    """An error too large for float16 factors (here: an original 10⁶ times larger) must not become Inf silently."""
    model = copy.deepcopy(original)
    decoder_layers(original)[0].mlp.up_proj.weight.data *= 1e6
    with pytest.raises(
        SlimlmError,
        match=r"^lowrank \(eora\): the factors of model\.layers\.0\.mlp\.up_proj are "
        r"not finite \(NaN/Inf\)",
    ):
        run_stage(model, original, "lowrank", method="eora", rank=4, targets=["up_proj"])


def test_non_finite_weights_are_an_error(original):
    model = copy.deepcopy(original)
    decoder_layers(model)[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(SlimlmError, match=r"^lowrank \(svd\): the weights of model\.layers\.1\.mlp\.down_proj are"):
        run_stage(model, original, "lowrank", method="svd", rank=4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "stages[0].lowrank: set exactly one of rank, rank_ratio, energy (got none)"),
        (
            {"rank": 4, "energy": 0.9},
            "stages[0].lowrank: set exactly one of rank, rank_ratio, energy (got rank, energy)",
        ),
        ({"method": "eora", "energy": 0.9}, "stages[0].lowrank.energy: unknown option"),
        ({"method": "eora"}, "stages[0].lowrank: set exactly one of rank, rank_ratio (got none)"),
        ({"rank": 0}, "stages[0].lowrank.rank: "),
        ({"rank_ratio": 1.5}, "stages[0].lowrank.rank_ratio: "),
        ({"energy": 0}, "stages[0].lowrank.energy: "),
        ({"method": "tucker", "rank": 4}, "stages[0].lowrank.method: "),
        (
            {"rank": 4, "targets": ["q_proj", "qkv_proj"]},
            "stages[0].lowrank.targets[1]: Input should be 'q_proj', "
            "'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj' or "
            "'down_proj'",
        ),
        ({"rank": 4, "targets": []}, "stages[0].lowrank.targets: List should have at least 1 item"),
        ({"rank": 4, "rnak": 3}, "stages[0].lowrank.rnak: unknown option"),
    ],
)
def test_options_are_validated_in_one_line(options, message):
    with pytest.raises(SlimlmError) as error:
        parse_recipe({"model": "m", "stages": [{"lowrank": options}]})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_eora_observes_inputs_after_the_compensation_before_them(original, monkeypatch):
    """True-sequential within a layer, and later layers see the compensated layers' outputs."""
    from slimlm.lowrank import eora

    model = copy.deepcopy(original)
    run_stage(model, original, "quantize", method="rtn", bits=3, group_size=16, pack=False)
    seen, observe = [], eora._input_covariances

    def recording(layer, inputs, modules):
        compensated = sorted(n for n, m in model.named_modules() if isinstance(m, CompensatedLinear))
        seen.append((sorted(modules), len(compensated)))
        return observe(layer, inputs, modules)

    monkeypatch.setattr(eora, "_input_covariances", recording)
    run_stage(model, original, "lowrank", method="eora", rank=4)
    qkv = ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
    order = [qkv, ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert [names for names, _ in seen] == order * 2
    assert [count for _, count in seen] == [0, 3, 4, 6, 7, 10, 11, 13]


def test_attention_weighted_v_fits_each_kv_head_in_its_own_eigenspace(original):
    plain, weighted = copy.deepcopy(original), copy.deepcopy(original)
    for model in (plain, weighted):
        run_stage(model, original, "quantize", method="rtn", bits=3, group_size=16, pack=False)
    run_stage(plain, original, "lowrank", method="eora", rank=5)
    run_stage(weighted, original, "lowrank", method="eora", rank=5, attention_weighted_v=True)
    heads = original.config.num_key_value_heads
    shares = [5 // heads + (head < 5 % heads) for head in range(heads)]
    for layer_plain, layer_weighted in zip(decoder_layers(plain), decoder_layers(weighted), strict=True):
        value = layer_weighted.self_attn.v_proj
        assert value.rank == 5  # the same size as the plain pair
        rows, column = value.out_features // heads, 0
        for head, share in enumerate(shares):  # B is block-diagonal: each head's rows use only its share of the rank
            block = value.b[head * rows : (head + 1) * rows].float()
            assert block[:, column : column + share].abs().sum() > 0
            assert block[:, :column].abs().sum() == 0 and block[:, column + share :].abs().sum() == 0
            column += share
        assert not torch.equal(value.b, layer_plain.self_attn.v_proj.b)
    first_plain, first_weighted = decoder_layers(plain)[0], decoder_layers(weighted)[0]  # same inputs: q_proj alike
    assert torch.equal(first_weighted.self_attn.q_proj.a, first_plain.self_attn.q_proj.a)


def test_row_block_factors_fit_each_block_on_its_own():
    from slimlm.lowrank.eora import _row_block_factors
    from slimlm.lowrank.factorize import eora_factors

    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 8, generator=generator)
    inputs = [torch.randn(64, 8, generator=generator) for _ in range(3)]
    covariances = [x.T @ x for x in inputs]
    a, b = _row_block_factors(delta, covariances, 4)  # shares 2, 1, 1
    for (start, end, first, last), covariance in zip([(0, 4, 0, 2), (4, 8, 2, 3), (8, 12, 3, 4)], covariances):
        block_a, block_b = eora_factors(delta[start:end], covariance, last - first)
        torch.testing.assert_close(a[first:last], block_a)
        torch.testing.assert_close(b[start:end, first:last], block_b)
