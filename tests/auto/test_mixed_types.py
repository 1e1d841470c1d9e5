"""Per-tensor llama.cpp types through llama-quantize: the predicted file size is the real one, types land where
asked (after --prune-layers renumbers the blocks), and the weights read back are the model's in HF layout."""

import gguf
import pytest
import torch

from conftest import build_tiny_llama
from slimlm.export import mixed_types as mixed
from slimlm.export.gguf import export_gguf


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = build_tiny_llama(len(tiny_tokenizer), layers=3)
    config = LlamaConfig(**{**model.config.to_dict(), "hidden_size": 256, "intermediate_size": 512})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "f32.gguf"
    export_gguf(model, tiny_tokenizer, path, dtype="f32", pre="gpt-2")
    return model, path


def test_allowed_types_follow_the_row_width():
    assert "Q2_K" not in mixed.allowed_types(576) and "Q4_0" in mixed.allowed_types(576)
    assert "Q2_K" in mixed.allowed_types(1536)
    assert mixed.allowed_types(48) == ()


def test_renumbering_follows_pruned_blocks():
    removed = frozenset({0, 2})
    assert mixed.renumbered("blk.0.attn_q.weight", removed) is None
    assert mixed.renumbered("blk.1.attn_q.weight", removed) == "blk.0.attn_q.weight"
    assert mixed.renumbered("blk.10.ffn_down.weight", removed) == "blk.8.ffn_down.weight"
    assert mixed.renumbered("token_embd.weight", removed) == "token_embd.weight"


@pytest.mark.parametrize("removed", [frozenset(), frozenset({1})])
def test_predicted_size_is_llama_quantizes_file_and_types_land(f32_gguf, tmp_path, removed):
    _, source = f32_gguf
    types = {"blk.0.ffn_down.weight": "Q2_K", "blk.2.ffn_down.weight": "Q4_K", "blk.2.attn_q.weight": "Q5_0"}
    types["token_embd.weight"] = "Q4_0"
    layout = mixed.SourceLayout.read(source)
    out = mixed.write_mixed_gguf(source, tmp_path / "mixed.gguf", types, base_type="Q8_0", removed=removed)
    assert out.stat().st_size == mixed.gguf_file_bytes(layout, types | _rest(layout, types), removed)
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    for name, type_name in types.items():
        new = mixed.renumbered(name, removed)
        assert written[new] == type_name
    assert written[mixed.renumbered("blk.2.attn_k.weight", removed)] == "Q8_0"


def _rest(layout, types):
    """Every other matrix at the base type, as --pure writes it."""
    return {t.name: "Q8_0" for t in layout.tensors if len(t.shape) == 2 and t.name not in types}


def test_weights_read_back_in_hugging_face_layout(f32_gguf, tmp_path):
    model, source = f32_gguf
    out = mixed.write_mixed_gguf(source, tmp_path / "q8.gguf", {}, base_type="Q8_0")
    weights = mixed.GGUFWeights(out, model.config)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        original = model.get_parameter(name)
        read = weights.get(name)
        assert weights.types[name] == "Q8_0"
        # Q8_0 moves a weight by at most half a step (max|w|/127/2 per block); a wrong row order by far more
        assert (read - original).abs().max() <= original.abs().max() / 127
