"""Write a model whose packed modules sit on symmetric 4- or 8-bit grids in the compressed-tensors library's
``pack-quantized`` format: `export_compressed_tensors`. `AutoModelForCausalLM.from_pretrained(folder)` loads it
(compressed-tensors installed; tests/export/test_compressed_tensors.py), and it is the format vLLM's WNA16 schemes
serve (int4/int8 weights, 16-bit activations; not run here: this environment has no vLLM).

The format is the library's, written by its own code, never by hand:

1. `hf.plain_copy` turns the model into plain transformers modules; each exportable packed module becomes an
   nn.Linear holding its float32 dequantized weight;
2. ``initialize_module_for_quantization`` attaches the module's QuantizationScheme (QuantizationArgs: int,
   symmetric, num_bits, group strategy with group_size, or channel strategy per channel) and registers
   ``weight_scale``, which gets slimlm's scales;
3. ``ModelCompressor.from_pretrained_model(model, "pack-quantized")`` derives the QuantizationConfig from the
   attached schemes (config groups, and the ignore list: the Linears left dense, such as the LM head; embeddings
   and norms are no Linears, which the library's groups never target, so it lists none of them), and
   ``compress_model`` quantizes each weight with its scale and packs the codes into int32 ``weight_packed``;
4. ``ModelCompressor.update_config`` writes the ``quantization_config`` section, which goes into config.json
   through slimlm.models.save_model (atomic: the folder appears complete or not at all).

The mapping is exact. slimlm's symmetric grid reads W = Δ·(q − 2^(b−1)) with unsigned codes q; compressed-tensors'
symmetric int scheme reads W = Δ·k with signed k in [−2^(b−1), 2^(b−1) − 1] and zero point 0, so
k = q − 2^(b−1) with the same float16 Δ: 4-bit codes 0..15 are −8..7, 8-bit (Q8_0) codes 1..255 are −127..127. The
compressor re-derives k from the weight: it is handed W = Δ·k in float32, which holds it exactly (an 11-bit Δ times
an integer of at most 8 bits), and divides by the same Δ, so the quotient is k itself; `_check_codes` still
compares the packed codes with slimlm's after compression.

A 4-bit Δ is negative where ggml's Q4_0 rule put a group's positive extreme on code 0 (quantize/grid.py). The
scale is kept negative: compressed-tensors applies scales as plain factors (x / Δ to quantize, k·Δ to
dequantize; neither checks a sign), transformers decompresses them exactly, and serving kernels multiply by the
scale as well. Flipping the sign instead is not exact: the extreme's k = −8 would become +8, outside int4's [−8, 7].

Scales are written in float32 for a float32 export and in float16 otherwise: both hold slimlm's float16 Δ exactly;
loaders cast them to the dtype they compute in. Refused, with one line naming the module and the nearest exportable
setting (or, with ``dequantize=True``, written dense and listed in the summary): asymmetric grids, which the
library packs but transformers cannot load (`ASYMMETRIC`); 2, 3, 5, 6 and 7 bits, which the library packs but
vLLM's WNA16 does not serve; W8A8, codebook, low-rank and EoRA modules, which have no pack-quantized form.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import compressed_tensors
import torch
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    initialize_module_for_quantization,
)
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.export.ggml_blocks import NotExact, describe_grid
from slimlm.export.hf import FolderExport, dense_dtype, dense_linear, dtype_name, folder_bytes, plain_copy
from slimlm.models import save_model
from slimlm.quantize.grid import QuantGrid
from slimlm.storage import stored_modules

FORMAT = CompressionFormat.pack_quantized.value
SERVED_BITS = (4, 8)  # vLLM's compressed-tensors WNA16 schemes: int4 and int8 weights
_DEQUANTIZE_HINT = "or pass dequantize=True to write it dense"
ASYMMETRIC = (
    f"transformers {transformers.__version__} cannot load asymmetric pack-quantized weights of "
    f"compressed-tensors {compressed_tensors.__version__} (the model it builds for loading expects the zero "
    "points unpacked; the compressor writes them packed)"
)


def export_compressed_tensors(
    model: nn.Module, tokenizer, folder: str | Path, dtype: str = "bfloat16", dequantize: bool = False
) -> FolderExport:
    """Write `model` and `tokenizer` to `folder` as a compressed-tensors pack-quantized checkpoint (module
    docstring), atomically.

    dtype: of the dense tensors (embeddings, norms, the LM head, modules written dense): "bfloat16" (default),
    "float16", "float32" or "auto" (the model's own). dequantize: write modules with no exact pack-quantized form
    dense instead of refusing.
    """
    target = dense_dtype(model, dtype)
    grids, dequantized = _plan(model, dequantize)
    if not grids:
        raise SlimlmError(
            "compressed-tensors export: no packed module on an exportable grid (symmetric, 4 or 8 "
            "bits); quantize with method: rtn, gptq or awq, or export with --format hf"
        )
    plain, _, untied = plain_copy(model, target)
    # float16 holds slimlm's scales exactly; float32 too, and a float32 export then decompresses exactly
    compressor = _compress(plain, model, grids, torch.float32 if target == torch.float32 else torch.float16)
    plain.config.quantization_config = _config_section(compressor)
    save_model(plain, tokenizer, folder)
    quantized = {name: _describe(grid) for name, grid in grids.items()}
    size = folder_bytes(Path(folder))
    return FolderExport(Path(folder), "compressed-tensors", dtype_name(target), size, dequantized, quantized, untied)


# --- which module goes how ---------------------------------------------------------------------------------------


def _plan(model: nn.Module, dequantize: bool) -> tuple[dict[str, QuantGrid], dict[str, str]]:
    """{module name: its grid} of the modules written quantized (every name a tied module serves) and
    {module name: what it is} of those written dense; refusals raise here, before anything is copied."""
    aliases: dict[int, list[str]] = {}  # a module shared by a cross-layer tie is written under each of its names
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    grids, dequantized, inside = {}, {}, ()
    for name, module in stored_modules(model):
        if name.startswith(inside):
            continue  # inside a wrapper written whole (an EoRA base)
        inside += tuple(alias + "." for alias in aliases[id(module)])
        try:
            grid = _exportable_grid(module)
        except NotExact as err:
            if not dequantize:
                raise SlimlmError(f"{name}: {err.why}, {_DEQUANTIZE_HINT}") from None
            dequantized.update(dict.fromkeys(aliases[id(module)], err.what))
            continue
        grids.update(dict.fromkeys(aliases[id(module)], grid))
    return grids, dequantized


def _packed_grid(module) -> QuantGrid:
    grid = module.grid
    what = describe_grid(grid.bits, grid.sym, grid.group_size)
    if grid.bits not in SERVED_BITS:
        nearest = 4 if grid.bits < 4 else 8
        raise NotExact(
            what,
            f"{what} has no servable pack-quantized form (vLLM's WNA16 takes 4 or 8 bits); "
            f"quantize with bits: {nearest}",
        )
    if not grid.sym:
        raise NotExact(what, f"{what} is not exported: {ASYMMETRIC}; quantize with sym: true")
    return grid


def _refused(what: Callable[[nn.Module], str], why: str) -> Callable:
    """A KINDS entry of a kind with no pack-quantized form: NotExact naming it, `why` formatted with {what}."""

    def refuse(module):
        name = what(module)
        raise NotExact(name, why.format(what=name))

    return refuse


# storage kind -> the grid its weight is exported on, or NotExact with the nearest exportable setting
KINDS: dict[str, Callable] = {
    "packed": _packed_grid,
    "w8a8": _refused(
        lambda m: "W8A8 (int8 weights per channel, int8 activations per token)",
        "{what} is not exported (its activation rounding would be the serving kernel's, not slimlm's); "
        "quantize with method: rtn, bits: 8, group_size: null (int8 weights, exported exactly)",
    ),
    "codebook": _refused(
        lambda m: f"{m.bits}-bit k-means codebook",
        "{what} has no pack-quantized form (the format holds integer grids); quantize with method: rtn, bits: 4",
    ),
    "lowrank": _refused(
        lambda m: f"low-rank B·A (rank {m.rank})",
        "{what} has no pack-quantized form (one quantized matrix per projection)",
    ),
    "eora": _refused(
        lambda m: f"EoRA-corrected weight (rank {m.rank})",
        "{what} has no pack-quantized form (the float16 correction B·A sits beside the base weight)",
    ),
}


def _exportable_grid(module) -> QuantGrid:
    unknown = _refused(lambda m: f"storage kind {m.kind!r}", "{what} has no compressed-tensors exporter")
    return KINDS.get(module.kind, unknown)(module)


def _describe(grid: QuantGrid) -> str:
    return describe_grid(grid.bits, grid.sym, grid.group_size)


# --- the library's compression -----------------------------------------------------------------------------------


def _schemes(grids: dict[str, QuantGrid]) -> dict[QuantGrid, QuantizationScheme]:
    """One scheme per distinct grid. One grid targets every Linear (what llm-compressor writes; the library's
    ignore list then names the dense ones); several name their modules, since a loader applies one scheme per
    target and ["Linear"] twice would put the last grid on every module."""
    names: dict[QuantGrid, list[str]] = {}
    for name, grid in grids.items():
        names.setdefault(grid, []).append(name)
    return {
        grid: QuantizationScheme(targets=["Linear"] if len(names) == 1 else members, weights=_args(grid), format=FORMAT)
        for grid, members in names.items()
    }


def _args(grid: QuantGrid) -> QuantizationArgs:
    """compressed-tensors' symmetric int arguments of a slimlm symmetric grid: group or channel strategy."""
    strategy = QuantizationStrategy.CHANNEL if grid.group_size is None else QuantizationStrategy.GROUP
    return QuantizationArgs(
        num_bits=grid.bits, type="int", symmetric=True, strategy=strategy, group_size=grid.group_size
    )


def _compress(plain: nn.Module, model: nn.Module, grids: dict[str, QuantGrid], scale_dtype) -> ModelCompressor:
    """Attach each module's scheme and scales, let the library derive its config and pack the codes; the
    compressor, which holds that config."""
    schemes = _schemes(grids)
    for name, grid in grids.items():
        _quantize_module(plain, name, model.get_submodule(name), schemes[grid])
    compressor = ModelCompressor.from_pretrained_model(plain, quantization_format=FORMAT)
    compressor.compress_model(plain)
    for name in grids:
        _check_codes(plain.get_submodule(name), model.get_submodule(name), name)
        _set_scale_dtype(plain.get_submodule(name), scale_dtype)
    return compressor


@torch.no_grad()
def _quantize_module(plain: nn.Module, name: str, packed, scheme: QuantizationScheme) -> None:
    """Give the plain copy's Linear `name` slimlm's float32 dequantized weight and scales, and its scheme."""
    quantized = packed.quantized_weight()
    linear = dense_linear(packed, torch.float32)
    linear.bias = plain.get_submodule(name).bias  # already in the export's dtype
    initialize_module_for_quantization(linear, scheme)
    linear.weight_scale.copy_(quantized.scale.reshape(linear.weight_scale.shape))  # channel strategy: [out, 1]
    plain.set_submodule(name, linear)


def _check_codes(compressed: nn.Module, packed, name: str) -> None:
    """The codes the library packed are slimlm's, shifted to signed (module docstring: exact by construction)."""
    quantized = packed.quantized_weight()
    expected = quantized.codes.to(torch.int16) - quantized.grid.mid_code
    found = unpack_from_int32(compressed.weight_packed, quantized.grid.bits, compressed.weight_shape.tolist())
    if not torch.equal(found.to(torch.int16), expected):
        raise SlimlmError(
            f"{name}: compressed-tensors packed other codes than slimlm's; this version of the library "
            "is not supported by the exporter"
        )


def _set_scale_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    module.weight_scale = nn.Parameter(module.weight_scale.detach().to(dtype), requires_grad=False)


def _config_section(compressor: ModelCompressor) -> dict:
    """The quantization_config section exactly as the library writes it into a folder's config.json."""
    with tempfile.TemporaryDirectory() as scratch:
        compressor.update_config(scratch)  # reads config.json there if any: an empty folder gives the section alone
        return json.loads(Path(scratch, "config.json").read_text())["quantization_config"]
