"""The `quantize` stage: weight-only integer quantization of the decoder Linears onto a shared grid (grid.py).

A method is a function ``quantize(model, options, context)`` registered in `QUANT_METHODS` with its options model
(`QuantizeOptions`, or a subclass adding the method's own settings) that puts every target Linear on the options'
grid with `store_quantized`: round-to-nearest (rtn.py) needs no data, GPTQ (gptq.py) walks the
calibration windows. A method leaves each Linear fake-quantized: its weight holds the dequantized values in the
model's dtype, and the exact codes, float16 scales and zero points ride along as the attribute
``linear.slimlm_quantized`` (a QuantizedWeight). The stage then packs those Linears (packed.py: QuantizedLinear,
codes at their bit width, float16 scales), so the saved folder holds the packed tensors and the forward pass runs
a real low-bit kernel where one exists; ``pack: false`` keeps the fake-quantized Linears (for stages that edit
weights in place afterwards), at full size and speed.

Checking and packing are done layer by layer (`_LayerFinisher`, run through streaming.finishing_layers): after the
method for an in-memory model, and on a layer-streamed model for each layer just before it is written, so a model
bigger than memory is quantized with one layer's weights (and codes) in memory at a time.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator, Field, PositiveInt, model_validator
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.modules import (
    SHORT_NAMES,
    ProjectionName,
    decoder_layers,
    layer_linears,
    layer_projections,
    named_decoder_linears,
)
from slimlm.quantize.grid import QUANTIZED_ATTRIBUTE, QuantGrid, QuantizedWeight
from slimlm.quantize.lm_head import HeadOptions, check_head, quantize_head
from slimlm.quantize.packed import pack_model, quantized_linears
from slimlm.registry import (
    DENSE,
    FAKE_QUANTIZED,
    PACKED,
    TIED,
    W8A8,
    Kinds,
    MethodRegistry,
    StageOptions,
    register_stage,
)
from slimlm.storage import kernel_summary
from slimlm.streaming import finishing_layers, layer_stream, require_materialized

# method name -> function(model, options, context) that quantizes the target Linears in place
QUANT_METHODS = MethodRegistry()
register_quant_method = QUANT_METHODS.register


class Targeted(StageOptions):
    """Options of a stage that works on some of the decoder's projections (quantize, share)."""

    targets: list[ProjectionName] | None = Field(None, min_length=1)  # q_proj ... down_proj; None: all of them

    def layer_targets(self) -> list[str]:
        """The targets as names inside a decoder layer (``self_attn.q_proj``), in execution order."""
        return layer_projections(self.targets)


class QuantizeTargets(Targeted):
    """What every quantization method takes: the method and the projections it quantizes."""

    method: Annotated[str, AfterValidator(QUANT_METHODS.check)] = "rtn"


class ProjectionGrid(StageOptions):
    """The bits and group size of one projection kind that differ from its quantize stage's (per_projection)."""

    bits: int = Field(ge=2, le=8)
    group_size: PositiveInt | None  # None: one scale per output channel


class QuantizeOptions(QuantizeTargets):
    """Options of the weight-only methods on the shared grid (rtn's; gptq.py and awq.py add their own)."""

    bits: int = Field(4, ge=2, le=8)
    group_size: PositiveInt | None = 64  # input columns per scale; None: one scale per output channel
    sym: bool = True
    pack: bool = True  # replace the fake-quantized Linears by packed QuantizedLinears (see the module docstring)
    # the LM head too, on its own grid (lm_head.py); None: it stays as it is (tied to the embeddings if it was)
    lm_head: HeadOptions | None = None
    # projection kind -> its own bits and group size (the other targets take the stage's). A mixed recipe is then one
    # calibration walk, so GPTQ's true-sequential order compensates every Linear for all those before it as in a
    # uniform one; split into a stage per format, each walk sees only its own Linears change (and a later stage's
    # rounding lands on Linears already solved) and the calibration walk runs once per format (SmolLM2, a 3/4-bit
    # GPTQ mix: four stages KL 0.1895, one 0.1887, well within one recipe's build noise: auto_build_noise.json)
    per_projection: dict[ProjectionName, ProjectionGrid] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _per_projection_targets(self):
        outside = sorted(set(self.per_projection) - set(self.targets or SHORT_NAMES))
        if outside:
            raise ValueError(f"per_projection: {', '.join(outside)} not among the targets ({', '.join(self.targets)})")
        return self

    def grid(self, projection: str | None = None) -> QuantGrid:
        """The grid of `projection` (a kind, its name inside a layer or a module's full name); None: the stage's."""
        own = self.per_projection.get(projection.rsplit(".", 1)[-1]) if projection else None
        bits, group_size = (own.bits, own.group_size) if own else (self.bits, self.group_size)
        return QuantGrid(bits, self.sym, group_size)

    def grids(self) -> list[QuantGrid]:
        """Every grid the stage's targets take (the stage's first, if some target takes it)."""
        return list(dict.fromkeys(self.grid(name) for name in self.layer_targets()))

    def group_size_field(self, projection: str) -> str:
        """The option that sets `projection`'s group size, as a recipe names it (for error messages)."""
        short = projection.rsplit(".", 1)[-1]
        return f"per_projection.{short}.group_size" if short in self.per_projection else "group_size"


