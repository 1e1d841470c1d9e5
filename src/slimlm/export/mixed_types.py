"""A GGUF with a llama.cpp type of its own for every tensor, written by llama.cpp's `llama-quantize` itself.

slimlm's own exporter (gguf.py) writes packed grids code for code, which limits it to the legacy block types its
grids are; llama.cpp's k-quants and IQ4_NL have no slimlm grid. Here the model goes out once as an f32 GGUF and
``llama-quantize --pure --tensor-type-file F --token-embedding-type T [--prune-layers L] f32.gguf out.gguf`` writes
the mix (its own rounding, so the file is exactly what a llama.cpp user would get for that type map):

- ``--pure`` keeps llama.cpp's own per-tensor mixing out: every tensor not named gets the base type;
- the type file names each tensor by an anchored regex (``blk\\.3\\.ffn_down\\.weight$=q2_k``); llama-quantize
  matches it against the names *after* ``--prune-layers`` renumbers the blocks, so they are written that way;
- a k-quant (and IQ4_XS) needs rows that are multiples of 256 (`allowed_types`); others fall back inside
  llama-quantize, so only allowed types are ever asked for.

`gguf_file_bytes` predicts the file's size exactly (header with the tensor infos, each tensor's blocks padded to
the 32-byte alignment) from the f32 file's metadata, so a search can size a mix without writing it.
`GGUFWeights` reads a GGUF's quantized tensors back as float32 in Hugging Face's layout (Q/K rows un-permuted).
"""

from __future__ import annotations

import functools
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from slimlm.errors import SlimlmError
from slimlm.export.llamacpp import run_quantize

ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
# types llama-quantize makes without an importance matrix, for rows of any multiple of 32 / of 256
BLOCK32_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL")
SUPERBLOCK_TYPES = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
TYPES = BLOCK32_TYPES + SUPERBLOCK_TYPES  # every type a tensor of a type map may take
BASE_TYPE = "Q8_0"  # the matrices a type map does not name


def allowed_types(columns: int) -> tuple[str, ...]:
    """The types a tensor whose rows hold `columns` weights can take."""
    types = BLOCK32_TYPES if columns % 32 == 0 else ()
    return types + (SUPERBLOCK_TYPES if columns % 256 == 0 else ())


