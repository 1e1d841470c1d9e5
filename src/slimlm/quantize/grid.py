"""The quantization grid every method shares (RTN, GPTQ, AWQ, QAT, packed storage): b-bit integer codes with one
scale and zero point per group of consecutive input columns of a weight matrix.

A value v of a group with scale Δ and zero point z is stored as the code q = clamp(round(v/Δ) + z, 0, 2^b − 1)
and read back as Δ·(q − z). Codes are unsigned (0..2^b − 1) whatever the grid; scales are stored as float16.

Symmetric grids are ggml's legacy block types exactly (ggml-quants.c, quantize_row_q4_0_ref and
quantize_row_q8_0_ref), so that 4-bit and 8-bit with group size 32 are Q4_0 and Q8_0, code for code and scale for
scale (tests/quantize/test_grid.py checks this against a transcription of the C code):

- b < 8 (Q4_0; Q5_0 at 5 bits): Δ = m / −2^(b−1), m the group's value of largest magnitude (signed; the first one
  on ties), z = 2^(b−1). The extreme value lands exactly on the extra level −2^(b−1) of the signed range
  [−2^(b−1), 2^(b−1) − 1]; Δ is negative when m is positive, which is how that extra level serves whichever side
  holds the extreme. Codes are ⌊v·(1/Δ) + z + ½⌋ in float32, as ggml's ``(int8_t)(x*id + 8.5f)``.
- b = 8 (Q8_0): Δ = max|v| / 127, z = 128, codes roundf(v·(1/Δ)) + 128 (half away from zero): 1..255.

As in ggml, codes are computed with the float32 Δ and Δ is then stored rounded to float16; values are read back
with the stored float16 scale. (Rounding Δ first would change some codes against llama.cpp's.) Re-quantizing a
dequantized value with the stored scale gives back its code, so the grid a weight lies on is the stored one.

Asymmetric grids follow GPTQ's quant.py (IST-DASLab/gptq): Δ = (max − min) / (2^b − 1) with min ≤ 0 ≤ max, so 0 is
representable exactly, and z = round(−min/Δ) is an integer code; codes are ⌊v·(1/Δ) + z + ½⌋ as above (ties round
up where quant.py's torch.round rounds them to even). A group of zeros would get Δ = 0; it gets Δ = 1 instead
(codes z, values 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# where a fake-quantized Linear keeps its codes beside the dequantized weight (a QuantizedWeight)
QUANTIZED_ATTRIBUTE = "slimlm_quantized"


@dataclass(frozen=True)
class QuantGrid:
    """b-bit codes; symmetric (ggml Q4_0/Q8_0 style) or asymmetric (zero point); one scale per `group_size`
    consecutive input columns of each output row, or per output row (channel) when `group_size` is None."""

    bits: int = 4
    sym: bool = True
    group_size: int | None = None

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(
                f"group size must be a positive number of columns or None (per channel), got {self.group_size}"
            )

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    @property
    def mid_code(self) -> int:
        """The zero point of symmetric grids: codes 0..2^b − 1 stand for −2^(b−1)..2^(b−1) − 1."""
        return 2 ** (self.bits - 1)

    def group_width(self, in_features: int) -> int:
        """Columns per group of a matrix with `in_features` columns; they must divide evenly."""
        width = in_features if self.group_size is None else self.group_size
        if in_features % width:
            raise ValueError(f"group size {width} does not divide the input dimension {in_features}")
        return width

    def group_view(self, weight: torch.Tensor) -> torch.Tensor:
        """The matrix [out, in] as [out, groups, width] (a view)."""
        width = self.group_width(weight.shape[1])
        return weight.view(weight.shape[0], weight.shape[1] // width, width)


@dataclass
class QuantizedWeight:
    """A weight matrix on its grid: codes uint8 [out, in] in 0..2^b − 1, scale float16 [out, groups], zero point uint8
    [out, groups] (2^(b−1) everywhere for symmetric grids). What packed storage will write."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    grid: QuantGrid

    def dequantize(self) -> torch.Tensor:
        """The float32 values Δ·(q − z)."""
        codes = self.grid.group_view(self.codes.float())
        return decode(codes, self.scale.unsqueeze(-1), self.zero.unsqueeze(-1)).reshape(self.codes.shape)


def grid_params(groups: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale Δ and zero point z of each group of values along the last dimension (float32; the scale is not yet
    rounded to float16: see the module docstring)."""
    groups = groups.float()
    if not grid.sym:
        low = groups.amin(dim=-1).clamp(max=0)
        high = groups.amax(dim=-1).clamp(min=0)
        scale = _nonzero((high - low) / grid.max_code)
        return scale, torch.round(-low / scale)
    if grid.bits == 8:  # Q8_0
        scale = groups.abs().amax(dim=-1) / (grid.mid_code - 1)
    else:  # Q4_0: the signed extreme on code 0; argmax takes the first of equal magnitudes, as ggml's strict '<'
        extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        scale = extreme / -grid.mid_code
    scale = _nonzero(scale)
    return scale, torch.full_like(scale, grid.mid_code)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """A group of zeros has Δ = 0; any scale reads its codes back as 0, so it gets 1 (no division by zero)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def encode(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Codes (float32 holding integers in 0..2^b − 1) of `values` for broadcastable scale and zero point."""
    return encode_scaled(values.float() * inverse_scale(scale), zero, grid)  # ggml's x*id, id = 1/d


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1/Δ in float32 (ggml's id), what `encode_scaled` expects its values multiplied by."""
    return 1.0 / _nonzero(scale.float())


def encode_scaled(scaled: torch.Tensor, zero: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """`encode` of values already multiplied by `inverse_scale` (solvers that round column by column reuse 1/Δ)."""
    if grid.sym and grid.bits == 8:
        rounded = _round_half_away(scaled) + zero
    else:
        rounded = torch.floor(scaled + (zero + 0.5))  # float32 add, then truncate: ggml's (int)(x*id + 8.5f)
    return rounded.clamp(0, grid.max_code)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Values Δ₁₆·(q − z) in float32, with the scale rounded to float16 as it is stored."""
    return scale.half().float() * (codes.float() - zero.float())


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C's roundf, exactly: v − trunc(v) is exact in float32, whereas ⌊|v| + ½⌋ can round up below a half."""
    whole = torch.trunc(values)
    return whole + torch.sign(values) * ((values - whole).abs() >= 0.5)


def quantize_codes(weight: torch.Tensor, grid: QuantGrid) -> QuantizedWeight:
    """Round-to-nearest of a matrix [out, in] onto the grid, each group with its own scale and zero point."""
    groups = grid.group_view(weight.detach().float())
    scale, zero = grid_params(groups, grid)
    codes = encode(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), grid)
    return QuantizedWeight(codes.reshape(weight.shape).to(torch.uint8), scale.half(), zero.to(torch.uint8), grid)


def fake_quantize(weight: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """The weight rounded onto the grid, as values in the weight's dtype (the "fake quantization" of QAT/eval)."""
    return quantize_codes(weight, grid).dequantize().to(weight.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: fake quantization; backward: the identity (Bengio et al. 2013's straight-through estimator). Scales
    and zero points are recomputed from the weight every step and get no gradient."""

    @staticmethod
    def forward(ctx, weight, grid):
        return fake_quantize(weight, grid)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize_ste(weight: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """fake_quantize with an identity gradient, for quantization-aware training."""
    return _StraightThrough.apply(weight, grid)
