"""EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank
Approximation", arXiv:2410.21271): a rank-r correction of each compressed Linear's error, fitted to its inputs.

For a target whose current weight Ŵ (quantized and/or pruned; `effective_weight`) differs from the original W,
the error ΔW = W − Ŵ is approximated by B·A in the eigenspace of the calibration inputs' covariance XᵀX
(factorize.eora_factors), which minimises the output error ‖(ΔW − BA)Xᵀ‖ rather than the weight error. The factors
are stored in float16 beside the compressed module (`CompensatedLinear`), which is kept as it is.

The inputs are those of the compressed model, compensation included: the calibration walk (calibrate.walk_layers)
feeds each decoder layer the outputs of the already compensated layers before it, and within a layer the Linears
are compensated in GPTQ's true-sequential order, so o_proj sees the outputs of the compensated q/k/v, and so on.
With `attention_weighted_v`, v_proj's error is fitted one KV head at a time, each in the eigenspace of its own
attention-weighted covariance (slimlm/value_hessian.py, as GPTQ's and SparseGPT's v_proj Hessians).
The original's weights are read one layer at a time (streaming.read_tensors), so a layer-streamed model can be
compensated against a streamed original (streaming.streamed_reference) without either being whole in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.calibrate import InputStats, LayerInputs, run_layer, walk_layers
from slimlm.errors import SlimlmError
from slimlm.lowrank.factorize import eora_factors, output_error
from slimlm.lowrank.layers import CompensatedLinear, effective_weight
from slimlm.lowrank.stage import (
    LowRankTargets,
    check_finite,
    checked_rank,
    rank_summary,
    register_lowrank_method,
    target_modules,
)
from slimlm.modules import SEQUENTIAL_SETS, VALUE, decoder_layers, named_decoder_linears
from slimlm.streaming import read_tensors
from slimlm.value_hessian import value_hessians


class EoRAOptions(LowRankTargets):
    """eora's options: a rank or rank_ratio (no energy: the error it approximates is not a weight), and every
    projection by default (a compensation only adds a correction)."""

    # v_proj's rank split over its KV heads, each head's rows fitted to a covariance weighing every token by the
    # attention it receives; the factors stack into one pair of the same rank and size (measured in
    # benchmarks/value_weighting.py)
    attention_weighted_v: bool = False


@register_lowrank_method("eora", EoRAOptions, streams=True)
@torch.no_grad()
def eora_compensate(model, options: EoRAOptions, context) -> None:
    """Wrap every compressed target in a CompensatedLinear holding EoRA factors of its error."""
    original = _original_model(model, context)
    _check_targets(model, dict(named_decoder_linears(original)), options)
    targets = options.layer_targets()
    done: list[dict] = []
    untouched: list[str] = []

    def compensate_layer(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        for names in SEQUENTIAL_SETS:
            group = {name: layer.get_submodule(name) for name in names if name in targets}
            if not group:
                continue
            covariances = _input_covariances(layer, inputs, group)
            per_head = value_hessians(layer, inputs) if VALUE in group and options.attention_weighted_v else None
            # the original's weights of this layer only: a streamed original is read a layer at a time
            originals = read_tensors(original, [f"model.layers.{index}.{name}.weight" for name in group])
            for name, module in group.items():
                full = f"model.layers.{index}.{name}"
                fitted_to = per_head if name == VALUE and per_head is not None else [covariances[name]]
                result = _compensate(full, module, originals[full + ".weight"], covariances[name], fitted_to, options)
                if result is None:
                    untouched.append(full)
                    continue
                layer.set_submodule(name, result.pop("module"))
                done.append(result)

    walk_layers(model, context.calibration.windows(model, context.notes), compensate_layer, description="eora")
    context.notes.extend(_notes(done, untouched, options))


def _original_model(model: nn.Module, context) -> nn.Module:
    """The original model (in memory, or a streamed reference whose layers are read on demand); the compressed model
    must have the same layers."""
    if context.load_original is None:
        raise SlimlmError(
            "lowrank (eora): needs the original model to measure the compression error; none was given to the stage"
        )
    original = context.load_original()
    layers, original_layers = len(decoder_layers(model)), len(decoder_layers(original))
    if layers != original_layers:
        raise SlimlmError(
            f"lowrank (eora): the model has {layers} decoder layers, the original {original_layers}; "
            "EoRA matches Linears by layer, so it cannot follow depth pruning"
        )
    return original


def _check_targets(model: nn.Module, originals: dict[str, nn.Linear], options: EoRAOptions) -> None:
    """Every target has the original's shape and room for the rank: checked before the first module is wrapped (from
    the modules' widths, so a streamed model's meta placeholders are checked too)."""
    for name, _, _, module in target_modules(model, options):
        shape, original = torch.Size((module.out_features, module.in_features)), originals.get(name)
        if original is None or original.weight.shape != shape:
            found = "no such Linear" if original is None else f"a {list(original.weight.shape)} weight"
            raise SlimlmError(
                f"lowrank (eora): {name} has a {list(shape)} weight but the original has {found} "
                "(width-pruned?); EoRA compensates compression that keeps the original's shapes"
            )
        checked_rank(name, shape, options)


def _input_covariances(layer: nn.Module, inputs: LayerInputs, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """XᵀX/n of each module's inputs over one pass of the layer. Like calibrate.observe_layer, but for any Linear-like
    module (packed quantized, compensated), whose width and device come from its inputs rather than a `.weight`."""
    stats: dict[str, InputStats] = {}

    def hook(name: str):
        def record(_module, args, _output):
            x = args[0].detach()
            stats.setdefault(name, InputStats(x.shape[-1], x.device, hessian=True)).add(x)

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: stat.hessian() for name, stat in stats.items()}


def _compensate(
    name: str,
    module: nn.Module,
    original: torch.Tensor,
    covariance: torch.Tensor,
    fitted_to: list[torch.Tensor],
    options: EoRAOptions,
) -> dict | None:
    """The CompensatedLinear for one module (`original`: the original's weight) and what the notes need; None when
    it equals the original. The factors are fitted to `fitted_to`, one covariance per equal block of rows (v_proj's
    KV heads when attention-weighted, else [covariance]); the notes' errors are measured on the plain `covariance`."""
    compressed = effective_weight(module).detach().float()
    delta = original.detach().to(compressed.device, torch.float32) - compressed
    check_finite(name, options, "the compression error (original − compressed weights)", delta)
    if not delta.any():
        return None
    check_finite(name, options, "the calibration inputs", covariance, *fitted_to)
    rank = checked_rank(name, delta.shape, options)
    wrapped = CompensatedLinear(module, *_row_block_factors(delta, fitted_to, rank))
    check_finite(name, options, "the factors", wrapped.a, wrapped.b)  # after the float16 cast: it may overflow
    residual = delta.double() - wrapped.b.double() @ wrapped.a.double()
    return {
        "module": wrapped,
        "name": name,
        "rank": rank,
        "dense": delta.numel(),
        "factors": wrapped.a.numel() + wrapped.b.numel(),
        "error_before": output_error(delta, covariance),
        "error_after": output_error(residual, covariance),
    }


def _row_block_factors(
    delta: torch.Tensor, covariances: list[torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA's A and B for `delta` split into equal blocks of rows, each fitted in the eigenspace of its own covariance
    with a share of `rank`; stacked into one pair (B block-diagonal), the size of a single rank-`rank` pair."""
    if len(covariances) == 1:
        return eora_factors(delta, covariances[0], rank)
    blocks = delta.split(delta.shape[0] // len(covariances))
    shares = [rank // len(blocks) + (index < rank % len(blocks)) for index in range(len(blocks))]
    a, b = (
        delta.new_zeros(rank, delta.shape[1], dtype=torch.float64),
        delta.new_zeros(*delta.shape[:1], rank, dtype=torch.float64),
    )
    row, column = 0, 0
    for block, covariance, share in zip(blocks, covariances, shares, strict=True):
        if share:
            block_a, block_b = eora_factors(block, covariance, share)
            a[column : column + share] = block_a
            b[row : row + block.shape[0], column : column + share] = block_b
        row, column = row + block.shape[0], column + share
    return a, b


def _notes(done: list[dict], untouched: list[str], options: EoRAOptions) -> list[str]:
    notes = []
    if done:
        dense, factors = sum(r["dense"] for r in done), sum(r["factors"] for r in done)
        kept = sum(r["error_after"] for r in done) / max(sum(r["error_before"] for r in done), 1e-300)
        notes.append(
            f"lowrank: EoRA ({rank_summary(options, [r['rank'] for r in done])}) compensates the "
            f"compression error of {len(done)} decoder Linears in the eigenspace of their calibration inputs; "
            f"float16 factors add {factors:,} parameters ({factors / dense:.1%} of the compensated weights) and one "
            f"extra low-rank matmul pair per Linear at inference (unfused); the output error ‖ΔW·Xᵀ‖² on the "
            f"calibration data falls to {kept:.1%} of the uncompensated one (summed over those Linears)"
        )
    if untouched:
        notes.append(
            f"lowrank: {len(untouched)} targets equal the original (not compressed) and were left as they "
            f"are, e.g. {untouched[0]}"
        )
    if not done:
        notes.append("lowrank: EoRA found no compressed target to compensate; run it after quantize or prune")
    return notes
