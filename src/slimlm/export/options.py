"""Export targets as a recipe's `export` list or the `slimlm export` command names them, and `export_model`.

``export: [{format: gguf, type: auto, embeddings: q8_0}, {format: hf}, {format: compressed-tensors}]``: each entry
is validated before any model loads (unknown options refused per format) and written into ``<output>/export/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

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


ExportTarget = Annotated[GGUFExport | HFExport | CompressedTensorsExport, Field(discriminator="format")]
FORMATS = ("gguf", "hf", "compressed-tensors")


def export_model(model, tokenizer, target: GGUFExport | HFExport | CompressedTensorsExport, path: str | Path):
    """Write `model` as `target` says to `path` (a file for gguf, a folder otherwise); returns the exporter's
    summary, whose ``line()`` says what was written."""
    options = target.model_dump(exclude={"format", "name"})
    if target.format == "gguf":
        from slimlm.export.gguf import export_gguf

        return export_gguf(model, tokenizer, path, **options)
    if target.format == "hf":
        from slimlm.export.hf import export_hf

        return export_hf(model, tokenizer, path, **options)
    from slimlm.export.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(model, tokenizer, path, **options)
