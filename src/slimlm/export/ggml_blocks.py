"""slimlm's packed grids as llama.cpp's legacy block types, code for code: which grid is which type, the bytes of
its blocks, and, for a grid no block type holds exactly, why not and the nearest setting that is exportable.

Every legacy type holds 32 consecutive weights of a row per block (ggml-common.h), little-endian:

- Q8_0 ``{fp16 d; int8 qs[32]}``: value d·qs; qs = code − 128 (slimlm's 8-bit symmetric zero point).
- Q4_0 ``{fp16 d; uint8 qs[16]}``: value d·(q − 8); weight j of the block in the low nibble of byte j, weight
  j + 16 in its high nibble (quantize_row_q4_0_ref).
- Q5_0 ``{fp16 d; uint32 qh; uint8 qs[16]}``: value d·(q − 16); the low four bits as Q4_0, bit 4 of weight j in
  bit j of qh (quantize_row_q5_0_ref).
- Q4_1 ``{fp16 d; fp16 m; uint8 qs[16]}`` and Q5_1 ``{fp16 d; fp16 m; uint32 qh; uint8 qs[16]}``: value d·q + m.

slimlm's symmetric grid is ggml's rule (quantize/grid.py), so codes and the fp16 scale are the block's as they are.
Its asymmetric grid reads Δ·(q − z) with an integer zero point, which is Q4_1/Q5_1 with d = Δ and m = −Δ·z, but
ggml stores m as fp16: Δ·z is exact in float32 (an 11-bit mantissa times a code of ≤ 5 bits) and fp16 holds it
only when its low bits are zero. Where it does not, the block would read back other values; `minimum_blocks`
refuses then, rather than re-round. Where it does, d·q + m = Δ·(q − z) exactly (both sides are an exact float32).

`KINDS` maps each storage kind (slimlm.storage) to how its weight becomes blocks: packed modules by their grid;
W8A8, codebook, low-rank and EoRA modules have no GGUF form and raise `NotExact` with the nearest exportable
setting, which gguf.py turns into a refusal line or, with dequantize=True, a dense tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

BLOCK = 32  # weights per block of every legacy type
# (bits, symmetric) of a slimlm grid with groups of 32 -> the block type holding it code for code
GRID_TYPES = {
    (8, True): GGMLQuantizationType.Q8_0,
    (4, True): GGMLQuantizationType.Q4_0,
    (5, True): GGMLQuantizationType.Q5_0,
    (4, False): GGMLQuantizationType.Q4_1,
    (5, False): GGMLQuantizationType.Q5_1,
}
TYPE_NAMES = {qtype.name.lower(): qtype for qtype in GRID_TYPES.values()}
_WITH_MINIMUM = (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_1)
_FIVE_BIT = (GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1)


def describe_grid(bits: int, sym: bool, group_size: int | None) -> str:
    """'4-bit group 64', '5-bit asymmetric per channel': how refusal lines name a grid."""
    groups = "per channel" if group_size is None else f"group {group_size}"
    return f"{bits}-bit {'' if sym else 'asymmetric '}{groups}"


def grid_type(bits: int, sym: bool, width: int) -> GGMLQuantizationType | None:
    """The block type of a grid whose groups are `width` columns wide (a per-channel grid of a 32-column matrix
    is a group-32 grid), or None."""
    return GRID_TYPES.get((bits, sym)) if width == BLOCK else None


def nearest_setting(bits: int, sym: bool, width: int) -> str:
    """The quantize options nearest this grid that export code for code, e.g. 'group_size: 32 (Q4_0)'."""
    if (bits, sym) in GRID_TYPES:
        to_bits, to_sym = bits, sym
    else:  # 2/3 bits go up to 4; 6/7 bits (and asymmetric 8, which no block type holds) to symmetric 8
        to_bits, to_sym = (4, sym) if bits < 4 else (8, True)
    changes = [f"bits: {to_bits}"] * (to_bits != bits) + ["sym: true"] * (to_sym != sym)
    changes += [f"group_size: {BLOCK}"] * (width != BLOCK)
    return f"{', '.join(changes)} ({GRID_TYPES[(to_bits, to_sym)].name})"


def minimum_blocks(scale: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, int]:
    """Q4_1/Q5_1's fp16 minimum m = −Δ·z of each group, and how many groups fp16 cannot hold exactly."""
    exact = -(scale.astype(np.float32) * zero.astype(np.float32))  # exact in float32: see the module docstring
    with np.errstate(over="ignore"):  # a minimum past fp16's range becomes inf: counted as inexact below
        minimum = exact.astype(np.float16)
    return minimum, int((minimum.astype(np.float32) != exact).sum())


