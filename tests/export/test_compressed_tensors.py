"""compressed-tensors export: every folder is loaded with plain `AutoModelForCausalLM.from_pretrained` (the
library installed) and compared with slimlm's dequantized weights and logits: exactly for a float32 export, within
bfloat16 rounding for the default bfloat16 one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import build_tiny_llama, build_tokenizer, random_windows, run_stage
from slimlm.errors import SlimlmError
from slimlm.export.compressed_tensors import ASYMMETRIC, export_compressed_tensors
from slimlm.quantize.packed import use_kernel
from slimlm.storage import TIED_KEY, stored_modules

HINT = ", or pass dequantize=True to write it dense"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
BF16_ROUNDING = 2**-7  # two bfloat16 roundings (the scale, then k·Δ) of 2^-8 each


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _quantized(tokenizer, bits=4, group_size=32, layers=2, **options):
    model = build_tiny_llama(len(tokenizer), layers=layers)
    run_stage(model, "quantize", method="rtn", bits=bits, group_size=group_size, **options)
    return model


def _logits(model, windows):
    with torch.no_grad():  # a loaded compressed model decompresses its weights on its first forward
        return model(windows, use_cache=False).logits


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def _load_and_compare(model, folder, windows, exact: bool):
    """Load `folder` with plain transformers; its logits and decompressed weights against slimlm's dequantized path
    (exactly, or within bfloat16 rounding: no further from slimlm's float32 logits than twice slimlm's own
    bfloat16 run is)."""
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    logits = _logits(loaded, windows)
    reference = copy.deepcopy(model).to(torch.bfloat16)
    reference.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq  # transformers loads it in float32
    use_kernel(reference, "dequantized")
    use_kernel(model, "dequantized")
    expected = _logits(model, windows)
    for name, module in stored_modules(model):
        weight, dequantized = loaded.get_submodule(name).weight, module.dequantize_weight()
        if exact:
            assert weight.dtype == torch.float32 and torch.equal(weight, dequantized), name
        else:
            assert weight.dtype == torch.bfloat16, name
            torch.testing.assert_close(weight.float(), dequantized, rtol=BF16_ROUNDING, atol=0)
    if exact:
        assert torch.equal(logits, expected)
    else:
        bound = 2 * (_logits(reference, windows).float() - expected).abs().max()
        assert (logits.float() - expected).abs().max() <= bound
    return loaded


def _section_group(folder) -> dict:
    section = _config(folder)["quantization_config"]
    assert section["quant_method"] == "compressed-tensors" and section["format"] == "pack-quantized"
    assert section["quantization_status"] == "compressed"
    (group,) = section["config_groups"].values()
    return group


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 64), (4, None), (8, None), (8, 32)])
def test_float32_export_loads_with_plain_transformers_exactly(tokenizer, tmp_path, bits, group_size):
    model = _quantized(tokenizer, bits, group_size)
    summary = export_compressed_tensors(model, tokenizer, tmp_path / "ct", dtype="float32")

    _load_and_compare(model, tmp_path / "ct", random_windows(model, 2, 16), exact=True)
    group = _section_group(tmp_path / "ct")
    strategy = "channel" if group_size is None else "group"
    assert group["targets"] == ["Linear"] and group["weights"] == {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": strategy,
        "group_size": group_size,
        "dynamic": False,
    }
    assert _config(tmp_path / "ct")["quantization_config"]["ignore"] == ["lm_head"]
    grid = f"{bits}-bit {'per channel' if group_size is None else f'group {group_size}'}"
    assert summary.quantized == dict.fromkeys((name for name, _ in stored_modules(model)), grid)
    assert summary.dtype == "float32" and summary.dequantized == {} and summary.format == "compressed-tensors"


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (8, None)])
def test_bfloat16_export_keeps_slimlm_s_codes_and_float16_scales(tokenizer, tmp_path, bits, group_size):
    model = _quantized(tokenizer, bits, group_size)
    summary = export_compressed_tensors(model, tokenizer, tmp_path / "ct")

    config = _config(tmp_path / "ct")
    assert config["model_type"] == "llama" and not [key for key in config if key.startswith("slimlm")]
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32 and f"{name}.weight_zero_point" not in tensors
    assert torch.equal(tensors[f"{name}.weight_scale"].flatten(), model.get_submodule(name).scales.flatten())
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16 and summary.dtype == "bfloat16"
    loaded = _load_and_compare(model, tmp_path / "ct", random_windows(model, 2, 16), exact=False)
    assert loaded.dtype == torch.bfloat16


def test_negative_4_bit_scales_are_kept_and_decode_exactly_with_the_library(tokenizer, tmp_path):
    """ggml's Q4_0 rule gives negative Δ where a group's extreme is positive; the code −8 then holds it."""
    model = _quantized(tokenizer, 4, 32)
    export_compressed_tensors(model, tokenizer, tmp_path / "ct")

    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    scheme = QuantizationScheme.model_validate(_section_group(tmp_path / "ct"))
    for name, module in stored_modules(model):
        stored = {key.removeprefix(f"{name}."): t for key, t in tensors.items() if key.startswith(f"{name}.")}
        assert (stored["weight_scale"] < 0).any() and torch.equal(stored["weight_scale"], module.scales), name
        stored["weight_scale"] = stored["weight_scale"].float()  # k·Δ computed in float32 is exact
        decoded = PackedQuantizationCompressor.decompress(stored, scheme)["weight"]
        assert torch.equal(decoded, module.dequantize_weight()), name


def test_several_grids_get_one_config_group_each_naming_its_modules(tokenizer, tmp_path):
    model = _quantized(tokenizer, 4, 32, targets=ATTENTION)
    run_stage(model, "quantize", method="rtn", bits=8, group_size=None, targets=MLP)
    summary = export_compressed_tensors(model, tokenizer, tmp_path / "ct", dtype="float32")

    _load_and_compare(model, tmp_path / "ct", random_windows(model, 2, 16), exact=True)
    groups = {
        group["weights"]["num_bits"]: group
        for group in _config(tmp_path / "ct")["quantization_config"]["config_groups"].values()
    }
    assert all(target.endswith(tuple(ATTENTION)) for target in groups[4]["targets"]) and len(groups[4]["targets"]) == 8
    assert all(target.endswith(tuple(MLP)) for target in groups[8]["targets"]) and len(groups[8]["targets"]) == 6
    assert set(summary.quantized.values()) == {"4-bit group 32", "8-bit per channel"}


def test_cross_layer_ties_are_written_quantized_under_every_name(tokenizer, tmp_path):
    model = build_tiny_llama(len(tokenizer), layers=3)
    run_stage(model, "share", method="tie_layers", count=1)
    run_stage(model, "quantize", method="rtn", bits=4, group_size=32)
    ((target, source),) = getattr(model.config, TIED_KEY).items()
    summary = export_compressed_tensors(model, tokenizer, tmp_path / "ct", dtype="float32")

    assert summary.untied == [target] and target in summary.quantized and len(summary.quantized) == 3 * 7
    loaded = _load_and_compare(model, tmp_path / "ct", random_windows(model, 2, 16), exact=True)
    assert torch.equal(loaded.get_submodule(target).weight, model.get_submodule(source).dequantize_weight())
    assert model.get_submodule(target) is model.get_submodule(source)  # the caller's tie stays


def test_dequantize_writes_what_has_no_form_dense_and_the_library_ignores_it(tokenizer, tmp_path):
    model = _quantized(tokenizer, 4, 32, targets=ATTENTION)
    run_stage(model, "quantize", method="rtn", bits=3, group_size=32, targets=MLP)
    with pytest.raises(SlimlmError, match=r"^model\.layers\.0\.mlp\.gate_proj: 3-bit group 32 has no servable"):
        export_compressed_tensors(model, tokenizer, tmp_path / "ct")
    summary = export_compressed_tensors(model, tokenizer, tmp_path / "ct", dtype="float32", dequantize=True)

    _load_and_compare(model, tmp_path / "ct", random_windows(model, 2, 16), exact=True)
    mlp = [name for name, _ in stored_modules(model) if name.endswith(tuple(MLP))]
    assert summary.dequantized == dict.fromkeys(mlp, "3-bit group 32") and len(summary.quantized) == 8
    assert sorted(_config(tmp_path / "ct")["quantization_config"]["ignore"]) == sorted([*mlp, "lm_head"])


REFUSALS = [  # stage, options, the refusal line after "model.layers.0.self_attn.q_proj: "
    (
        "quantize",
        {"method": "rtn", "bits": 4, "group_size": 32, "sym": False},
        f"4-bit asymmetric group 32 is not exported: {ASYMMETRIC}; quantize with sym: true",
    ),
    (
        "quantize",
        {"method": "rtn", "bits": 6, "group_size": None},
        "6-bit per channel has no servable pack-quantized form (vLLM's WNA16 takes 4 or 8 bits); quantize with bits: 8",
    ),
    (
        "quantize",
        {"method": "smoothquant", "bits": 8, "group_size": None},
        "W8A8 (int8 weights per channel, int8 activations per token) is not exported (its activation rounding "
        "would be the serving kernel's, not slimlm's); quantize with method: rtn, bits: 8, group_size: null (int8 "
        "weights, exported exactly)",
    ),
    (
        "share",
        {"method": "kmeans", "bits": 3},
        "3-bit k-means codebook has no pack-quantized form (the format holds integer grids); quantize with "
        "method: rtn, bits: 4",
    ),
]


@pytest.mark.parametrize(("stage", "options", "line"), REFUSALS)
def test_what_has_no_exact_form_is_refused_in_one_line_before_writing(tokenizer, tmp_path, stage, options, line):
    model = build_tiny_llama(len(tokenizer))
    run_stage(model, stage, **options)
    with pytest.raises(SlimlmError) as err:
        export_compressed_tensors(model, tokenizer, tmp_path / "ct")
    assert str(err.value) == f"model.layers.0.self_attn.q_proj: {line}{HINT}"
    assert list(tmp_path.iterdir()) == []


def test_factors_are_refused_and_a_model_without_packed_modules_too(tokenizer, tmp_path):
    svd = build_tiny_llama(len(tokenizer))
    run_stage(svd, "lowrank", method="svd", rank=8)
    with pytest.raises(
        SlimlmError, match=r"^model\.layers\.0\.mlp\.gate_proj: low-rank B·A \(rank 8\) has no pack-quan"
    ):
        export_compressed_tensors(svd, tokenizer, tmp_path / "ct")
    model = _quantized(tokenizer, 4, 32)
    run_stage(model, "lowrank", method="eora", rank=4, original=build_tiny_llama(len(tokenizer)))
    with pytest.raises(
        SlimlmError,
        match=r"^model\.layers\.0\.self_attn\.q_proj: EoRA-corrected weight \(rank 4\) "
        r"has no pack-quantized form",
    ):
        export_compressed_tensors(model, tokenizer, tmp_path / "ct")
    with pytest.raises(SlimlmError, match=r"^compressed-tensors export: no packed module on an exportable grid"):
        export_compressed_tensors(model, tokenizer, tmp_path / "ct", dequantize=True)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_behind(tokenizer, tmp_path, monkeypatch):
    model = _quantized(tokenizer, 4, 32)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_compressed_tensors(model, tokenizer, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []
    assert {module.kernel for _, module in stored_modules(model)} == {"int4pack"}  # the caller's model untouched
