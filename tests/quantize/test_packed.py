"""Packed quantized Linears: bit packing, the module, the quantize stage's packing, saving and reloading."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_quantize_stage import run_quantize_stage
from torch import nn
from torch.nn import functional as F

from conftest import random_windows
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import footprint_records, parameter_counts
from slimlm.evaluate.speed import measure_speed
from slimlm.models import load_model, save_model
from slimlm.modules import named_decoder_linears
from slimlm.quantize.grid import QUANTIZED_ATTRIBUTE, QuantGrid, quantize_codes
from slimlm.quantize.packed import (
    QuantizedLinear,
    pack_codes,
    packed_columns,
    quantized_linears,
    unpack_codes,
    unpack_model,
)
from slimlm.storage import SECTION
from slimlm.storage import kernel_summary as kernel_label


def _logits(model, windows):
    with torch.no_grad():
        return model(windows, use_cache=False).logits


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("columns", [64, 37])
def test_codes_round_trip_through_the_packed_bytes(bits, columns):
    codes = torch.randint(0, 2**bits, (5, columns), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_columns(columns, bits))
    assert torch.equal(unpack_codes(packed, bits, columns), codes)
    if columns == 64:
        assert packed_columns(64, bits) == 64 * bits // 8  # b bits per code, nothing more


def test_the_bit_stream_is_little_endian_along_the_row():
    assert pack_codes(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x0F]]
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)  # 3-bit: 8 codes in 3 bytes
    value = sum(code << (3 * index) for index, code in enumerate(codes[0].tolist()))
    assert pack_codes(codes, 3).tolist() == [[value & 0xFF, (value >> 8) & 0xFF, value >> 16]]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize(("sym", "group_size"), [(True, 16), (False, 32), (True, None), (False, None)])
def test_the_dequantized_path_equals_the_fake_quantized_linear(bits, sym, group_size):
    linear = nn.Linear(64, 48, bias=True)
    quantized = quantize_codes(linear.weight, QuantGrid(bits, sym, group_size))
    linear.weight.data.copy_(quantized.dequantize())
    module = QuantizedLinear.from_linear(linear, quantized, kernel="dequantized")
    assert (module.zeros is None) == sym and module.scales.dtype == torch.float16
    assert torch.equal(module.quantized_weight().codes, quantized.codes)
    assert torch.equal(module.dequantize_weight(), quantized.dequantize())
    x = torch.randn(3, 7, 64)
    assert torch.equal(module(x), linear(x))


def test_a_dtype_cast_keeps_the_float16_scales():
    linear = nn.Linear(64, 32, bias=True)
    module = QuantizedLinear.from_linear(linear, quantize_codes(linear.weight, QuantGrid(4, True, 32)))
    scales = module.scales.clone()
    module.to(torch.bfloat16)
    assert torch.equal(module.scales, scales) and module.bias.dtype == torch.bfloat16
    assert module(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kernel", ["auto", "dequantized"])
def test_the_stage_packs_and_the_model_computes_what_it_did(tiny_model, kernel, monkeypatch):
    windows = random_windows(tiny_model)
    before = parameter_counts(tiny_model)
    run_quantize_stage(tiny_model, windows, method="rtn", bits=4, group_size=32, pack=False)
    fake = _logits(tiny_model, windows)
    count = len(named_decoder_linears(tiny_model))
    from slimlm.quantize.packed import pack_model

    assert pack_model(tiny_model, kernel=kernel) == count == 14
    assert len(quantized_linears(tiny_model)) == 14 and named_decoder_linears(tiny_model) == []
    packed = _logits(tiny_model, windows)
    if kernel == "dequantized":
        assert torch.equal(packed, fake)
        assert kernel_label(tiny_model) == "dequantized ×14"
    else:
        assert (packed - fake).abs().max() < 0.05 * fake.abs().max()  # bfloat16 inside the kernel
        assert kernel_label(tiny_model) == "int4pack (torch._weight_int4pack_mm_for_cpu) ×14"
    assert parameter_counts(tiny_model)["total"] == before["total"]
    assert parameter_counts(tiny_model)["linear_total"] == before["linear_total"]
    assert unpack_model(tiny_model) == 14 and torch.equal(_logits(tiny_model, windows), fake)
    assert all(hasattr(linear, QUANTIZED_ATTRIBUTE) for _, linear in named_decoder_linears(tiny_model))


def test_the_stage_note_says_what_is_stored_and_what_runs(tiny_model):
    context = run_quantize_stage(tiny_model, random_windows(tiny_model), method="rtn", bits=3, group_size=32)
    note = next(note for note in context.notes if "packed 14 Linears" in note)
    assert "size on disk is the packed size" in note and "dequantized" in note and "no low-bit speedup" in note
    unpacked = run_quantize_stage(tiny_model.__class__(tiny_model.config), random_windows(tiny_model), pack=False)
    assert any("not packed (pack: false)" in note for note in unpacked.notes)


def _linear_bytes(model, bits: int, group_size: int | None, sym: bool) -> int:
    """What the packed decoder Linears must take: codes at b bits, float16 scales, uint8 zero points."""
    total = 0
    for _, linear in named_decoder_linears(model):
        groups = linear.in_features // (group_size or linear.in_features)
        total += linear.out_features * (packed_columns(linear.in_features, bits) + groups * (2 + (not sym)))
    return total


@pytest.mark.parametrize(
    "options",
    [
        {"method": "rtn", "bits": 4, "group_size": 32},
        {"method": "rtn", "bits": 8, "group_size": None},
        {"method": "rtn", "bits": 3, "group_size": 16, "sym": False},
    ],
)
def test_save_and_reload_give_the_same_logits_from_a_packed_folder(tiny_model, tiny_tokenizer, tmp_path, options):
    windows = random_windows(tiny_model)
    original = parameter_counts(tiny_model)
    expected_linear_bytes = _linear_bytes(tiny_model, options["bits"], options["group_size"], options.get("sym", True))
    linear_fp32_bytes = 4 * original["linear_total"]
    other_bytes = 4 * (original["total"] - original["linear_total"])
    run_quantize_stage(tiny_model, windows, **options)
    folder = save_model(tiny_model, tiny_tokenizer, tmp_path / "packed")

    reloaded = load_model(str(folder)).model
    assert torch.equal(_logits(reloaded, windows), _logits(tiny_model, windows))
    assert [name for name, _ in quantized_linears(reloaded)] == [name for name, _ in quantized_linears(tiny_model)]
    assert kernel_label(reloaded) == kernel_label(tiny_model)

    section = json.loads((folder / "config.json").read_text())[SECTION]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    entry = next(e for e in section["modules"] if e["name"] == "model.layers.1.mlp.down_proj")
    assert entry["kind"] == "packed"
    assert entry["bits"] == options["bits"] and entry["group_size"] == options["group_size"]
    tensors = load_file(folder / "model.safetensors")
    assert tensors["model.layers.1.mlp.down_proj.qweight"].dtype == torch.uint8
    assert tensors["model.layers.1.mlp.down_proj.scales"].dtype == torch.float16

    records = {r.metric: r.value for r in footprint_records(reloaded, folder)}
    disk = records["size_on_disk"]
    assert 0 < disk - (expected_linear_bytes + other_bytes) < 16_384  # the rest is the safetensors header
    # b bits per weight plus 16 (scale) and 8 (zero point) per group: 4.5, 8.25 and 4.5 bits of 32
    group = options["group_size"] or 64
    bits_per_weight = options["bits"] + (16 + 8 * (not options.get("sym", True))) / group
    assert expected_linear_bytes <= linear_fp32_bytes * bits_per_weight / 32 < expected_linear_bytes * 1.05
    assert records["params_total"] == original["total"]
    assert records["bits_per_weight"] == pytest.approx(8 * disk / original["total"])


def test_a_model_without_packed_modules_loses_a_stale_section(tiny_model, tiny_tokenizer, tmp_path):
    run_quantize_stage(tiny_model, random_windows(tiny_model), method="rtn", bits=4, group_size=32)
    folder = save_model(tiny_model, tiny_tokenizer, tmp_path / "packed")
    reloaded = load_model(str(folder)).model
    assert not hasattr(reloaded.config, SECTION)
    unpack_model(reloaded)
    save_model(reloaded, tiny_tokenizer, folder)
    assert SECTION not in json.loads((folder / "config.json").read_text())
    assert not quantized_linears(load_model(str(folder)).model)


@pytest.fixture()
def packed_folder(tiny_model, tiny_tokenizer, tmp_path):
    run_quantize_stage(tiny_model, random_windows(tiny_model), method="rtn", bits=4, group_size=32)
    return save_model(tiny_model, tiny_tokenizer, tmp_path / "packed")


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop("model.layers.0.self_attn.q_proj.qweight"),
            r"1 missing, 0 unexpected, e\.g\. model\.layers\.0\.self_attn\.q_proj\.qweight",
        ),
        (
            lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64)}),
            r"0 missing, 1 unexpected, e\.g\. model\.layers\.0\.mlp\.up_proj\.weight",
        ),
        (
            lambda t: t.update({"model.layers.0.mlp.up_proj.scales": torch.zeros(128, 4, dtype=torch.float16)}),
            r"wrong shape",
        ),
    ],
)
def test_a_malformed_folder_is_a_clear_error(packed_folder, edit, message):
    _edit_tensors(packed_folder, edit)
    with pytest.raises(SlimlmError, match=message) as error:
        load_model(str(packed_folder))
    assert "\n" not in str(error.value) and str(packed_folder) in str(error.value)


def test_speed_records_name_the_kernel(tiny_model):
    run_quantize_stage(tiny_model, random_windows(tiny_model), method="rtn", bits=4, group_size=32)
    records = measure_speed(
        tiny_model, None, prompt_tokens=4, new_tokens=2, runs=1, warmup=0, kernel=kernel_label(tiny_model)
    )
    assert all(record.protocol["kernel"] == kernel_label(tiny_model) for record in records)


def test_a_dequantized_forward_is_f_linear_in_the_activation_dtype():
    linear = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    quantized = quantize_codes(linear.weight, QuantGrid(5, True, 32))
    module = QuantizedLinear.from_linear(linear, quantized)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert module.kernel == "dequantized"
    assert torch.equal(module(x), F.linear(x, quantized.dequantize().to(torch.bfloat16)))


def test_the_stage_packs_only_its_targets(tiny_model):
    run_quantize_stage(tiny_model, random_windows(tiny_model), method="rtn", targets=["v_proj", "down_proj"])
    names = [name for name, _ in quantized_linears(tiny_model)]
    assert len(names) == 4 and all(name.endswith(("v_proj", "down_proj")) for name in names)
    assert len(named_decoder_linears(tiny_model)) == 10


def test_eora_around_packed_linears_saves_and_reloads(tiny_model, tiny_tokenizer, tmp_path):
    """A low-rank compensation wraps the packed module (``<name>.base``); load_model restores both."""
    import copy

    from slimlm.calibration import Calibration
    from slimlm.lowrank.layers import CompensatedLinear
    from slimlm.recipe import parse_recipe
    from slimlm.registry import StageContext, get_stage

    original, windows = copy.deepcopy(tiny_model), random_windows(tiny_model)
    run_quantize_stage(tiny_model, windows, method="rtn", bits=4, group_size=32, targets=["q_proj", "up_proj"])
    recipe = parse_recipe({"model": "m", "stages": [{"lowrank": {"method": "eora", "rank": 4}}]})
    context = StageContext(None, Calibration(None, windows=windows), None, load_original=lambda: original)
    get_stage("lowrank").apply(tiny_model, recipe.stages[0].options, context)
    assert isinstance(tiny_model.model.layers[0].self_attn.q_proj.base, QuantizedLinear)
    folder = save_model(
        tiny_model,
        tiny_tokenizer,
        tmp_path / "eora",
    )
    reloaded = load_model(str(folder)).model
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, CompensatedLinear)
    assert torch.equal(_logits(reloaded, windows), _logits(tiny_model, windows))
    assert parameter_counts(reloaded)["total"] > parameter_counts(original)["total"]  # the factors come on top


def test_the_pipeline_reports_the_packed_size_and_the_kernel(tiny_model_dir, tmp_path, monkeypatch):
    from slimlm import report_plots
    from slimlm.evaluate.footprint import size_on_disk
    from slimlm.pipeline import run_recipe
    from slimlm.recipe import parse_recipe

    monkeypatch.setattr(report_plots, "render_plots", lambda summary: {})  # plots take longer than the rest
    text = tmp_path / "text.txt"  # a few lines, not the whole of WikiText-2 to tokenize
    text.write_text("Quantization stores weights with fewer bits. The quick brown fox jumps over the lazy dog.\n" * 8)
    recipe = parse_recipe(
        {
            "model": str(tiny_model_dir),
            "output": str(tmp_path / "run"),
            "evaluate": {"tasks": [str(text)], "seq_len": 32, "limit": 1, "prompt_tokens": 4, "new_tokens": 2},
            "stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}],
        }
    )
    summary = run_recipe(recipe)
    records = {r["metric"]: r for r in summary["stages"][0]["records"]}
    original = {r["metric"]: r for r in summary["original"]["records"]}
    folder = tmp_path / "run" / "stages" / "01-quantize"
    assert records["size_on_disk"]["value"] == size_on_disk(folder) < 0.5 * original["size_on_disk"]["value"]
    assert records["params_total"]["value"] == original["params_total"]["value"]
    assert records["decode_tokens_per_s"]["protocol"]["kernel"] == "int4pack (torch._weight_int4pack_mm_for_cpu) ×14"
    assert original["decode_tokens_per_s"]["protocol"]["kernel"] == "dense"
    assert quantized_linears(load_model(str(tmp_path / "run" / "model")).model)