def block_bytes(
    codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray | None, qtype: GGMLQuantizationType
) -> np.ndarray:
    """The blocks of a matrix as uint8 [rows, groups · type size]: codes uint8 [rows, in] (slimlm's unsigned
    codes), scale float16 [rows, in / 32], minimum float16 [rows, in / 32] for Q4_1/Q5_1 (else None)."""
    rows = codes.shape[0]
    blocks = codes.reshape(rows, -1, BLOCK)
    fields = [_fp16(scale)]
    if qtype in _WITH_MINIMUM:
        fields.append(_fp16(minimum))
    if qtype == GGMLQuantizationType.Q8_0:
        fields.append((blocks.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if qtype in _FIVE_BIT:
            fields.append(_high_bits(blocks))
        fields.append(_nibbles(blocks & 0x0F))
    packed = np.concatenate(fields, axis=-1)
    assert packed.shape[-1] == GGML_QUANT_SIZES[qtype][1], (qtype, packed.shape)
    return np.ascontiguousarray(packed.reshape(rows, -1))


def _fp16(values: np.ndarray) -> np.ndarray:
    """float16 [rows, groups] -> its little-endian bytes [rows, groups, 2]."""
    return np.ascontiguousarray(values.astype("<f2")).view(np.uint8).reshape(*values.shape, 2)


def _nibbles(low: np.ndarray) -> np.ndarray:
    """Values 0..15 [..., 32] -> [..., 16] bytes: weight j in the low nibble of byte j, weight j + 16 in its high."""
    return (low[..., : BLOCK // 2] | (low[..., BLOCK // 2 :] << 4)).astype(np.uint8)


def _high_bits(blocks: np.ndarray) -> np.ndarray:
    """Bit 4 of each of a block's 32 codes as the little-endian uint32 qh (bit j: weight j) -> [..., 4] bytes."""
    bits = ((blocks >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
    qh = bits.sum(axis=-1, dtype=np.uint32)  # distinct bits: the sum is their or
    return np.ascontiguousarray(qh.astype("<u4")).view(np.uint8).reshape(*qh.shape, 4)


# --- storage kinds -> block types ------------------------------------------------------------------------------


class NotExact(Exception):
    """A module whose stored format no GGUF type holds exactly: `what` it is, and `why` (one clause)."""

    def __init__(self, what: str, why: str):
        super().__init__(why)
        self.what, self.why = what, why


def packed_weight(module, wanted: GGMLQuantizationType | None) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The blocks of a packed module whose grid is exactly a block type (and `wanted`, when given)."""
    quantized = module.quantized_weight()
    grid = quantized.grid
    what = describe_grid(grid.bits, grid.sym, grid.group_size)
    width = grid.group_width(module.in_features)
    qtype = grid_type(grid.bits, grid.sym, width)
    if qtype is None:
        nearest = nearest_setting(grid.bits, grid.sym, width)
        raise NotExact(what, f"{what} has no GGUF block type; quantize with {nearest}")
    if wanted is not None and qtype != wanted:
        raise NotExact(
            what,
            f"{what} is {qtype.name}, not the requested {wanted.name} (re-quantizing would "
            "change its values); export with type='auto'",
        )
    scale, minimum = quantized.scale.cpu().numpy(), None
    if not grid.sym:
        minimum, inexact = minimum_blocks(scale, quantized.zero.cpu().numpy())
        if inexact:
            symmetric = grid_type(grid.bits, True, width).name
            raise NotExact(
                what,
                f"{what} is not {qtype.name} exactly: {qtype.name} stores each group's minimum "
                f"−Δ·z as float16, which cannot hold it in {inexact} of {minimum.size} groups; "
                f"quantize with sym: true ({symmetric})",
            )
    return block_bytes(quantized.codes.cpu().numpy(), scale, minimum, qtype), qtype


def w8a8_weight(module, wanted):
    what = "W8A8 (int8 weights per channel, int8 activations per token)"
    raise NotExact(what, f"{what} has no GGUF block type; quantize with method: rtn, bits: 8, group_size: 32 (Q8_0)")


def codebook_weight(module, wanted):
    what = f"{module.bits}-bit k-means codebook"
    nearest = nearest_setting(module.bits, True, 0)
    raise NotExact(what, f"{what} has no GGUF block type; quantize with method: rtn, {nearest}")


def lowrank_weight(module, wanted):
    what = f"low-rank B·A (rank {module.rank})"
    raise NotExact(what, f"{what} has no GGUF form (llama.cpp's llama graph reads one matrix per projection)")


def eora_weight(module, wanted):
    what = f"EoRA-corrected weight (rank {module.rank})"
    raise NotExact(
        what,
        f"{what} has no GGUF form (the float16 correction B·A sits beside the base weight; "
        "llama.cpp reads one matrix per projection)",
    )


@dataclass(frozen=True)
class Kind:
    weight: Callable  # (module, wanted type) -> (block bytes, block type); raises NotExact
    bias: Callable  # module -> its bias tensor or None, wherever the kind keeps it


KINDS = {
    "packed": Kind(packed_weight, lambda m: m.bias),
    "w8a8": Kind(w8a8_weight, lambda m: m.bias),
    "codebook": Kind(codebook_weight, lambda m: m.bias),
    "lowrank": Kind(lowrank_weight, lambda m: m.b.bias),
    "eora": Kind(eora_weight, lambda m: module_bias(m.base)),  # the base (packed or plain Linear) adds it
}


def _unknown_weight(module, wanted):
    raise NotExact(f"storage kind {module.kind!r}", f"storage kind {module.kind!r} has no GGUF exporter")


def kind_of(module: nn.Module) -> Kind:
    """The export rules of a StoredModule's kind; a kind this table lacks is refused (or dequantized)."""
    return KINDS.get(module.kind, Kind(_unknown_weight, lambda m: getattr(m, "bias", None)))


def module_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a Linear-like module adds: a StoredModule's where its kind keeps it, a plain Linear's own."""
    return kind_of(module).bias(module) if hasattr(module, "kind") else getattr(module, "bias", None)
