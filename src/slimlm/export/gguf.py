"""Write a (compressed) LLaMA-family model as one GGUF file that llama.cpp runs: `export_gguf`.

What is written follows llama.cpp's own converter (convert_hf_to_gguf.py, ``LlamaModel``):

- hyperparameters from the config (llama.context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count/head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count,
  attention.key_length/value_length when the config carries head_dim, vocab_size), so depth- and width-pruned
  models describe themselves;
- the rows of q_proj and k_proj permuted into the rotary layout llama.cpp expects (``LlamaModel.permute``); the
  permutation only reorders output rows, so it applies to quantized blocks (whole rows of them) as to floats;
- no output.weight when the LM head is the token embedding (llama.cpp then reuses token_embd);
- the tokenizer as a GPT-2-style BPE vocabulary (tokens, token types, merges, special token ids, chat template).

Weights of packed quantized modules go out in llama.cpp's block types code for code when their grid is exactly one
(ggml_blocks.py); other tensors as f32 or f16 (norms and biases always f32, as the converter does). What has no
exact form is refused with one line naming the module, or with ``dequantize=True`` written dense and listed in the
summary. Module kinds are dispatched through slimlm.storage's registry (``module.kind``), never by class.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.export import ggml_blocks as blocks
from slimlm.export.gguf_vocab import GGUFVocab
from slimlm.modules import attention_head_dim
from slimlm.storage import stored_modules

# model types convert_hf_to_gguf.py writes as the llama architecture (LlamaForCausalLM, MistralForCausalLM)
MODEL_TYPES = ("llama", "mistral")
DENSE_TYPES = {"f32": QType.F32, "f16": QType.F16}
_DEQUANTIZE_HINT = "or pass dequantize=True to write it as f16/f32"


@dataclass
class ExportSummary:
    """What export_gguf wrote: tensors per GGML type, the file's size, and the modules written dense."""

    path: Path
    tensor_types: dict[str, int]
    bytes: int
    tokenizer_pre: str
    file_type: str
    dequantized: dict[str, str] = field(default_factory=dict)  # module name -> its format, written as f16/f32
    embedding: str = ""  # how token_embd was written when it was quantized here (not a slimlm grid)

    def line(self) -> str:
        types = ", ".join(f"{count}×{name}" for name, count in sorted(self.tensor_types.items()))
        dense = f"; {len(self.dequantized)} modules dequantized to dense" if self.dequantized else ""
        embedding = f"; {self.embedding}" if self.embedding else ""
        return f"{self.path} ({self.bytes / 2**20:.1f} MiB, {self.file_type}): {types}{dense}{embedding}"


@dataclass
class _Tensor:
    name: str  # the Hugging Face name (model.layers.0.self_attn.q_proj.weight)
    data: np.ndarray  # float32 values, or block bytes uint8 [rows, bytes] when qtype is a block type
    qtype: QType | None = None  # None: dense, written as the dense type chosen


