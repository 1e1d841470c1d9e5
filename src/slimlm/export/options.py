"""Export targets as a recipe's `export` list or the `slimlm export` command names them, and `export_model`.

``export: [{format: gguf, type: auto, embeddings: q8_0}, {format: hf}, {format: compressed-tensors}]``: each entry
is validated before any model loads (unknown options refused per format) and written into ``<output>/export/``.

A gguf entry with ``tensor_types`` / ``prune_layers`` / ``base_type`` is llama.cpp's own quantization instead of
slimlm's blocks: ``{format: gguf, tensor_types: {model.layers.0.mlp.down_proj: Q4_K, model.embed_tokens: Q8_0},
prune_layers: [3], base_type: Q8_0}`` writes the model as an f32 GGUF and has ``llama-quantize`` give every named
matrix its type, the others `base_type`, with the listed decoder layers removed (export/gguf_mix.py); this is the
form `slimlm auto --target gguf` writes its result in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimlm.export.mixed_types import BASE_TYPE
from slimlm.export.mixed_types import TYPES as LLAMA_QUANTIZE_TYPES

GGUF_TYPES = Literal["auto", "q8_0", "q4_0", "q5_0", "q4_1", "q5_1"]


class _Export(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GGUFExport(_Export):
    """llama.cpp: quantized modules in their native block types, code for code (export/gguf.py)."""

    format: Literal["gguf"]
    type: GGUF_TYPES = "auto"  # auto: every packed module's own block type
    dtype: Literal["auto", "f32", "f16"] = "auto"  # dense matrices
    embeddings: GGUF_TYPES = "auto"  # a block type quantizes the token embedding with ggml's rounding
    dequantize: bool = False  # write modules with no exact GGUF type dense instead of refusing
    pre: str | None = None  # llama.cpp's pre-tokenizer name, for a tokenizer its hash does not identify
    name: str = "model.gguf"
    # llama-quantize per tensor (gguf_mix.py): module name -> llama.cpp type (Q4_K, IQ4_NL, ...; the names are the
    # exported model's, model.embed_tokens for token_embd), decoder layers to remove (counted before removal), and
    # the type of every matrix not named (mixed_types.BASE_TYPE, Q8_0, when unset)
    tensor_types: dict[str, str] = Field(default_factory=dict)
    prune_layers: list[int] = Field(default_factory=list)
    base_type: str | None = None

    @property
    def mixed(self) -> bool:
        """Whether llama-quantize writes this export (a type map, pruned layers or a base type given)."""
        return bool(self.tensor_types or self.prune_layers or self.base_type)

    @field_validator("tensor_types")
    @classmethod
    def _known_tensor_types(cls, value: dict[str, str]) -> dict[str, str]:
        return {name: llama_quantize_type(type_name, name) for name, type_name in value.items()}

    @field_validator("base_type")
    @classmethod
    def _known_base_type(cls, value: str | None) -> str | None:
        return None if value is None else llama_quantize_type(value)

    @field_validator("prune_layers")
    @classmethod
    def _distinct_layers(cls, value: list[int]) -> list[int]:
        if any(layer < 0 for layer in value) or len(set(value)) != len(value):
            raise ValueError(f"{value} must be distinct decoder layer indices (0, 1, ...)")
        return sorted(value)

    @model_validator(mode="after")
    def _no_contradiction(self) -> GGUFExport:
        """tensor_types/prune_layers/base_type quantize an f32 file with llama-quantize: options that ask for
        slimlm's own blocks or a rounded source contradict them."""
        if not self.mixed:
            return self
        clash = {
            "type": (self.type != "auto", "type picks slimlm's packed blocks; give the types in tensor_types"),
            "embeddings": (self.embeddings != "auto", "give the embedding's type as tensor_types.model.embed_tokens"),
            "dtype": (self.dtype == "f16", "llama-quantize reads the f32 file; f16 would round the weights first"),
            "dequantize": (self.dequantize, "llama-quantize needs a dense model, not packed modules made dense"),
        }
        for option, (contradicts, why) in clash.items():
            if contradicts:
                raise ValueError(
                    f"{option}: {json.dumps(getattr(self, option))} contradicts tensor_types/prune_layers/base_type "
                    f"(llama-quantize of an f32 GGUF): {why}"
                )
        return self


class HFExport(_Export):
    """A plain transformers folder, every slimlm module dequantized (export/hf.py)."""

    format: Literal["hf"]
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    name: str = "hf"


class CompressedTensorsExport(_Export):
    """compressed-tensors pack-quantized: transformers and vLLM load it (export/compressed_tensors.py)."""

    format: Literal["compressed-tensors"]
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "bfloat16"
    dequantize: bool = False
    name: str = "compressed-tensors"


def llama_quantize_type(value: str, name: str = "") -> str:
    """A llama-quantize type name (any case) as llama.cpp spells it (Q4_K); one error line otherwise."""
    if isinstance(value, str) and value.upper() in LLAMA_QUANTIZE_TYPES:
        return value.upper()
    where = f"{name}: " if name else ""
    raise ValueError(f"{where}{value!r} is not a llama-quantize type; allowed: {', '.join(LLAMA_QUANTIZE_TYPES)}")


ExportTarget = Annotated[GGUFExport | HFExport | CompressedTensorsExport, Field(discriminator="format")]
FORMATS = ("gguf", "hf", "compressed-tensors")


def export_model(model, tokenizer, target: GGUFExport | HFExport | CompressedTensorsExport, path: str | Path):
    """Write `model` as `target` says to `path` (a file for gguf, a folder otherwise); returns the exporter's
    summary, whose ``line()`` says what was written."""
    if target.format == "gguf" and target.mixed:
        from slimlm.export.gguf_mix import export_mixed_gguf

        layers = frozenset(target.prune_layers)
        return export_mixed_gguf(
            model, tokenizer, path, target.tensor_types, layers, target.base_type or BASE_TYPE, pre=target.pre
        )
    options = target.model_dump(exclude={"format", "name", "tensor_types", "prune_layers", "base_type"})
    if target.format == "gguf":
        from slimlm.export.gguf import export_gguf

        return export_gguf(model, tokenizer, path, **options)
    if target.format == "hf":
        from slimlm.export.hf import export_hf

        return export_hf(model, tokenizer, path, **options)
    from slimlm.export.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(model, tokenizer, path, **options)
