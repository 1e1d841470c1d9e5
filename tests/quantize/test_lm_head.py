import json

import pytest
import torch
from torch import nn

from conftest import random_windows, run_stage
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import parameter_counts
from slimlm.models import load_model, save_model
from slimlm.quantize.grid import QUANTIZED_ATTRIBUTE, QuantGrid, quantize_codes
from slimlm.quantize.packed import QuantizedLinear, quantized_linears
from slimlm.storage import SECTION, kernel_summary


def _logits(model, windows):
    with torch.no_grad():
        return model(windows, use_cache=False).logits


def test_without_lm_head_the_head_stays_tied_and_dense(tiny_model):
    embedding = tiny_model.get_input_embeddings().weight
    context = run_stage(tiny_model, "quantize", method="rtn", bits=4, group_size=32)
    assert tiny_model.get_output_embeddings().weight is embedding and tiny_model.config.tie_word_embeddings
    assert not any("LM head" in note and "rounded" in note for note in context.notes)


def test_a_tied_head_is_untied_and_packed_while_the_embedding_keeps_its_weights(tiny_model):
    embedding = tiny_model.get_input_embeddings().weight.detach().clone()
    windows = random_windows(tiny_model)
    context = run_stage(tiny_model, "quantize", method="rtn", bits=4, group_size=32, lm_head={"bits": 8})
    head = tiny_model.get_output_embeddings()
    assert isinstance(head, QuantizedLinear) and head.kernel == "int8pack" and head.grid == QuantGrid(8, True, None)
    # the head's codes are round-to-nearest of the embedding it was tied to; the embedding is untouched
    expected = quantize_codes(embedding, QuantGrid(8, True, None))
    assert torch.equal(head.quantized_weight().codes, expected.codes)
    assert torch.equal(head.scales, expected.scale)
    assert torch.equal(tiny_model.get_input_embeddings().weight, embedding)
    assert tiny_model.config.tie_word_embeddings is False
    assert "int8pack" in kernel_summary(tiny_model)
    note = next(n for n in context.notes if "LM head" in n and "rounded" in n)
    assert "8-bit symmetric per output channel" in note and "untied" in note
    assert torch.isfinite(_logits(tiny_model, windows)).all()


def test_pack_false_leaves_a_fake_quantized_head(tiny_model):
    run_stage(tiny_model, "quantize", method="rtn", bits=4, group_size=32, pack=False, lm_head={"bits": 4})
    head = tiny_model.get_output_embeddings()
    assert type(head) is nn.Linear and head.weight is not tiny_model.get_input_embeddings().weight
    assert torch.equal(head.weight, getattr(head, QUANTIZED_ATTRIBUTE).dequantize())


def test_a_quantized_head_saves_reloads_and_is_counted(tiny_model, tiny_tokenizer, tmp_path):
    windows = random_windows(tiny_model)
    before = parameter_counts(tiny_model)
    run_stage(tiny_model, "quantize", method="gptq", bits=4, group_size=32, lm_head={"bits": 8})
    folder = save_model(tiny_model, tiny_tokenizer, tmp_path / "packed")
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "lm_head" in [m["name"] for m in config[SECTION]["modules"]]

    reloaded = load_model(str(folder)).model
    assert isinstance(reloaded.get_output_embeddings(), QuantizedLinear)
    assert [name for name, _ in quantized_linears(reloaded)] == [name for name, _ in quantized_linears(tiny_model)]
    assert torch.equal(_logits(reloaded, windows), _logits(tiny_model, windows))
    # untied, the head is stored beside the embedding: the total grows by the head, the decoder Linears do not
    after = parameter_counts(reloaded)
    head = tiny_model.get_output_embeddings()
    assert after["total"] == before["total"] + head.in_features * head.out_features
    assert after["linear_total"] == before["linear_total"]


@pytest.mark.parametrize(
    ("lm_head", "message"),
    [({"bits": 8, "group_size": 48}, "lm_head.group_size: 48"), ({"bits": 8, "colour": 1}, "colour")],
)
def test_bad_head_options_are_refused(tiny_model, lm_head, message):
    with pytest.raises((SlimlmError, ValueError), match=message):
        run_stage(tiny_model, "quantize", method="rtn", bits=4, group_size=32, lm_head=lm_head)


def test_an_already_quantized_head_is_refused(tiny_model):
    run_stage(tiny_model, "quantize", method="rtn", bits=4, group_size=32, lm_head={"bits": 8})
    with pytest.raises(SlimlmError, match="not a dense Linear"):
        run_stage(tiny_model, "quantize", method="rtn", bits=8, group_size=None, lm_head={"bits": 8})