def export_gguf(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    dtype: str = "auto",
    type: str = "auto",
    dequantize: bool = False,
    pre: str | None = None,
    source_gguf: str | Path | None = None,
    embeddings: str = "auto",
) -> ExportSummary:
    """Write `model` and `tokenizer` to the GGUF file `path` (atomically: the complete file or nothing).

    dtype: the type of dense matrices ("auto": f16 for a float16 model, else f32). type: "auto" keeps every packed
    module's own block type; "q8_0", "q4_0", ... requires that type of every packed module. dequantize: write
    modules with no exact GGUF type as dense instead of refusing. pre / source_gguf: the llama.cpp pre-tokenizer
    name, or a GGUF to read it from, for a tokenizer whose check-text hash is not recognised. embeddings: "auto"
    writes the token embedding (and the LM head it serves when tied) like other dense matrices; a block type
    ("q8_0", "q4_0", ...) quantizes it here with ggml's own rounding (gguf.quants, as llama-quantize does): slimlm's
    stages leave the embedding dense, so this is a conversion of float values, said so in the summary.
    """
    config = model.config
    _check_architecture(model)
    dense = _dense_type(model, dtype)
    embedding_type = None if embeddings == "auto" else _wanted_type(embeddings)
    tensors, dequantized = _collect_tensors(model, _wanted_type(type), dequantize)
    vocab = GGUFVocab.build(tokenizer, config, pre, source_gguf)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, config)
    vocab.add_to(writer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    counts: Counter[str] = Counter()
    decoder: Counter[str] = Counter()  # the types of everything but token_embd: what general.file_type names
    for tensor in tensors:
        name, data, qtype = _gguf_tensor(tensor, names, config, dense, embedding_type)
        writer.add_tensor(name, data, raw_dtype=qtype)
        counts[qtype.name] += 1
        decoder[qtype.name] += name != "token_embd.weight"
    file_type = _file_type(+decoder, dense)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    size = _write_atomically(writer, Path(path))
    embedding = f"token_embd quantized to {embedding_type.name} by ggml's rounding" if embedding_type else ""
    return ExportSummary(Path(path), dict(counts), size, vocab.pre, file_type.name, dequantized, embedding)


def _check_architecture(model: nn.Module) -> None:
    config = model.config
    if config.model_type not in MODEL_TYPES:
        raise SlimlmError(
            f"GGUF export: model type {config.model_type!r} is not supported; llama.cpp's llama "
            f"architecture takes {', '.join(MODEL_TYPES)}"
        )
    layers = len(model.get_decoder().layers)
    if layers != config.num_hidden_layers:
        raise SlimlmError(
            f"GGUF export: the model has {layers} decoder layers but its config says "
            f"num_hidden_layers {config.num_hidden_layers}"
        )


def _dense_type(model: nn.Module, dtype: str) -> QType:
    if dtype == "auto":  # both exact: float16 values in f16, float32 and bfloat16 values in f32
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        return QType.F16 if floats and floats[0] == torch.float16 else QType.F32
    if dtype not in DENSE_TYPES:
        raise SlimlmError(f"GGUF export: dtype {dtype!r} is not one of auto, {', '.join(DENSE_TYPES)}")
    return DENSE_TYPES[dtype]


def _wanted_type(name: str) -> QType | None:
    if name == "auto":
        return None
    if name not in blocks.TYPE_NAMES:
        raise SlimlmError(f"GGUF export: type {name!r} is not one of auto, {', '.join(blocks.TYPE_NAMES)}")
    return blocks.TYPE_NAMES[name]


# --- tensors -------------------------------------------------------------------------------------------------


def _floats(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _stored_weight(
    name: str, module, wanted: QType | None, dequantize: bool, dequantized: dict[str, str]
) -> tuple[np.ndarray, QType | None]:
    """(data, block type) of one StoredModule's weight: its blocks, or (dequantize=True) its dense weight."""
    try:
        return blocks.kind_of(module).weight(module, wanted)
    except blocks.NotExact as err:
        if not dequantize:
            raise SlimlmError(f"{name}: {err.why}, {_DEQUANTIZE_HINT}") from None
        dequantized[name] = err.what
        return _floats(module.dequantize_weight()), None


def _collect_tensors(model: nn.Module, wanted: QType | None, dequantize: bool):
    """Every tensor to write (Hugging Face names), and the modules written dense; refusals raise here, before
    any file is opened."""
    aliases: dict[int, list[str]] = {}  # a module shared by a cross-layer tie is written under each of its names
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    tensors, dequantized, inside = [], {}, ()
    for name, module in stored_modules(model):
        if name.startswith(inside):
            continue  # inside a wrapper exported whole (an EoRA base)
        data, qtype = _stored_weight(name, module, wanted, dequantize, dequantized)
        bias = blocks.module_bias(module)
        for alias in aliases[id(module)]:
            inside += (alias + ".",)
            tensors.append(_Tensor(alias + ".weight", data, qtype))
            if bias is not None:
                tensors.append(_Tensor(alias + ".bias", _floats(bias)))
    return tensors + _plain_tensors(model, inside), dequantized


def _plain_tensors(model: nn.Module, inside: tuple[str, ...]) -> list[_Tensor]:
    """The parameters outside StoredModules; the LM head not when it is the token embedding (tied: llama.cpp
    then reads token_embd for the output, as convert_hf_to_gguf.py leaves output.weight out)."""
    embedding = model.get_input_embeddings()
    own_name = next(name for name, module in model.named_modules() if module is embedding) + ".weight"
    return [
        _Tensor(name, _floats(parameter))
        for name, parameter in model.named_parameters(remove_duplicate=False)
        if not name.startswith(inside) and (parameter is not embedding.weight or name == own_name)
    ]


def permute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute on the rows (output features) of a matrix, bias or block bytes:
    within each head, the interleaved rotary halves of Hugging Face's layout become llama.cpp's."""
    rows = data.shape[0]
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _rotary_heads(kind, rows: int, config, name: str) -> int | None:
    """How many heads the rows of a Q or K tensor hold (None for other tensors); checked against the config."""
    heads = {
        gguf.MODEL_TENSOR.ATTN_Q: config.num_attention_heads,
        gguf.MODEL_TENSOR.ATTN_K: config.num_key_value_heads,
    }.get(kind)
    if heads is not None and rows != heads * attention_head_dim(config):
        raise SlimlmError(
            f"{name}: {rows} rows are not {heads} heads of {attention_head_dim(config)} as the "
            "config says; llama.cpp's llama architecture needs the same heads in every layer"
        )
    return heads


def _gguf_tensor(
    tensor: _Tensor, names, config, dense: QType, embedding_type: QType | None = None
) -> tuple[str, np.ndarray, QType]:
    """(GGUF name, data, type) of one tensor: renamed, Q/K rows permuted, dense values cast (the token embedding
    quantized when `embedding_type` is a block type)."""
    found = names.get_type_and_name(tensor.name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise SlimlmError(f"{tensor.name}: llama.cpp's llama architecture has no tensor for it")
    kind, name = found
    data = tensor.data
    heads = _rotary_heads(kind, data.shape[0], config, tensor.name)
    if heads is not None:
        data = permute_rows(data, heads)
    if tensor.qtype is not None:
        return name, np.ascontiguousarray(data), tensor.qtype
    if kind == gguf.MODEL_TENSOR.TOKEN_EMBD and embedding_type is not None:
        return name, gguf.quants.quantize(data.astype(np.float32), embedding_type), embedding_type
    qtype = QType.F32 if data.ndim <= 1 else dense  # norms and biases stay f32, as llama.cpp's converter keeps them
    data = data.astype(np.float16 if qtype == QType.F16 else np.float32)
    if not np.isfinite(data).all():
        raise SlimlmError(f"{tensor.name}: values overflow {qtype.name} (or are NaN/inf); export with dtype='f32'")
    return name, np.ascontiguousarray(data), qtype


def _file_type(counts: Counter, dense: QType) -> gguf.LlamaFileType:
    """general.file_type: MOSTLY_<type> of the one block type used, ALL_F32/MOSTLY_F16 without blocks."""
    block_types = {name for name in counts if name not in ("F32", "F16")}
    if not block_types:
        return gguf.LlamaFileType.ALL_F32 if dense == QType.F32 else gguf.LlamaFileType.MOSTLY_F16
    if len(block_types) == 1:
        return gguf.LlamaFileType[f"MOSTLY_{block_types.pop()}"]
    return gguf.LlamaFileType.GUESSED


# --- metadata ------------------------------------------------------------------------------------------------


def _add_hparams(writer: gguf.GGUFWriter, config) -> None:
    """The llama.* keys convert_hf_to_gguf.py writes (TextModel.set_gguf_parameters, LlamaModel's additions)."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    _add_rope(writer, config)
    # the converter writes head_dim whenever the config has it; llama.cpp needs it once width pruning removed heads
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(attention_head_dim(config))


def _add_rope(writer: gguf.GGUFWriter, config) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(params["factor"])
    elif rope_type != "default":
        raise SlimlmError(f"GGUF export: rope type {rope_type!r} is not exported (only default and linear RoPE)")


# --- file ----------------------------------------------------------------------------------------------------


def _write_atomically(writer: gguf.GGUFWriter, path: Path) -> int:
    """Write into a temporary file beside `path`, then rename it into place; on any failure remove it. Bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        writer.write_header_to_file(path=temporary)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    finally:
        writer.close()
        temporary.unlink(missing_ok=True)
    return path.stat().st_size
