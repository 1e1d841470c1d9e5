"""GGUF export: every exported file is read back with gguf's own reader and dequantizer and compared with slimlm's
weights exactly (after undoing the rotary permutation of Q and K rows)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import build_tiny_llama, build_tokenizer, run_stage
from slimlm.errors import SlimlmError
from slimlm.export.gguf import export_gguf
from slimlm.storage import stored_modules

G32 = {"method": "rtn", "group_size": 32}
HINT = ", or pass dequantize=True to write it as f16/f32"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer, **options):
    return build_tiny_llama(len(tokenizer), **options)


def _export(model, tokenizer, path, **options):
    return export_gguf(model, tokenizer, path, pre="gpt-2", **options)


def _unpermute(data: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of convert_hf_to_gguf's LlamaModel.permute."""
    rows = data.shape[0]
    return data.reshape(heads, rows // heads // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _read(path, config) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    """The file's reader, and its tensors dequantized by gguf.quants in Hugging Face row order."""
    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            values = _unpermute(values, config.num_attention_heads)
        elif tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            values = _unpermute(values, config.num_key_value_heads)
        tensors[tensor.name] = values
    return reader, tensors


def _expected(model) -> dict[str, np.ndarray]:
    """slimlm's weights under their GGUF names: stored modules dequantized, every other parameter as it is."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    stored = {}
    for name, module in stored_modules(model):  # outer modules first: an EoRA wrapper stands for its base
        if not name.startswith(tuple(f"{outer}." for outer in stored)):
            stored[name] = module
    weights = {f"{name}.weight": module.dequantize_weight() for name, module in stored.items()}
    inside = tuple(f"{name}." for name in stored)
    weights.update({name: p for name, p in model.named_parameters() if not name.startswith(inside)})
    return {
        names.get_name(name, try_suffixes=(".weight", ".bias")): w.detach().float().numpy()
        for name, w in weights.items()
    }


def _types(reader) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}


def _field(reader, key):
    return reader.fields[key].contents()


def _assert_exact(model, path):
    reader, tensors = _read(path, model.config)
    expected = _expected(model)
    assert tensors.keys() == expected.keys()
    for name, values in expected.items():
        assert np.array_equal(tensors[name], values), name
    return reader


def test_f32_export_reads_back_exactly_with_llama_metadata(tokenizer, tmp_path):
    model = _model(tokenizer)
    summary = _export(model, tokenizer, tmp_path / "tiny.gguf")

    reader = _assert_exact(model, tmp_path / "tiny.gguf")
    assert set(_types(reader).values()) == {"F32"} and summary.file_type == "ALL_F32"
    assert summary.tensor_types == {"F32": 2 * 9 + 2} and summary.bytes == (tmp_path / "tiny.gguf").stat().st_size
    expected = {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.context_length": 512,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 300,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    assert {key: _field(reader, key) for key in expected} == expected
    assert _field(reader, "tokenizer.ggml.tokens") == [tokenizer.convert_ids_to_tokens(i) for i in range(300)]
    assert "output.weight" not in _types(reader)  # tied: llama.cpp reuses token_embd


def test_q_and_k_rows_are_permuted_into_llama_cpp_rotary_layout(tokenizer, tmp_path):
    model = _model(tokenizer)
    _export(model, tokenizer, tmp_path / "tiny.gguf")
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "tiny.gguf")).tensors}
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    # head 0 of 16 rows: HF rows 0, 8, 1, 9, ... pair up the rotary halves that llama.cpp keeps adjacent
    assert np.array_equal(raw["blk.0.attn_q.weight"][:4], q[[0, 8, 1, 9]])


@pytest.mark.parametrize(("bits", "sym", "qtype"), [(8, True, "Q8_0"), (4, True, "Q4_0"), (5, True, "Q5_0")])
def test_symmetric_grids_export_code_for_code(tokenizer, tmp_path, bits, sym, qtype):
    model = _model(tokenizer)
    run_stage(model, "quantize", bits=bits, sym=sym, **G32)
    summary = _export(model, tokenizer, tmp_path / "q.gguf", type=qtype.lower())

    reader = _assert_exact(model, tmp_path / "q.gguf")
    assert _types(reader)["blk.1.attn_k.weight"] == qtype and summary.tensor_types[qtype] == 14
    assert summary.file_type == f"MOSTLY_{qtype}" and not summary.dequantized


@pytest.mark.parametrize(("bits", "qtype"), [(8, "Q8_0"), (4, "Q4_0"), (5, "Q5_0")])
def test_rtn_blocks_are_the_bytes_ggml_s_own_quantizer_writes(tokenizer, tmp_path, bits, qtype):
    """slimlm's symmetric grid is ggml's rule: RTN's blocks equal gguf.quants.quantize of the float weights."""
    model = _model(tokenizer)
    floats = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
    run_stage(model, "quantize", bits=bits, **G32)
    _export(model, tokenizer, tmp_path / "q.gguf")
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    weight = floats["model.layers.1.mlp.down_proj.weight"]  # down_proj: no Q/K row permutation to undo
    assert np.array_equal(raw["blk.1.ffn_down.weight"], gguf.quants.quantize(weight, gguf.GGMLQuantizationType[qtype]))


def _power_of_two_scales(model) -> None:
    """Round every packed scale to a power of two: Δ·z then fits float16, as Q4_1/Q5_1 store the minimum."""
    for _, module in stored_modules(model):
        module.scales.copy_(torch.exp2(torch.round(torch.log2(module.scales.float()))).half())


@pytest.mark.parametrize(("bits", "qtype"), [(4, "Q4_1"), (5, "Q5_1")])
def test_asymmetric_grids_export_exactly_where_float16_holds_the_minimum(tokenizer, tmp_path, bits, qtype):
    model = _model(tokenizer)
    run_stage(model, "quantize", bits=bits, sym=False, **G32)
    with pytest.raises(SlimlmError) as err:
        _export(model, tokenizer, tmp_path / "refused.gguf")
    assert str(err.value).startswith(
        f"model.layers.0.self_attn.q_proj: {bits}-bit asymmetric group 32 is not "
        f"{qtype} exactly: {qtype} stores each group's minimum −Δ·z as float16"
    )
    assert str(err.value).endswith(HINT) and "\n" not in str(err.value)

    _power_of_two_scales(model)
    summary = _export(model, tokenizer, tmp_path / "q.gguf")
    assert _types(_assert_exact(model, tmp_path / "q.gguf"))["blk.0.ffn_down.weight"] == qtype
    assert summary.tensor_types[qtype] == 14


def test_f16_writes_matrices_in_f16_and_norms_in_f32(tokenizer, tmp_path):
    model = _model(tokenizer, tie=False)
    summary = _export(model, tokenizer, tmp_path / "f16.gguf", dtype="f16")
    reader, tensors = _read(tmp_path / "f16.gguf", model.config)
    types = _types(reader)
    assert types["token_embd.weight"] == types["output.weight"] == types["blk.0.attn_q.weight"] == "F16"
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == "F32"
    assert summary.file_type == "MOSTLY_F16"
    expected = model.lm_head.weight.detach().half().float().numpy()
    assert np.array_equal(tensors["output.weight"], expected)


def test_untied_head_is_written_as_output_weight(tokenizer, tmp_path):
    model = _model(tokenizer, tie=False)
    run_stage(model, "quantize", bits=8, **G32)
    _export(model, tokenizer, tmp_path / "untied.gguf")
    assert _types(_assert_exact(model, tmp_path / "untied.gguf"))["output.weight"] == "F32"


def test_depth_and_width_pruned_models_describe_their_shapes(tokenizer, tmp_path):
    model = _model(tokenizer, layers=3)
    run_stage(model, "prune_depth", remove=1)
    run_stage(model, "prune_width", mlp_keep=0.5, heads_keep=2, gqa="whole_groups")
    run_stage(model, "quantize", bits=4, **G32)
    _export(model, tokenizer, tmp_path / "pruned.gguf")

    reader = _assert_exact(model, tmp_path / "pruned.gguf")
    shape = {
        key: _field(reader, f"llama.{key}")
        for key in (
            "block_count",
            "feed_forward_length",
            "embedding_length",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "attention.value_length",
            "rope.dimension_count",
        )
    }
    assert shape == {
        "block_count": 2,
        "feed_forward_length": 64,
        "embedding_length": 64,
        "attention.head_count": 2,
        "attention.head_count_kv": 1,
        "attention.key_length": 16,
        "attention.value_length": 16,
        "rope.dimension_count": 16,
    }
    assert "blk.2.attn_q.weight" not in _types(reader)
    assert reader.tensors[0].name == "blk.0.attn_q.weight" and list(reader.tensors[0].shape) == [64, 32]


@pytest.mark.parametrize(
    ("options", "line"),
    [
        ({"bits": 4, "group_size": 64}, "4-bit group 64 has no GGUF block type; quantize with group_size: 32 (Q4_0)"),
        (
            {"bits": 4, "group_size": None},
            "4-bit per channel has no GGUF block type; quantize with group_size: 32 (Q4_0)",
        ),
        ({"bits": 3, "group_size": 32}, "3-bit group 32 has no GGUF block type; quantize with bits: 4 (Q4_0)"),
        (
            {"bits": 8, "group_size": 32, "sym": False},
            "8-bit asymmetric group 32 has no GGUF block type; quantize with sym: true (Q8_0)",
        ),
    ],
)
def test_grids_without_a_block_type_are_refused_in_one_line(tokenizer, tmp_path, options, line):
    model = _model(tokenizer)
    run_stage(model, "quantize", method="rtn", **options)
    with pytest.raises(SlimlmError) as err:
        _export(model, tokenizer, tmp_path / "refused.gguf")
    assert str(err.value) == f"model.layers.0.self_attn.q_proj: {line}{HINT}"
    assert list(tmp_path.iterdir()) == []  # refused before any file is opened


@pytest.mark.parametrize(
    ("stage", "options", "what"),
    [
        ("quantize", {"method": "rtn", "bits": 4, "group_size": 64}, "4-bit group 64"),
        (
            "quantize",
            {"method": "smoothquant", "bits": 8, "group_size": None},
            "W8A8 (int8 weights per channel, int8 activations per token)",
        ),
        ("lowrank", {"method": "svd", "rank": 8}, "low-rank B·A (rank 8)"),
    ],
)
def test_dequantize_writes_what_has_no_block_type_as_dense(tokenizer, tmp_path, stage, options, what):
    model = _model(tokenizer)
    run_stage(model, stage, **options)
    summary = _export(model, tokenizer, tmp_path / "dense.gguf", dequantize=True)

    reader = _assert_exact(model, tmp_path / "dense.gguf")
    assert set(_types(reader).values()) == {"F32"}
    assert summary.dequantized["model.layers.1.mlp.down_proj"] == what
    assert len(summary.dequantized) == len(stored_modules(model))


def test_eora_wrapper_is_refused_or_written_with_its_correction(tokenizer, tmp_path):
    model = _model(tokenizer)
    run_stage(model, "quantize", bits=4, **G32)
    run_stage(model, "lowrank", method="eora", rank=4, original=_model(tokenizer))
    with pytest.raises(
        SlimlmError,
        match=r"^model\.layers\.0\.self_attn\.q_proj: EoRA-corrected weight \(rank 4\) "
        r"has no GGUF form",
    ):
        _export(model, tokenizer, tmp_path / "eora.gguf")
    summary = _export(model, tokenizer, tmp_path / "eora.gguf", dequantize=True)
    _assert_exact(model, tmp_path / "eora.gguf")  # base codes + B·A, as the wrapper's dequantize_weight gives
    assert summary.dequantized["model.layers.0.self_attn.q_proj"] == "EoRA-corrected weight (rank 4)"


def test_an_explicit_type_must_be_every_packed_modules_own(tokenizer, tmp_path):
    model = _model(tokenizer)
    run_stage(model, "quantize", bits=4, **G32)
    with pytest.raises(SlimlmError) as err:
        _export(model, tokenizer, tmp_path / "q8.gguf", type="q8_0")
    assert str(err.value) == (
        "model.layers.0.self_attn.q_proj: 4-bit group 32 is Q4_0, not the requested Q8_0 "
        f"(re-quantizing would change its values); export with type='auto'{HINT}"
    )
    with pytest.raises(SlimlmError, match="type 'q4_k' is not one of auto, q8_0, q4_0, q5_0, q4_1, q5_1"):
        _export(model, tokenizer, tmp_path / "q8.gguf", type="q4_k")


def test_pre_tokenizer_comes_from_its_hash_or_argument_or_source_gguf(tokenizer, tmp_path):
    model = _model(tokenizer)
    with pytest.raises(SlimlmError, match=r"^tokenizer: its BPE pre-tokenizer is not recognised .*pass pre="):
        export_gguf(model, tokenizer, tmp_path / "nopre.gguf")
    _export(model, tokenizer, tmp_path / "source.gguf")
    summary = export_gguf(model, tokenizer, tmp_path / "copy.gguf", source_gguf=tmp_path / "source.gguf")
    assert summary.tokenizer_pre == "gpt-2"


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tokenizer, tmp_path, monkeypatch):
    model = _model(tokenizer)
    target = tmp_path / "model.gguf"
    target.write_bytes(b"previous")

    def fail(writer, **kwargs):
        writer.fout[0].write(b"half a tensor")
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        _export(model, tokenizer, target)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and target.read_bytes() == b"previous"


