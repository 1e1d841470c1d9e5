"""The LM head on a grid of its own (`quantize.lm_head`), rounded to nearest and packed like the decoder Linears.

At batch 1 a decode step reads every weight once, and in a small model the head is a large share of them:
SmolLM2-135M's 49152×576 head is 113 MB in float32 against 54 MB for its 210 W4 Linears together. llama.cpp's
Q4_0 file keeps it in Q8_0; `lm_head: {bits: 8}` stores it as 8-bit codes with one float16 scale per output
channel (28 MB), computed by torch's int8pack kernel inside the compiled decode step.

A head tied to the token embedding (SmolLM2) is untied first: the embedding keeps its dense weights (the lookup reads
one row per token, and rounding it would change every layer's input), the head gets its own quantized copy. The
saved folder then holds both, so it grows by the packed head, and config.json says ``tie_word_embeddings: false``.
Round-to-nearest only: the head is outside the decoder layers the calibration walk visits, and nothing after it
could absorb a compensating update.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quantize.grid import QUANTIZED_ATTRIBUTE, QuantGrid, quantize_codes
from slimlm.quantize.packed import QuantizedLinear
from slimlm.registry import StageOptions
from slimlm.streaming import layer_stream


class HeadOptions(StageOptions):
    """The LM head's grid: symmetric 8-bit per output channel unless told (module docstring)."""

    bits: int = Field(8, ge=2, le=8)
    group_size: PositiveInt | None = None  # input columns per scale; None: one scale per output channel
    sym: bool = True

    def grid(self) -> QuantGrid:
        return QuantGrid(self.bits, self.sym, self.group_size)


def check_head(model: nn.Module, options: HeadOptions) -> None:
    """Refuse, before any work, what quantize_head cannot do: a head that is not a dense Linear (already quantized,
    or another type), a group size that does not divide its input width, a layer-streamed model (its writer stores
    the tensors of the source checkpoint, and an untied head is not one of them)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise SlimlmError(
            f"quantize.lm_head: the LM head is a {type(head).__name__}, not a dense Linear (quantized already?); "
            "drop lm_head from this stage"
        )
    if options.group_size is not None and head.in_features % options.group_size:
        raise SlimlmError(
            f"quantize.lm_head.group_size: {options.group_size} does not divide the {head.in_features} input "
            "features of the LM head; use a divisor of it or null (one scale per output channel)"
        )
    if layer_stream(model) is not None:
        raise SlimlmError(
            "quantize.lm_head: not supported on a layer-streamed model (the streamed writer stores the source's "
            "tensors, not a new head); quantize the head of an in-memory model, or leave lm_head null"
        )


@torch.no_grad()
def quantize_head(model: nn.Module, options: HeadOptions, pack: bool) -> str:
    """Round the head onto `options`' grid, untied from the embedding (module docstring); packed, or fake-quantized
    (the codes beside the dequantized weight) when `pack` is false. Returns the stage note."""
    head = model.get_output_embeddings()
    tied = head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    quantized = quantize_codes(head.weight, options.grid())
    untied = nn.Linear(
        head.in_features, head.out_features, head.bias is not None, device=head.weight.device, dtype=head.weight.dtype
    )
    untied.weight.copy_(quantized.dequantize().to(untied.weight.dtype))
    if head.bias is not None:
        untied.bias.copy_(head.bias)
    setattr(untied, QUANTIZED_ATTRIBUTE, quantized)
    module = QuantizedLinear.from_linear(untied, quantized) if pack else untied
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(module)
    grid = options.grid()
    kind = "symmetric" if grid.sym else "asymmetric"
    granularity = "per output channel" if grid.group_size is None else f"group size {grid.group_size}"
    stored = f"packed ({module.kernel} kernel)" if pack else "fake-quantized (pack: false)"
    untying = (
        "untied from the token embedding, which stays dense (the folder now holds both: the embedding and the "
        "quantized head); "
        if tied
        else ""
    )
    return (
        f"quantize: LM head {head.out_features}×{head.in_features} rounded to nearest, {grid.bits}-bit {kind} "
        f"{granularity}, {untying}{stored}"
    )
