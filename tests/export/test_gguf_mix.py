"""A gguf export with tensor_types / prune_layers / base_type: the file is the one llama-quantize makes from slimlm's
f32 export with the same type map (byte for byte), nothing is left behind on failure, and bad values are one line,
refused before any model loads where the recipe alone says so."""

import re

import gguf
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import build_tiny_llama, run_stage
from slimlm.errors import SlimlmError
from slimlm.export import mixed_types as mixed
from slimlm.export.gguf import export_gguf
from slimlm.export.options import GGUFExport, export_model
from slimlm.recipe import parse_recipe

TYPES = {
    "model.embed_tokens": "Q4_0",
    "model.layers.0.self_attn.q_proj": "Q4_K",
    "model.layers.2.mlp.down_proj": "Q2_K",
    "model.layers.2.self_attn.v_proj": "IQ4_NL",
}


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    """Three layers with rows of 256 and 512 weights, so the k-quants apply."""
    config = build_tiny_llama(len(tiny_tokenizer), layers=3).config.to_dict()
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**config, "hidden_size": 256, "intermediate_size": 512})).eval()


def _tensors(path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def _target(**options) -> GGUFExport:
    return GGUFExport(format="gguf", pre="gpt-2", **options)


def test_the_export_is_llama_quantize_of_the_f32_export_byte_for_byte(model, tiny_tokenizer, tmp_path):
    f32 = tmp_path / "direct" / "f32.gguf"
    export_gguf(model, tiny_tokenizer, f32, dtype="f32", pre="gpt-2")
    by_gguf = {mixed.gguf_name(name + ".weight", model.config): t for name, t in TYPES.items()}
    direct = mixed.write_mixed_gguf(f32, tmp_path / "direct" / "mixed.gguf", by_gguf, "Q5_0", frozenset({1}))

    path = tmp_path / "export" / "model.gguf"
    summary = export_model(model, tiny_tokenizer, _target(tensor_types=TYPES, prune_layers=[1], base_type="q5_0"), path)
    assert list(path.parent.iterdir()) == [path]  # the f32 temporary and the type file are gone
    written = _tensors(path)
    assert written == _tensors(direct)
    assert path.read_bytes() == direct.read_bytes()
    # the types landed where asked (layer 2 is block 1 once layer 1 is removed), the rest at the base type
    assert written["blk.1.ffn_down.weight"][0] == "Q2_K" and written["blk.0.attn_q.weight"][0] == "Q4_K"
    assert written["token_embd.weight"][0] == "Q4_0" and written["blk.1.attn_k.weight"][0] == "Q5_0"
    assert not any(name.startswith("blk.2.") for name in written)
    assert summary.bytes == path.stat().st_size and summary.tensor_types["Q2_K"] == 1


def test_base_type_alone_is_a_pure_llama_quantize(model, tiny_tokenizer, tmp_path):
    path = tmp_path / "model.gguf"
    export_model(model, tiny_tokenizer, _target(base_type="Q8_0"), path)
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
    assert types == {"Q8_0"}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"tensor_types": {"model.norm": "Q8_0"}}, "tensor_types: 'model.norm' names no matrix the GGUF holds"),
        ({"tensor_types": {"lm_head": "Q8_0"}}, "the LM head is the token embedding here: set model.embed_tokens"),
        (
            {"tensor_types": {"model.layers.1.mlp.up_proj": "Q4_0"}, "prune_layers": [1]},
            "tensor_types: model.layers.1.mlp.up_proj is in a layer prune_layers removes",
        ),
        ({"prune_layers": [3]}, "prune_layers [3]: the model has 3 decoder layers (0-2) and at least one must stay"),
        ({"prune_layers": [0, 1, 2]}, "prune_layers [0, 1, 2]: the model has 3 decoder layers"),
    ],
)
def test_names_and_layers_the_model_lacks_are_refused_before_writing(
    model, tiny_tokenizer, tmp_path, options, expected
):
    with pytest.raises(SlimlmError, match=re.escape(expected)) as err:
        export_model(model, tiny_tokenizer, _target(**options), tmp_path / "model.gguf")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_type_the_rows_do_not_allow_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(SlimlmError, match=r"q_proj: Q4_K does not fit its rows of 64 weights.*allowed: Q8_0, "):
        export_model(
            tiny_model,
            tiny_tokenizer,
            _target(tensor_types={"model.layers.0.self_attn.q_proj": "Q4_K"}),
            tmp_path / "model.gguf",
        )


def test_packed_modules_are_refused(tiny_model, tiny_tokenizer, tmp_path):
    run_stage(tiny_model, "quantize", method="rtn", bits=4, group_size=32)
    with pytest.raises(SlimlmError, match=r"is a packed slimlm module \(packed\); llama-quantize re-quantizes"):
        export_model(tiny_model, tiny_tokenizer, _target(base_type="Q4_0"), tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_llama_quantize_leaves_nothing(model, tiny_tokenizer, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise SlimlmError("llama.cpp: llama-quantize failed (exit 1)")

    monkeypatch.setattr(mixed, "run_quantize", fail)
    with pytest.raises(SlimlmError, match="llama-quantize failed"):
        export_model(model, tiny_tokenizer, _target(tensor_types=TYPES), tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"tensor_types": {"model.layers.0.mlp.down_proj": "Q9_K"}},
            "export[0].gguf.tensor_types: model.layers.0.mlp.down_proj: 'Q9_K' is not a llama-quantize type; "
            "allowed: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, IQ4_NL, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K",
        ),
        ({"base_type": "f16"}, "export[0].gguf.base_type: 'f16' is not a llama-quantize type; allowed: Q8_0,"),
        ({"prune_layers": [2, 2]}, "export[0].gguf.prune_layers: [2, 2] must be distinct decoder layer indices"),
        ({"prune_layers": [-1]}, "export[0].gguf.prune_layers: [-1] must be distinct decoder layer indices"),
        (
            {"prune_layers": [1], "type": "q4_0"},
            'export[0].gguf: type: "q4_0" contradicts tensor_types/prune_layers/base_type',
        ),
        ({"base_type": "Q4_K", "embeddings": "q8_0"}, 'export[0].gguf: embeddings: "q8_0" contradicts'),
        ({"base_type": "Q4_K", "dtype": "f16"}, 'export[0].gguf: dtype: "f16" contradicts'),
        ({"base_type": "Q4_K", "dequantize": True}, "export[0].gguf: dequantize: true contradicts"),
    ],
)
def test_bad_values_are_one_line_before_any_model_loads(entry, expected):
    recipe = {
        "model": "no-such-model",
        "stages": [{"prune": {"sparsity": 0.5}}],
        "export": [{"format": "gguf", **entry}],
    }
    with pytest.raises(SlimlmError) as err:
        parse_recipe(recipe)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)


def test_type_names_take_any_case_and_layers_any_order():
    entry = GGUFExport(format="gguf", tensor_types={"model.embed_tokens": "iq4_nl"}, prune_layers=[3, 1])
    assert entry.tensor_types == {"model.embed_tokens": "IQ4_NL"} and entry.prune_layers == [1, 3] and entry.mixed
    assert not GGUFExport(format="gguf").mixed