def target_linears(model, options: QuantizeOptions) -> list[tuple[str, nn.Linear]]:
    """Every decoder Linear the options target, with its full name."""
    suffixes = tuple("." + name for name in options.layer_targets())
    return [(name, linear) for name, linear in named_decoder_linears(model) if name.endswith(suffixes)]


def store_quantized(linear: nn.Linear, quantized: QuantizedWeight) -> None:
    """Write the dequantized weight into the Linear (in its dtype) and keep the codes beside it."""
    linear.weight.data.copy_(quantized.dequantize().to(linear.weight.dtype))
    setattr(linear, QUANTIZED_ATTRIBUTE, quantized)


def _check_group_size(targets: list[tuple[str, nn.Linear]], options: QuantizeOptions) -> None:
    """Options are validated before the model is known: the group size must divide every target's in_features."""
    if not isinstance(options, QuantizeOptions):  # smoothquant: per channel
        return
    for name, linear in targets:
        group_size = options.grid(name).group_size
        if group_size is not None and linear.in_features % group_size:
            raise SlimlmError(
                f"quantize.{options.group_size_field(name)}: {group_size} does not divide the {linear.in_features} "
                f"input features of {name}; use a divisor of it or null (one scale per output channel)"
            )


class _LayerFinisher:
    """What the stage does to each decoder layer once the method is done with it (streaming.finishing_layers: right
    before a streamed layer is written, else after the method for every layer): refuse non-finite values, count the
    weights float rounding moved off the grid, and pack the fake-quantized Linears (unless `pack: false`)."""

    def __init__(self, model, options: QuantizeOptions):
        self.model, self.options = model, options
        self.pack = getattr(options, "pack", False)  # smoothquant's options have none: its modules are final
        self.targets = set(options.layer_targets())
        self.linears = self.off_grid = self.weights = self.packed = 0
        self.dtype: torch.dtype | None = None

    def __call__(self, indices: list[int]) -> None:
        layers = decoder_layers(self.model)
        for index in indices:
            self._check_finite(index, layers[index])
            self._count_rounding(layers[index])
        if self.pack:
            self.packed += pack_model(self.model, layers=indices)

    def _check_finite(self, index: int, layer: nn.Module) -> None:
        """Every tensor of the layer (weights, scales, whatever module a method put there) must be finite."""
        method = self.options.method
        for name, tensor in layer.state_dict(prefix=f"model.layers.{index}.").items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise SlimlmError(
                    f"quantize ({method}): {name} has non-finite (NaN/Inf) values after "
                    "quantization; check the original weights and calibration data"
                )
        for name, linear in layer_linears(layer).items():
            quantized = getattr(linear, QUANTIZED_ATTRIBUTE, None)
            if quantized is not None and not torch.isfinite(quantized.scale.float()).all():
                raise SlimlmError(f"quantize ({method}): layers.{index}.{name} has non-finite (NaN/Inf) scales")

    def _count_rounding(self, layer: nn.Module) -> None:
        """The target Linears the method left fake-quantized (rtn, gptq, awq; smoothquant replaces them), and how
        many of their dequantized weights float16/bfloat16 could not hold exactly."""
        for name, linear in layer_linears(layer).items():
            if name in self.targets:
                dequantized = getattr(linear, QUANTIZED_ATTRIBUTE).dequantize()
                self.off_grid += int((linear.weight.float() != dequantized).sum())
                self.weights += linear.weight.numel()
                self.linears += 1
                self.dtype = linear.weight.dtype

    def notes(self) -> list[str]:
        if not self.linears:  # the method replaced the Linears by modules of its own (smoothquant)
            return []
        notes = [_quantization_note(self.options, self.linears)]
        if self.off_grid:
            notes.append(
                f"quantize: {self.off_grid / self.weights:.2%} of the dequantized weights were rounded to "
                f"{str(self.dtype).removeprefix('torch.')} and sit slightly off the grid; the kept codes are exact"
            )
        notes.append(_storage_note(self.model, self.options, self.packed))
        return notes


