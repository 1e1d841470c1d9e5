"""What training must not undo in a compressed student: its quantization grid (QAT) and its pruning masks.

QAT (quantization-aware training, as in LLM-QAT, Liu et al. 2023): each target Linear's weight is registered with a
torch parametrization that returns `fake_quantize_ste(weight, grid)`, so every forward pass sees the weight on the
grid while the optimizer updates the full-precision latent weight through the straight-through estimator (identity
gradient). At the end the parametrization is removed keeping the *quantized* values: the trained model lies on the
grid, the codes are stored beside each Linear as the quantize stage does, and a later quantize stage with the same
grid (rtn) reproduces them exactly.

Sparsity: a Linear whose weight has at least `MIN_SPARSITY` exact zeros is taken to be pruned; its zero pattern is
re-applied after every optimizer step (the optimizer would otherwise regrow pruned weights). This keeps unstructured
and N:M masks; they work single-process, with DDP and with FSDP2 (sharded like the weights), not with ZeRO-3.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimlm.errors import SlimlmError
from slimlm.modules import named_decoder_linears, short_name
from slimlm.quantize.grid import QUANTIZED_ATTRIBUTE, QuantGrid, fake_quantize_ste, quantize_codes

MIN_SPARSITY = 0.01


class FakeQuantize(nn.Module):
    """Parametrization: the weight as the forward pass sees it is the weight rounded onto the grid."""

    def __init__(self, grid: QuantGrid):
        super().__init__()
        self.grid = grid

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_ste(weight, self.grid)


def qat_targets(model: nn.Module, targets: list[str] | None) -> list[tuple[str, nn.Linear]]:
    """Decoder Linears whose short name (q_proj ... down_proj) is in targets (all when None)."""
    return [
        (name, linear)
        for name, linear in named_decoder_linears(model)
        if targets is None or short_name(name) in targets
    ]


def attach_fake_quantization(linears: list[tuple[str, nn.Linear]], grid: QuantGrid) -> None:
    for _, linear in linears:
        parametrize.register_parametrization(linear, "weight", FakeQuantize(grid))


def detach_fake_quantization(linears: list[tuple[str, nn.Linear]], grid: QuantGrid) -> None:
    """Remove the parametrization keeping the quantized values, and store their codes as the quantize stage does."""
    for _, linear in linears:
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
        with torch.no_grad():
            setattr(linear, QUANTIZED_ATTRIBUTE, quantize_codes(linear.weight, grid))


def drop_stale_codes(model: nn.Module) -> int:
    """Training changed the weights: codes stored by an earlier quantize stage no longer describe them."""
    dropped = 0
    for _, linear in named_decoder_linears(model):
        if hasattr(linear, QUANTIZED_ATTRIBUTE):
            delattr(linear, QUANTIZED_ATTRIBUTE)
            dropped += 1
    return dropped


def trainable_weight(linear: nn.Linear) -> nn.Parameter:
    """The parameter the optimizer updates: the latent weight under a parametrization."""
    if parametrize.is_parametrized(linear, "weight"):
        return linear.parametrizations.weight.original
    return linear.weight


class SparsityMasks:
    """The zero patterns of pruned decoder Linears, re-applied after each optimizer step.

    Masks are kept by Linear, not by parameter: FSDP2 replaces each parameter by a DTensor shard when the model is
    prepared, so the weight is looked up at every step and the mask sharded like it (once)."""

    def __init__(self, model: nn.Module):
        self.masks: list[tuple[nn.Linear, torch.Tensor]] = []
        for _, linear in named_decoder_linears(model):
            zeros = trainable_weight(linear).detach() == 0
            if zeros.float().mean().item() >= MIN_SPARSITY:
                self.masks.append((linear, ~zeros))

    def __len__(self) -> int:
        return len(self.masks)

    def sparsity(self) -> float:
        total = sum(mask.numel() for _, mask in self.masks)
        return sum((~mask).sum().item() for _, mask in self.masks) / max(total, 1)

    @torch.no_grad()
    def apply(self) -> None:
        for index, (linear, mask) in enumerate(self.masks):
            weight = trainable_weight(linear)
            placed = _placed_like(mask, weight)
            if placed is not mask:  # the model moved or was sharded (accelerate.prepare): place the mask once
                self.masks[index] = (linear, placed)
            weight.mul_(placed)


def _placed_like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The mask on the weight's device, and sharded like it when the weight is an FSDP2 DTensor shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if hasattr(weight, "ds_id"):  # a ZeRO-3 partition: outside forward the parameter holds no values to mask
        raise SlimlmError(
            "keep_sparsity: pruning masks cannot be kept under DeepSpeed ZeRO-3; set keep_sparsity: false, or train "
            "with FSDP2 or DDP"
        )
    if isinstance(weight, DTensor) and not isinstance(mask, DTensor):
        # every rank holds the same full mask: each takes its own shard, no communication
        return distribute_tensor(mask.to(weight.device), weight.device_mesh, weight.placements, src_data_rank=None)
    return mask if mask.device == weight.device else mask.to(weight.device)


def recorded_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name → keep-mask of every pruned decoder Linear (for models rebuilt or merged after training)."""
    masks = {}
    for name, linear in named_decoder_linears(model):
        zeros = linear.weight.detach() == 0
        if zeros.float().mean().item() >= MIN_SPARSITY:
            masks[name] = ~zeros
    return masks


@torch.no_grad()
def apply_masks_by_name(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, linear in named_decoder_linears(model):
        if name in masks:
            linear.weight.mul_(masks[name].to(linear.weight.device))
