"""GPTQ, AWQ, SmoothQuant and EoRA on layer-streamed models: the checkpoint `finish` writes reloads with slimlm's
load_model and computes exactly what the same stage computes on the model loaded whole."""

import pytest
import torch

from conftest import random_windows, run_stage
from slimlm.errors import SlimlmError
from slimlm.models import load_model
from slimlm.quantize.packed import QuantizedLinear, quantized_linears
from slimlm.quantize.w8a8 import W8A8Linear
from slimlm.storage import stored_modules
from slimlm.streaming import layer_stream, load_streamed, streamed_reference
from test_streaming import write_bf16_checkpoint

GPTQ = {"method": "gptq", "group_size": 32, "attention_weighted_v": True}
AWQ = {"method": "awq", "group_size": 32, "bits": 4, "sym": False}
SMOOTHQUANT = {"method": "smoothquant"}


@pytest.fixture()
def bf16_checkpoint(tmp_path, tiny_tokenizer):
    return write_bf16_checkpoint(tmp_path, tiny_tokenizer)


def _whole(folder):
    from transformers import AutoModelForCausalLM

    # from_pretrained keeps the rotary tables in float32, as streaming does
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)


@torch.no_grad()
def _logits(model, windows):
    return model(windows).logits


def _streamed_stage(stage, source, out, windows, tokenizer, original=None, **options):
    """One stage on a model streamed from `source`; the reloaded output and the stage's notes."""
    streamed = load_streamed(source, out)
    context = run_stage(streamed, stage, windows, original=original, **options)
    assert all(t.device.type == "meta" for t in streamed.model.layers.state_dict().values())  # all released
    assert not any(m._kernel_tensors for _, m in quantized_linears(streamed))  # and no kernel layout kept
    assert sorted(layer_stream(streamed).layer_seconds) == list(range(len(streamed.model.layers)))
    layer_stream(streamed).finish(tokenizer)
    return load_model(str(out), "bfloat16").model, context.notes


def _assert_on_grid(model, bits: int) -> None:
    """Every decoder projection is a stored low-bit module whose integers lie on its grid."""
    modules = dict(stored_modules(model))
    assert len(modules) == 7 * len(model.model.layers)
    for name, module in modules.items():
        if isinstance(module, W8A8Linear):
            assert module.weight_int8.abs().max() <= 127, name
            continue
        assert isinstance(module, QuantizedLinear) and module.grid.bits == bits, name
        quantized = module.quantized_weight()
        assert int(quantized.codes.max()) < 2**bits and torch.isfinite(quantized.scale.float()).all(), name


@pytest.mark.parametrize("options", [GPTQ, AWQ, SMOOTHQUANT], ids=lambda o: o["method"])
def test_streamed_quantization_equals_quantizing_the_loaded_model(bf16_checkpoint, tmp_path, tiny_tokenizer, options):
    dense, folder = bf16_checkpoint
    windows = random_windows(dense, samples=3, seq_len=16)
    whole = _whole(folder)
    whole_notes = run_stage(whole, "quantize", windows, **options).notes

    reloaded, notes = _streamed_stage("quantize", folder, tmp_path / "out", windows, tiny_tokenizer, **options)

    bits = options.get("bits", 4 if options["method"] != "smoothquant" else 8)
    _assert_on_grid(reloaded, bits)
    for (name, want), got in zip(whole.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(want, got), name
    # the same modules, so the same kernels on the same inputs: bit-identical logits
    assert torch.equal(_logits(reloaded, windows), _logits(whole, windows))
    assert notes == whole_notes  # packing, kernels and rounding counted layer by layer say the same


def test_streamed_gptq_then_eora_equals_the_chain_on_the_loaded_model(bf16_checkpoint, tmp_path, tiny_tokenizer):
    dense, folder = bf16_checkpoint
    windows = random_windows(dense, samples=3, seq_len=16)
    eora = {"method": "eora", "rank": 4}
    whole, original = _whole(folder), _whole(folder)
    run_stage(whole, "quantize", windows, **GPTQ)
    run_stage(whole, "lowrank", windows, original=original, **eora)

    _streamed_stage("quantize", folder, tmp_path / "gptq", windows, tiny_tokenizer, **GPTQ)
    # the second stage streams the first one's packed output; the original is read a layer at a time
    reference = streamed_reference(folder)
    reloaded, notes = _streamed_stage(
        "lowrank", tmp_path / "gptq", tmp_path / "eora", windows, tiny_tokenizer, reference, **eora
    )

    kinds = [module.kind for _, module in stored_modules(reloaded)]
    assert kinds.count("eora") == kinds.count("packed") == 7 * 3
    for (name, want), got in zip(whole.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(want, got), name
    assert torch.equal(_logits(reloaded, windows), _logits(whole, windows))
    assert any("EoRA" in note for note in notes)
    assert all(p.device.type == "meta" for p in reference.parameters())  # only read from, never loaded


def test_methods_without_a_walk_refuse_a_streamed_model(bf16_checkpoint, tmp_path):
    _, folder = bf16_checkpoint
    streamed = load_streamed(folder, tmp_path / "out")
    windows = random_windows(streamed, samples=2, seq_len=8)
    with pytest.raises(SlimlmError, match=r"quantize \(rtn\) needs the whole model"):
        run_stage(streamed, "quantize", windows, method="rtn")
    with pytest.raises(SlimlmError, match=r"quantize\.pack: false"):
        run_stage(streamed, "quantize", windows, method="gptq", pack=False)
    with pytest.raises(SlimlmError, match="read-only"):
        layer_stream(streamed_reference(folder)).release(0)