def _check_streamable(model, options: QuantizeOptions) -> None:
    """A streamed model is quantized inside the calibration walk, one layer in memory at a time."""
    if options.method == "rtn":  # rounds every Linear at once, with no walk to stream the layers through
        require_materialized(model, "quantize (rtn)")
    if layer_stream(model) is not None and not getattr(options, "pack", True):
        raise SlimlmError(
            "quantize.pack: false keeps the codes beside the dequantized weights in memory, which a streamed model "
            "writes out layer by layer; use pack: true (the default) when streaming"
        )


def _granularity(group_size: int | None) -> str:
    return "per output channel" if group_size is None else f"group size {group_size}"


def _quantization_note(options: QuantizeOptions, count: int) -> str:
    own = "".join(f"; {name} {g.bits}-bit {_granularity(g.group_size)}" for name, g in options.per_projection.items())
    return (
        f"quantize: {options.method}, {options.bits}-bit "
        f"{'symmetric (ggml Q4_0/Q8_0 scale rule)' if options.sym else 'asymmetric (integer zero point)'}, "
        f"{_granularity(options.group_size)}{own}, targets {', '.join(options.targets or SHORT_NAMES)} ({count} "
        "Linears; embeddings, norms "
        f"{'stay as they were, the LM head: see below' if options.lm_head else 'and the LM head stay as they were'})."
    )


def _storage_note(model, options: QuantizeOptions, count: int) -> str:
    """What is stored of the `count` packed Linears (or why nothing is packed) and what computes them."""
    if not options.pack:
        return (
            "quantize: not packed (pack: false): the weights are stored dequantized in the model's dtype, so the "
            "file is no smaller and inference no faster; quality figures are those of the quantized model."
        )
    used = {module.kernel for _, module in quantized_linears(model)}
    runs = []
    if used - {"dequantized"}:
        runs.append(
            "the low-bit kernels take bfloat16 activations, scales and outputs, so quality figures include "
            "that rounding"
        )
    if "dequantized" in used:
        runs.append("a dequantized Linear expands its weight before a full-precision matmul: no low-bit speedup")
    zeros = "" if options.sym else " and uint8 zero points"
    return (
        f"quantize: packed {count} Linears: {'/'.join(str(b) for b in sorted({g.bits for g in options.grids()}))}-bit "
        f"codes bit-packed into uint8, float16 scales{zeros}; "
        "the saved folder holds these tensors (config.json section slimlm_storage), so the size on disk is "
        f"the packed size. Matmul: {kernel_summary(model)}; {'; '.join(runs)}."
    )


def _accepts(options: QuantizeOptions) -> Kinds:
    # re-rounding a tied tensor onto the grid is idempotent; a calibrated method would solve it once per layer
    return frozenset({DENSE, TIED}) if options.method == "rtn" else frozenset({DENSE})


def _produces(options: QuantizeOptions) -> Kinds:
    if options.method == "smoothquant":
        return frozenset({W8A8})
    return frozenset({PACKED if options.pack else FAKE_QUANTIZED})


@register_stage("quantize", QuantizeOptions, QUANT_METHODS, accepts=_accepts, produces=_produces)
def quantize(model, options: QuantizeOptions, context):
    """Weight-only integer quantization of the decoder Linears (round-to-nearest or GPTQ), per group or channel."""
    _check_group_size(target_linears(model, options), options)
    _check_streamable(model, options)
    head = getattr(options, "lm_head", None)  # smoothquant's options have none
    if head is not None:
        check_head(model, head)
    finisher = _LayerFinisher(model, options)
    with finishing_layers(model, finisher):
        QUANT_METHODS[options.method](model, options, context)
    context.notes.extend(finisher.notes())
    if head is not None:
        context.notes.append(quantize_head(model, head, options.pack))
    return model