def _padded(count: int) -> int:
    return -(-count // ALIGNMENT) * ALIGNMENT


def tensor_bytes(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes of a tensor [rows, columns] (numpy order) of `type_name`, padded to the GGUF alignment."""
    block, size = GGML_QUANT_SIZES[QType[type_name]]
    elements = int(np.prod(shape))
    if shape[-1] % block:
        raise SlimlmError(f"a {type_name} tensor needs rows of a multiple of {block} weights, not {shape[-1]}")
    return _padded(elements // block * size)


@dataclass(frozen=True)
class TensorInfo:
    name: str  # GGUF name (blk.3.ffn_down.weight)
    shape: tuple[int, ...]  # numpy order: [rows, columns]
    type_name: str  # its type in the f32 source (F32)


@dataclass(frozen=True)
class SourceLayout:
    """What of an f32 GGUF a mix keeps whatever its types: the metadata bytes and the tensors in file order."""

    kv_end: int  # bytes up to the first tensor info (header and key/values)
    tensors: tuple[TensorInfo, ...]
    blocks: int

    @classmethod
    def read(cls, path: str | Path) -> SourceLayout:
        reader = gguf.GGUFReader(path)
        tensors = tuple(
            TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors
        )
        kv_end = min(t.field.offset for t in reader.tensors)
        blocks = int(reader.fields["llama.block_count"].parts[-1][0])
        return cls(kv_end, tensors, blocks)


def renumbered(name: str, removed: frozenset[int], prefix: str = "blk") -> str | None:
    """The tensor's name after `removed` blocks are pruned (blocks after them move down), or None if pruned;
    `prefix`: what precedes the block index (GGUF's ``blk``, transformers' ``model.layers``)."""
    m = re.match(rf"^{re.escape(prefix)}\.(\d+)\.", name)
    if m is None:
        return name
    block = int(m[1])
    if block in removed:
        return None
    return f"{prefix}.{block - sum(r < block for r in removed)}." + name[m.end() :]


def gguf_file_bytes(layout: SourceLayout, types: dict[str, str], removed: frozenset[int] = frozenset()) -> int:
    """The size of llama-quantize's file: `types` maps source GGUF tensor names to a type (others keep theirs)."""
    header, data = layout.kv_end, 0
    for tensor in layout.tensors:
        name = renumbered(tensor.name, removed)
        if name is None:
            continue
        # tensor info: name (u64 length + bytes), n_dims u32, dims u64 each, type u32, offset u64
        header += 8 + len(name.encode()) + 4 + 8 * len(tensor.shape) + 4 + 8
        data += tensor_bytes(tensor.shape, types.get(tensor.name, tensor.type_name))
    return _padded(header) + data


def write_mixed_gguf(
    source: str | Path,
    path: str | Path,
    types: dict[str, str],
    base_type: str = BASE_TYPE,
    removed: frozenset[int] = frozenset(),
    imatrix: str | Path | None = None,
    threads: int = 2,
) -> Path:
    """llama-quantize `source` (an f32 GGUF) into `path` with every tensor of `types` (source GGUF names, the
    token embedding included) at its type, the other matrices at `base_type`, the blocks in `removed` pruned.
    Atomic: written beside `path`, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    type_file = temporary.with_suffix(".types.txt")
    lines, extra = [], ["--pure"]
    for name, type_name in sorted(types.items()):
        new = renumbered(name, removed)
        if name == "token_embd.weight":
            extra += ["--token-embedding-type", type_name.lower()]
        elif new is not None:
            lines.append(f"{re.escape(new)}$={type_name.lower()}")
    type_file.write_text("\n".join(lines) + "\n")
    extra += ["--tensor-type-file", str(type_file)]
    if removed:
        extra += ["--prune-layers", ",".join(str(r) for r in sorted(removed))]
    try:
        run_quantize(source, temporary, base_type, imatrix=imatrix, threads=threads, extra=extra)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        type_file.unlink(missing_ok=True)
    return path


def unpermute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of gguf.permute_rows: llama.cpp's rotary row order back to Hugging Face's."""
    rows = data.shape[0]
    return data.reshape(heads, rows // heads // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


class GGUFWeights:
    """The quantized tensors of a GGUF, read one at a time (the file is memory-mapped) as float32 weights in
    Hugging Face's layout (Q/K rows un-permuted): ``weights.types[hf_name]``, ``weights.get(hf_name)``."""

    def __init__(self, path: str | Path, config):
        self.reader, self.config = gguf.GGUFReader(path), config
        hf_names = hf_names_by_gguf(config)
        self.tensors = {hf_names[t.name]: t for t in self.reader.tensors if t.tensor_type.name not in ("F32", "F16")}
        self.types = {name: t.tensor_type.name for name, t in self.tensors.items()}

    def get(self, hf_name: str) -> torch.Tensor:
        from slimlm.modules import attention_head_dim

        tensor = self.tensors[hf_name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape)))
        heads = {"attn_q": self.config.num_attention_heads, "attn_k": self.config.num_key_value_heads}
        kind = tensor.name.split(".")[-2]
        if kind in heads:
            assert values.shape[0] == heads[kind] * attention_head_dim(self.config)
            values = unpermute_rows(values, heads[kind])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def hf_names_by_gguf(config) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name, for the weights of a LLaMA-family model."""
    return dict(_names_by_gguf(config.num_hidden_layers))


@functools.cache
def _names_by_gguf(layers: int) -> tuple[tuple[str, str], ...]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)  # slow to build: once per depth
    hf = ["model.embed_tokens.weight", "lm_head.weight"]
    suffixes = ("q_proj", "k_proj", "v_proj", "o_proj")
    for layer in range(layers):
        hf += [f"model.layers.{layer}.self_attn.{s}.weight" for s in suffixes]
        hf += [f"model.layers.{layer}.mlp.{s}.weight" for s in ("gate_proj", "up_proj", "down_proj")]
    found = ((names.get_name(n, try_suffixes=(".weight",)), n) for n in hf)
    return tuple((name, n) for name, n in found if name is not None)


def gguf_name(hf_name: str, config) -> str:
    """Hugging Face parameter name -> GGUF tensor name."""
    found = {hf: name for name, hf in hf_names_by_gguf(config).items()}.get(hf_name)
    if found is None:
        raise SlimlmError(f"{hf_name}: llama.cpp's llama architecture has no tensor for it")
    return found
