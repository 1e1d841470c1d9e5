"""`--target slimlm`: RTN grids per projection, as a recipe `slimlm compress` runs, scored by slimlm's evaluation.

The quantize stage restricts a stage by projection (`targets`) but not by layer, and a projection already packed
cannot be quantized again (recipe.check_chain), so what a recipe can say today is one format per projection
*kind* (q_proj, ..., down_proj) across all layers: one quantize stage per distinct format, each with its targets.
The items are those seven groups (their cost: every Linear of the kind changed at once); per-Linear formats need
a per-layer override in the quantize stage (see the closing report of issue 15).

Options: symmetric RTN grids of 2, 3, 4 and 8 bits with groups of 32, 64 and 128 columns (ggml's scale rule,
grid.py). Size: the folder's weight bytes (safetensors), the packed codes at their bit width plus a float16
scale per group, the rest (embedding, norms) in the recipe's dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimlm.auto.sensitivity import Item, Option
from slimlm.modules import SHORT_NAMES, named_decoder_linears
from slimlm.quantize.grid import QuantGrid, quantize_codes
from slimlm.quantize.packed import packed_columns

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
REFERENCE = "w4g64"
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_HEADER_PER_TENSOR = 112  # safetensors JSON header per tensor (name, dtype, shape, offsets): ~99-110 measured


def option_name(bits: int, group: int) -> str:
    return f"w{bits}g{group}"


def packed_bytes(rows: int, columns: int, bits: int, group: int) -> int:
    """A QuantizedLinear's buffers: codes bit-packed into uint8, one float16 scale per group (symmetric grid)."""
    return rows * packed_columns(columns, bits) + rows * (columns // group) * 2


class SlimlmTarget:
    name = "slimlm"

    def __init__(self, model, dtype: str = "bfloat16", exclude: list[str] = ()):
        self.model, self.dtype, self.exclude = model, dtype, set(exclude)
        self.linears = named_decoder_linears(model)

    def items(self) -> list[Item]:
        items = []
        for short, inside in SHORT_NAMES.items():
            members = [(name, linear) for name, linear in self.linears if name.endswith("." + inside)]
            options = [
                self._option(members, bits, group)
                for bits in BITS
                for group in GROUPS
                if all(linear.in_features % group == 0 for _, linear in members)
                and option_name(bits, group) not in self.exclude
            ]
            reference = [o.name for o in options].index(REFERENCE)
            items.append(Item(short, options, reference))
        return items

    def _option(self, members, bits: int, group: int) -> Option:
        grid = QuantGrid(bits, True, group)
        size = sum(packed_bytes(*linear.weight.shape, bits, group) for _, linear in members)

        def weights() -> dict[str, torch.Tensor]:
            return {name: quantize_codes(linear.weight, grid).dequantize() for name, linear in members}

        return Option(option_name(bits, group), size, weights)

    def fixed_bytes(self, items: list[Item]):
        """The folder's weight bytes besides the packed Linears: every other unique tensor in the recipe's dtype,
        norms included, plus the safetensors header (estimated per tensor)."""
        linear_weights = {id(linear.weight) for _, linear in self.linears}
        others = {id(p): p for p in self.model.parameters() if id(p) not in linear_weights}
        dense = sum(p.numel() for p in others.values()) * DTYPE_BYTES[self.dtype]
        tensors = len(others) + 2 * len(self.linears)  # qweight and scales per Linear
        return lambda removed: dense + tensors * _HEADER_PER_TENSOR

    def recipe(self, formats: dict[str, str], model: str, calibration: dict, evaluate: dict, output: Path) -> dict:
        """The recipe (as YAML data) that quantizes every projection kind to its format: one stage per format."""
        by_format: dict[str, list[str]] = {}
        for short, name in formats.items():
            by_format.setdefault(name, []).append(short)
        stages = []
        for name, targets in sorted(by_format.items()):
            bits, group = (int(x) for x in name[1:].split("g"))
            stages.append({"quantize": {"method": "rtn", "bits": bits, "group_size": group, "targets": targets}})
        return {
            "model": model,
            "dtype": self.dtype,
            "calibration": calibration,
            "evaluate": evaluate,
            "stages": stages,
            "output": str(output),
        }