def test_cross_layer_ties_are_written_under_every_layer_they_serve(tokenizer, tmp_path):
    model = _model(tokenizer, layers=3)
    run_stage(model, "share", method="tie_layers", count=1)
    run_stage(model, "quantize", bits=4, **G32)
    ((target, source),) = model.config.slimlm_tied_parameters.items()
    summary = _export(model, tokenizer, tmp_path / "tied.gguf")

    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "tied.gguf")).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
    target, source = (names.get_name(name + ".weight", try_suffixes=(".weight",)) for name in (target, source))
    assert target != source and np.array_equal(raw[target], raw[source])  # GGUF has no shared tensors: a copy
    assert summary.tensor_types["Q4_0"] == 3 * 7


def test_other_architectures_and_tokenizers_are_refused(tokenizer, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
        )
    )
    with pytest.raises(SlimlmError, match=r"^GGUF export: model type 'qwen2' is not supported"):
        _export(qwen, tokenizer, tmp_path / "qwen.gguf")
    words = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    with pytest.raises(
        SlimlmError,
        match=r"^tokenizer: only byte-level BPE tokenizers \(GGUF tokenizer model "
        r"gpt2\) are exported; this one is WordLevel",
    ):
        _export(_model(tokenizer), words, tmp_path / "words.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.builtin
def test_builtin_model_exports_with_the_shipped_gguf_s_tokenizer_metadata(tmp_path):
    from slimlm.models import builtin_gguf_path, load_model

    loaded = load_model("smollm2-135m")
    shipped = gguf.GGUFReader(str(builtin_gguf_path("smollm2-135m")))
    shipped_keys = {key for key in shipped.fields if key.startswith("tokenizer.")}
    for name in ("f32", "q4_0"):
        if name == "q4_0":
            run_stage(loaded.model, "quantize", bits=4, **G32)
        summary = export_gguf(loaded.model, loaded.tokenizer, tmp_path / f"{name}.gguf")
        reader = gguf.GGUFReader(str(tmp_path / f"{name}.gguf"))
        assert summary.tokenizer_pre == "smollm"  # recognised by its check-text hash
        assert {key for key in reader.fields if key.startswith("tokenizer.")} == shipped_keys
        for key in sorted(shipped_keys):
            assert _field(reader, key) == _field(shipped, key), key
        for key in (
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "rope.dimension_count",
            "rope.freq_base",
            "context_length",
        ):
            assert _field(reader, f"llama.{key}") == _field(shipped, f"llama.{key}"), key
        assert "output.weight" not in _types(reader)
    assert summary.tensor_types == {"Q4_0": 30 * 7, "F32": 30 * 2 + 2}
