"""Plain Hugging Face export: every folder is reloaded with transformers alone and compared with slimlm's model,
weight for weight and logit for logit, in the dtype written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_tiny_llama, build_tokenizer, random_windows, run_stage
from slimlm.errors import SlimlmError
from slimlm.export.ggml_blocks import module_bias
from slimlm.export.hf import export_hf
from slimlm.quantize.packed import use_kernel
from slimlm.storage import TIED_KEY, stored_modules

G32 = {"method": "rtn", "group_size": 32}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer, **options):
    return build_tiny_llama(len(tokenizer), **options)


def _logits(model, windows):
    with torch.no_grad():
        return model(windows, use_cache=False).logits


def _outer_modules(model) -> dict:
    """The StoredModules an export replaces: outer wrappers, not the modules inside them."""
    outer = {}
    for name, module in stored_modules(model):
        if not name.startswith(tuple(f"{wrapper}." for wrapper in outer)):
            outer[name] = module
    return outer


def _assert_dense_weights(model, loaded, dtype=torch.float32):
    """Every replaced module's weight and bias in the reloaded model are slimlm's, cast to `dtype`, exactly."""
    for name, module in _outer_modules(model).items():
        linear = loaded.get_submodule(name)
        assert type(linear) is torch.nn.Linear and linear.weight.dtype == dtype, name
        assert torch.equal(linear.weight, module.dequantize_weight().to(dtype)), name
        bias = module_bias(module)
        assert (linear.bias is None) == (bias is None), name
        if bias is not None:
            assert torch.equal(linear.bias, bias.to(dtype)), name


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(
    ("options", "kernel"),
    [
        ({"bits": 4, **G32}, "int4pack"),
        ({"method": "rtn", "bits": 8, "group_size": None}, "int8pack"),
        ({"bits": 3, **G32}, "dequantized"),
    ],
)
def test_packed_model_reloads_with_plain_transformers_and_computes_the_dequantized_path(
    tokenizer, tmp_path, options, kernel
):
    model = _model(tokenizer)
    run_stage(model, "quantize", **options)
    assert {module.kernel for module in _outer_modules(model).values()} == {kernel}
    summary = export_hf(model, tokenizer, tmp_path / "hf")

    config = _config(tmp_path / "hf")
    assert config["model_type"] == "llama" and not [key for key in config if key.startswith("slimlm")]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    _assert_dense_weights(model, loaded)
    assert summary.dequantized == dict.fromkeys(_outer_modules(model), "packed") and len(summary.dequantized) == 14
    assert summary.dtype == "float32" and summary.bytes > 0 and summary.untied == []
    # the caller's model is untouched; its int4pack/int8pack kernels compute in bfloat16, so the exact comparison
    # is with its dequantized path, which is F.linear on the same float32 weight
    assert {module.kernel for module in _outer_modules(model).values()} == {kernel}
    windows = random_windows(model, 2, 16)
    use_kernel(model, "dequantized")
    assert torch.equal(_logits(loaded, windows), _logits(model, windows))


@pytest.mark.parametrize(
    ("stage", "options", "kind", "exact_logits"),
    [
        ("share", {"method": "kmeans", "bits": 3}, "codebook", True),  # F.linear on the looked-up weight
        ("lowrank", {"method": "svd", "rank": 8}, "lowrank", False),  # B(Ax): another order of the same sums
        ("quantize", {"method": "smoothquant", "bits": 8, "group_size": None}, "w8a8", None),  # int8 activations
    ],
)
def test_every_storage_kind_becomes_a_linear_of_the_weight_it_applies(
    tokenizer, tmp_path, stage, options, kind, exact_logits
):
    model = _model(tokenizer)
    run_stage(model, stage, **options)
    summary = export_hf(model, tokenizer, tmp_path / "hf")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    _assert_dense_weights(model, loaded)
    assert set(summary.dequantized.values()) == {kind}
    windows = random_windows(model, 2, 16)
    if exact_logits:
        assert torch.equal(_logits(loaded, windows), _logits(model, windows))
    elif exact_logits is False:
        torch.testing.assert_close(_logits(loaded, windows), _logits(model, windows), rtol=0, atol=1e-5)


def test_eora_wrapper_is_written_as_its_base_plus_correction(tokenizer, tmp_path):
    model = _model(tokenizer)
    run_stage(model, "quantize", bits=4, **G32)
    run_stage(model, "lowrank", method="eora", rank=4, original=_model(tokenizer))
    summary = export_hf(model, tokenizer, tmp_path / "hf")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    _assert_dense_weights(model, loaded)  # the wrapper's dequantize_weight: base codes + B·A
    assert summary.dequantized["model.layers.0.self_attn.q_proj"] == "eora" and len(summary.dequantized) == 14
    use_kernel(model, "dequantized")
    windows = random_windows(model, 2, 16)
    torch.testing.assert_close(_logits(loaded, windows), _logits(model, windows), rtol=0, atol=1e-5)


def test_bfloat16_export_computes_what_slimlm_computes_in_bfloat16(tokenizer, tmp_path):
    model = _model(tokenizer)
    run_stage(model, "quantize", bits=4, **G32)
    summary = export_hf(model, tokenizer, tmp_path / "hf", dtype="bfloat16")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.dtype == torch.bfloat16 and summary.dtype == "bfloat16"
    _assert_dense_weights(model, loaded, torch.bfloat16)
    # slimlm's own bfloat16 model on the dequantized path multiplies by the same rounded weights; transformers loads
    # the rotary frequencies in float32 whatever the dtype, where a model-wide cast rounds them
    reference = copy.deepcopy(model).to(torch.bfloat16)
    reference.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq
    use_kernel(reference, "dequantized")
    windows = random_windows(model, 2, 16)
    torch.testing.assert_close(_logits(loaded, windows), _logits(reference, windows), rtol=0, atol=0)


def test_cross_layer_ties_are_written_as_separate_copies(tokenizer, tmp_path):
    model = _model(tokenizer, layers=3)
    run_stage(model, "share", method="tie_layers", count=1)
    run_stage(model, "quantize", bits=4, **G32)
    ((target, source),) = getattr(model.config, TIED_KEY).items()
    summary = export_hf(model, tokenizer, tmp_path / "hf")

    assert summary.untied == [target] and target in summary.dequantized
    assert TIED_KEY not in _config(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    copied, shared = loaded.get_submodule(target).weight, loaded.get_submodule(source).weight
    assert torch.equal(copied, shared) and copied.data_ptr() != shared.data_ptr()
    assert model.get_submodule(target) is model.get_submodule(source)  # the caller's tie stays
    use_kernel(model, "dequantized")
    windows = random_windows(model, 2, 16)
    assert torch.equal(_logits(loaded, windows), _logits(model, windows))


def test_dense_ties_and_kept_layers_leave_no_slimlm_attribute(tokenizer, tmp_path):
    model = _model(tokenizer, layers=3)
    run_stage(model, "prune_depth", remove=1)
    run_stage(model, "share", method="tie_layers", count=1)
    assert model.config.slimlm_kept_layers and getattr(model.config, TIED_KEY)
    summary = export_hf(model, tokenizer, tmp_path / "hf")

    assert not [key for key in _config(tmp_path / "hf") if key.startswith("slimlm")]
    assert summary.dequantized == {} and len(summary.untied) == 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    windows = random_windows(model, 2, 16)
    assert torch.equal(_logits(loaded, windows), _logits(model, windows))
    assert model.config.slimlm_kept_layers  # the caller's config keeps them


def test_a_failed_write_leaves_the_previous_folder_and_no_temporary(tokenizer, tmp_path, monkeypatch):
    model = _model(tokenizer)
    run_stage(model, "quantize", bits=4, **G32)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "previous").write_text("kept")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tokenizer, tmp_path / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and (tmp_path / "hf" / "previous").read_text() == "kept"


def test_overflow_and_unknown_dtypes_are_refused_before_writing(tokenizer, tmp_path):
    model = _model(tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(SlimlmError, match=r"^model\.layers\.0\.mlp\.up_proj\.weight: values overflow float16"):
        export_hf(model, tokenizer, tmp_path / "hf", dtype="float16")
    with pytest.raises(SlimlmError, match="dtype 'int8' is not one of auto, float32, bfloat16, float16"):
        export_hf(model, tokenizer, tmp_path / "hf", dtype="int8")
    assert list(tmp_path.iterdir()) == []
