"""Round-to-nearest (RTN): every target weight rounded onto the grid on its own, with no calibration data.

The baseline every calibrated method is measured against; with symmetric 4-bit (8-bit) groups of 32 it is exactly
what llama.cpp's Q4_0 (Q8_0) conversion does (grid.py).
"""

from __future__ import annotations

import torch

from slimlm.quantize.grid import quantize_codes
from slimlm.quantize.stage import QuantizeOptions, register_quant_method, store_quantized, target_linears


@register_quant_method("rtn")
@torch.no_grad()
def rtn_quantize(model, options: QuantizeOptions, context) -> None:
    """Each target Linear's weight rounded to its nearest grid point."""
    for name, linear in target_linears(model, options):
        store_quantized(linear, quantize_codes(linear.weight, options.grid(name)))
