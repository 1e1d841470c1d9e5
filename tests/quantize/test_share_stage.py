import pytest
import torch

from conftest import build_tiny_llama, random_windows
from slimlm.calibration import Calibration
from slimlm.errors import SlimlmError
from slimlm.modules import decoder_layers
from slimlm.quantize.codebook import CodebookLinear
from slimlm.quantize.share import ShareOptions, share
from slimlm.recipe import CalibrationConfig, parse_recipe
from slimlm.registry import StageContext, get_stage
from slimlm.storage import TIED_KEY as TIED_PARAMETERS_KEY


def _share(model, windows=None, **options) -> StageContext:
    """Run the stage directly (no recipe file); `windows` stand in for the calibration data."""
    context = StageContext(
        tokenizer=None,
        calibration=Calibration(CalibrationConfig(samples=4, seq_len=16), windows=windows),
        output_dir=None,
    )
    share(model, get_stage("share").options_model(options).model_validate(options), context)
    return context


def _logits(model, windows):
    with torch.no_grad():
        return model(windows, use_cache=False).logits


def test_the_stage_is_registered():
    assert get_stage("share").options is ShareOptions


@pytest.mark.parametrize(
    "options",
    [
        {"bits": 3},
        {"bits": 2, "granularity": "row_group", "rows_per_codebook": 16},
        {"bits": 4, "weighted": True, "targets": ["up_proj", "down_proj"]},
    ],
)
def test_kmeans_puts_every_target_on_its_codebook(tiny_model, options):
    windows = random_windows(tiny_model)
    before = _logits(tiny_model, windows)
    context = _share(tiny_model, windows, **options)
    targets = options.get("targets", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    for layer in decoder_layers(tiny_model):
        for name, module in layer.named_modules():
            if not name.endswith("_proj"):
                continue
            assert isinstance(module, CodebookLinear) == name.endswith(tuple(targets))
            if isinstance(module, CodebookLinear):
                per_codebook = module.dequantize_weight().reshape(module.codebook.shape[0], -1)
                assert all(group.unique().numel() <= 2 ** options["bits"] for group in per_codebook)
    after = _logits(tiny_model, windows)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    note = next(n for n in context.notes if n.startswith("share: k-means"))
    assert f"{options['bits']}-bit" in note and "Stored as float16 codebooks + bit-packed" in note
    assert ("activation-weighted" in note) == options.get("weighted", False)


def test_rows_per_codebook_must_divide_the_rows(tiny_model):
    with pytest.raises(SlimlmError, match=r"rows_per_codebook: 48 does not divide .* model\.layers\.0\.") as err:
        _share(tiny_model, granularity="row_group", rows_per_codebook=48)
    assert "\n" not in str(err.value)


def test_non_finite_weights_name_their_module(tiny_model):
    decoder_layers(tiny_model)[1].mlp.gate_proj.weight.data[3, 5] = float("inf")
    with pytest.raises(SlimlmError, match=r"share \(kmeans\): model\.layers\.1\.mlp\.gate_proj has non-finite"):
        _share(tiny_model, bits=4)


def test_tie_layers_stage_ties_the_closest_pairs_and_lists_them():
    model = build_tiny_llama(300, layers=3)
    layers = decoder_layers(model)
    layers[2].self_attn.v_proj.weight.data = layers[1].self_attn.v_proj.weight.detach() * 1.01
    windows = random_windows(model)
    context = _share(model, windows, method="tie_layers", count=2, merge="mean")
    assert layers[2].self_attn.v_proj.weight is layers[1].self_attn.v_proj.weight
    tied = getattr(model.config, TIED_PARAMETERS_KEY)
    assert len(tied) == 2 and tied["model.layers.2.self_attn.v_proj.weight"] == "model.layers.1.self_attn.v_proj.weight"
    note = next(n for n in context.notes if n.startswith("share: cross-layer tying"))
    assert "self_attn.v_proj 1↔2: distance 0.010" in note and "2 of 14 pairs" in note
    assert torch.isfinite(_logits(model, windows)).all()


def test_tie_layers_with_a_threshold_nothing_passes():
    model = build_tiny_llama(300, layers=2)
    context = _share(model, method="tie_layers", threshold=0.5)  # random layers are about √2 apart
    assert not getattr(model.config, TIED_PARAMETERS_KEY, None)
    assert "no pair qualified" in context.notes[-1]


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"method": "huffman"}, "stages[0].share.method: unknown method 'huffman'; known: kmeans, tie_layers"),
        ({"targets": ["w_proj"]}, "stages[0].share.targets[0]: Input should be 'q_proj'"),
        ({"method": "tie_layers", "count": 1, "bits": 4}, "stages[0].share.bits: unknown option"),
        ({"threshold": 0.2}, "stages[0].share.threshold: unknown option"),
        ({"bits": 1}, "stages[0].share.bits: Input should be greater than or equal to 2"),
        ({"granularity": "column"}, "stages[0].share.granularity: Input should be 'tensor' or 'row_group'"),
        ({"method": "tie_layers"}, "stages[0].share.count: tie_layers needs exactly one of threshold"),
        ({"method": "tie_layers", "count": 1, "threshold": 0.2}, "stages[0].share.count: tie_layers needs exactly one"),
        (
            {"method": "tie_layers", "count": 1, "merge": "max"},
            "stages[0].share.merge: Input should be 'first' or 'mean'",
        ),
        ({"merge": "mean"}, "stages[0].share.merge: unknown option"),
        ({"rows_per_codebook": 0}, "stages[0].share.rows_per_codebook:"),
    ],
)
def test_validation_errors_are_one_line(options, expected):
    with pytest.raises(SlimlmError) as err:
        parse_recipe({"model": "m", "stages": [{"share": options}]})
    assert expected in str(err.value) and "\n" not in str(err.value)
