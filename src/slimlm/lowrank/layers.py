"""The two modules the `lowrank` stage puts in place of a decoder Linear, and the dense weight any of them applies.

- `LowRankLinear`: W ≈ B·A replaces the weight (SVD truncation): two nn.Linear, ``a`` [rank, in] without bias and
  ``b`` [out, rank] carrying the original bias. Fewer parameters and FLOPs only when rank·(in + out) < in·out.
- `CompensatedLinear`: a compressed module kept as it is (``base``: a fake-quantized or pruned nn.Linear, a packed
  quantized Linear, ...) plus a rank-r correction B·A of its compression error (EoRA, Liu et al. 2024), stored as two
  float16 parameters ``a`` [rank, in] and ``b`` [out, rank] and applied beside the base: y = base(x) + B(Ax).

Neither subclasses nn.Linear on purpose: code that edits Linear weights in place (pruning, quantization) must not
mistake two factors, or a weight with a correction beside it, for a dense matrix it may overwrite.

Both expose ``dequantize_weight()`` (the dense [out, in] weight they apply), the protocol `effective_weight` reads
for every compressed module, so a compensation can be stacked on any of them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from slimlm.storage import StoredModule, empty_module_args

# EoRA factors are stored in float16 beside the compressed weight, as in the paper and GPTQModel's EoRA adapters.
FACTOR_DTYPE = torch.float16


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight [out, in] a Linear-like module applies: ``weight`` of an nn.Linear, else what its
    ``dequantize_weight()`` returns (packed quantized Linears, LowRankLinear, CompensatedLinear)."""
    if isinstance(module, nn.Linear):
        return module.weight
    dequantize = getattr(module, "dequantize_weight", None)
    if dequantize is None:
        raise TypeError(f"{type(module).__name__} is neither an nn.Linear nor has dequantize_weight()")
    return dequantize()


class LowRankLinear(StoredModule, kind="lowrank"):
    """y = B(Ax) + bias with A = ``a.weight`` [rank, in] and B = ``b.weight`` [out, rank]."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    @torch.no_grad()
    def from_factors(
        cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> LowRankLinear:
        """A module holding these factors (and bias), cast to `dtype`."""
        module = cls(a.shape[1], b.shape[0], a.shape[0], bias is not None, device=a.device, dtype=dtype)
        module.a.weight.copy_(a)
        module.b.weight.copy_(b)
        if bias is not None:
            module.b.bias.copy_(bias)
        return module

    def storage_entry(self) -> dict:
        return {
            "rank": self.rank,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.b.bias is not None,
        }

    @classmethod
    def from_entry(cls, entry: dict, current: nn.Module) -> LowRankLinear:
        shape = (entry["out_features"], entry["in_features"])
        if not isinstance(current, nn.Linear) or tuple(current.weight.shape) != shape:
            raise ValueError(f"expected a Linear with a {list(shape)} weight to factorize, found {current}")
        return cls(
            entry["in_features"], entry["out_features"], entry["rank"], entry["bias"], **empty_module_args(current)
        )

    def kernel_label(self) -> str:
        return "low-rank B·A (two dense F.linear)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def dequantize_weight(self) -> torch.Tensor:
        return self.b.weight @ self.a.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class CompensatedLinear(StoredModule, kind="eora"):
    """y = base(x) + (x Aᵀ) Bᵀ: a compressed module plus a low-rank correction of its error (EoRA).

    The factors are stored in float16 and cast to the activations' dtype in the forward pass.
    """

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.rank = a.shape[1], b.shape[0], a.shape[0]
        self.a = nn.Parameter(a.detach().to(FACTOR_DTYPE))
        self.b = nn.Parameter(b.detach().to(FACTOR_DTYPE))

    def storage_entry(self) -> dict:
        return {"rank": self.rank, "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_entry(cls, entry: dict, current: nn.Module) -> CompensatedLinear:
        """Zero factors of the right shapes around the module there (the entry of a packed base follows)."""
        device = empty_module_args(current)["device"]
        rank, in_features, out_features = entry["rank"], entry["in_features"], entry["out_features"]
        return cls(
            current, torch.zeros(rank, in_features, device=device), torch.zeros(out_features, rank, device=device)
        )

    def kernel_label(self) -> str:
        return "EoRA correction (two float16-factor F.linear beside the base)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype))

    def dequantize_weight(self) -> torch.Tensor:
        base = effective_weight(self.base)
        return (base.float() + self.b.float() @ self.a.float()).to(base.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
