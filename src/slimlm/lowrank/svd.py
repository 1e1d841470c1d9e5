"""Truncated SVD: every target Linear W [out, in] becomes B·A (`LowRankLinear`), the best rank-r approximation of W
in Frobenius norm (Eckart–Young–Mirsky). Data-free: the error it minimises is the weights', not the outputs'.

It pays only when rank·(in + out) < in·out, i.e. r < in·out/(in + out): below about half of min(in, out) for square
matrices. The stage notes say which matrices were not made smaller.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.lowrank.factorize import singular_values, svd_factors
from slimlm.lowrank.layers import LowRankLinear
from slimlm.lowrank.stage import (
    LowRankOptions,
    check_finite,
    checked_rank,
    rank_summary,
    register_lowrank_method,
    target_modules,
)
from slimlm.streaming import require_materialized


@register_lowrank_method("svd")
@torch.no_grad()
def svd_truncate(model, options: LowRankOptions, context) -> None:
    """Replace every target Linear by the two factors of its truncated SVD."""
    require_materialized(model, "lowrank svd")
    targets = list(target_modules(model, options))
    for name, _, _, module in targets:  # every check before the first module is replaced
        _check_factorizable(name, module, options)
    replaced = [_factorize(name, layer, short, module, options) for name, layer, short, module in targets]
    context.notes.extend(_notes(replaced, options))


def _check_factorizable(name: str, module: nn.Module, options: LowRankOptions) -> None:
    if type(module) is not nn.Linear:
        raise SlimlmError(
            f"lowrank (svd): {name} is a {type(module).__name__}, not a dense nn.Linear; run the svd "
            "stage before stages that replace Linears (packed quantization, EoRA, svd)"
        )
    check_finite(name, options, "the weights", module.weight)
    if options.energy is None:
        checked_rank(name, module.weight.shape, options)


def _factorize(name: str, layer: nn.Module, short: str, module: nn.Linear, options: LowRankOptions) -> dict:
    """Swap one Linear for its factors; returns what the notes need."""
    weight = module.weight
    values = singular_values(weight) if options.energy is not None else None
    rank = checked_rank(name, weight.shape, options, values)
    a, b = svd_factors(weight, rank)
    factors = LowRankLinear.from_factors(a, b, module.bias, weight.dtype)
    check_finite(name, options, "the factors", factors.a.weight, factors.b.weight)
    error = torch.linalg.matrix_norm(weight.double() - factors.dequantize_weight().double())
    layer.set_submodule(short, factors)
    out_features, in_features = weight.shape
    return {
        "name": name,
        "rank": rank,
        "dense": out_features * in_features,
        "factors": rank * (out_features + in_features),
        "relative_error": float(error / torch.linalg.matrix_norm(weight.double()).clamp(min=1e-30)),
    }


def _notes(replaced: list[dict], options: LowRankOptions) -> list[str]:
    dense, factors = sum(r["dense"] for r in replaced), sum(r["factors"] for r in replaced)
    mean_error = sum(r["relative_error"] for r in replaced) / len(replaced)
    notes = [
        f"lowrank: truncated SVD ({rank_summary(options, [r['rank'] for r in replaced])}) of {len(replaced)} decoder "
        f"Linears ({', '.join(options.targets or sorted({r['name'].rsplit('.', 1)[-1] for r in replaced}))}), each "
        f"stored as two factors B·A: their weights {dense:,} → {factors:,} parameters ({factors / dense:.1%}); "
        f"mean relative weight error ‖W − BA‖_F/‖W‖_F {mean_error:.4f}"
    ]
    larger = [r["name"] for r in replaced if r["factors"] >= r["dense"]]
    if larger:
        shown = ", ".join(larger[:3]) + (f" and {len(larger) - 3} more" if len(larger) > 3 else "")
        notes.append(
            f"lowrank: {len(larger)} of {len(replaced)} factorized Linears are not smaller, rank·(in + out) ≥ "
            f"in·out ({shown}): they take more parameters and FLOPs than the dense weight"
        )
    return notes
