"""Codebook Linears: a k-means-shared weight (kmeans.py) stored as what it is, float16 codebooks plus b-bit indices.

Saved tensors: ``codebook`` float16 [codebooks, 2^b] (each serving out/codebooks consecutive rows), ``indices``
uint8 [out, packed_columns(in, b)] (the b-bit indices bit-packed along each row exactly as packed.py packs codes),
``bias`` when the Linear had one. The forward pass looks the weight up and multiplies in the activations' dtype
(kernel ``codebook lookup``): a smaller file, no speedup.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from slimlm.quantize.kmeans import CODEBOOK_ATTRIBUTE, SharedCodebook
from slimlm.quantize.packed import pack_codes, packed_columns, unpack_codes
from slimlm.storage import StoredModule, empty_module_args, replace_linears

CODEBOOK_DTYPE = torch.float16


class CodebookLinear(StoredModule, kind="codebook"):
    """y = x·codebook[indices]ᵀ + bias."""

    fixed_dtype_buffers = ("codebook",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        codebooks: int,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if out_features % codebooks:
            raise ValueError(f"{codebooks} codebooks do not divide {out_features} output rows")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("codebook", torch.zeros(codebooks, 2**bits, dtype=CODEBOOK_DTYPE, device=device))
        self.register_buffer(
            "indices", torch.zeros(out_features, packed_columns(in_features, bits), dtype=torch.uint8, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, shared: SharedCodebook) -> CodebookLinear:
        module = cls(
            linear.in_features,
            linear.out_features,
            shared.bits,
            shared.codebook.shape[0],
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        module.codebook.copy_(shared.codebook)
        module.indices.copy_(pack_codes(shared.indices, shared.bits))
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def shared_codebook(self) -> SharedCodebook:
        return SharedCodebook(self.codebook, unpack_codes(self.indices, self.bits, self.in_features), self.bits)

    def storage_entry(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "codebooks": self.codebook.shape[0],
            "bias": self.bias is not None,
        }

    @classmethod
    def from_entry(cls, entry: dict, current: nn.Module) -> CodebookLinear:
        return cls(
            entry["in_features"],
            entry["out_features"],
            entry["bits"],
            entry["codebooks"],
            entry["bias"],
            **empty_module_args(current),
        )

    def weights_in_buffers(self) -> int:
        return self.in_features * self.out_features

    def kernel_label(self) -> str:
        return "codebook lookup (F.linear on the looked-up weight)"

    def dequantize_weight(self) -> torch.Tensor:
        return self.shared_codebook().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"codebooks={self.codebook.shape[0]}"
        )


def pack_codebooks(model: nn.Module) -> int:
    """Replace every Linear carrying a k-means codebook (``slimlm_codebook``) by its CodebookLinear; how many."""
    carriers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and hasattr(module, CODEBOOK_ATTRIBUTE)
    ]
    return replace_linears(
        model, carriers, lambda linear: CodebookLinear.from_linear(linear, getattr(linear, CODEBOOK_ATTRIBUTE))
    )
