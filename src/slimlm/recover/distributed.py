"""What the trainer needs to run under ``accelerate launch``: the process state, FSDP2 on CPUs, and the plain model
a sharded run hands back.

FSDP2 on CPUs (gloo): torch's ``fully_shard`` runs there (all-gather and reduce-scatter on gloo), but accelerate 1.15
attaches its FSDP plugin only to multi-device distributed types (MULTI_GPU, MULTI_XPU, ...): with ``cpu=True`` it
silently trains with DDP instead (distributed type MULTI_CPU, ``is_fsdp2`` False). When the launcher asked for FSDP
(``ACCELERATE_USE_FSDP``), the CPU process state that accelerate formed is marked multi-device before the
Accelerator is built, so that accelerate's own FSDP2 plugin and ``fsdp2_prepare_model`` take over; the device stays
the CPU and the process group stays accelerate's gloo group.

The plain model after a sharded run: ``fully_shard`` turns the student's modules into FSDP classes in place and its
parameters into DTensor shards; ZeRO-3 empties them into partitions. Before training, `meta_skeleton` copies the
student's structure with meta-device parameters (no memory); after training, `plain_model` gathers every parameter,
one at a time, onto the CPU of every rank and puts them into that copy. Every rank thus returns the same plain
transformers model (the pipeline's later stages run on all ranks), in the student's own dtype.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta

import torch
from torch import nn

from slimlm.errors import SlimlmError

# How long a rank waits in a collective. Under the pipeline, rank 0 saves and evaluates each stage alone while the
# other ranks wait in the next stage's first collective: NCCL's default (10 minutes) would abort them during a long
# evaluation.
COLLECTIVE_TIMEOUT = timedelta(hours=3)


def is_main_process() -> bool:
    """Rank 0 of an ``accelerate launch``/torchrun job, or a single process: the one that writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_requested() -> bool:
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def use_cpu() -> bool:
    """accelerate forms a CPU (gloo) process group only when told cpu=True; without CUDA that is the only choice."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or (world_size() > 1 and not torch.cuda.is_available())


def process_state():
    """accelerate's process state (it forms the process group on first use), with FSDP enabled on CPUs."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=use_cpu(), timeout=COLLECTIVE_TIMEOUT)
    if fsdp_requested() and state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU  # only lets AcceleratorState switch to FSDP; see above
    return state


def check_sharding(accelerator, extras: list[nn.Module]) -> None:
    """Refuse what the sharded paths cannot do, before any training step."""
    from accelerate.utils import DistributedType

    if fsdp_requested() and accelerator.distributed_type != DistributedType.FSDP:
        raise SlimlmError(
            f"training: the launcher asked for FSDP but accelerate set up {accelerator.distributed_type}; "
            "check the accelerate config"
        )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise SlimlmError("training: FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config")
    if accelerator.is_fsdp2 and extras:
        raise SlimlmError(
            "distill.loss.hidden: the student→teacher width projection is a second trained model, which accelerate's "
            "FSDP2 does not take; use DDP, or a teacher of the student's width"
        )


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type in ("FSDP", "DEEPSPEED")


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device; buffers are shared (training does not change them).
    Ties survive: a parameter seen twice maps to one copy."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _gathered_parameters(model: nn.Module, accelerator) -> dict[str, torch.Tensor]:
    """Every parameter in full on the CPU of every rank: one collective per parameter, so no device holds more
    than one extra full tensor."""
    if accelerator.distributed_type == "DEEPSPEED":  # written to DeepSpeed's API; not run by slimlm's tests
        import deepspeed

        gathered = {}
        for name, parameter in model.named_parameters():
            with deepspeed.zero.GatheredParameters([parameter]):
                gathered[name] = parameter.detach().to("cpu", copy=True)
        return gathered
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
    }


def plain_model(skeleton: nn.Module, prepared: nn.Module, accelerator) -> nn.Module:
    """The skeleton filled with the prepared model's trained weights (a collective: every rank calls it)."""
    gathered = _gathered_parameters(prepared, accelerator)
    filled: dict[int, nn.Parameter] = {}
    for name, old in skeleton.named_parameters(remove_duplicate=False):
        if id(old) not in filled:  # the first name of a tied parameter is the one named_parameters() reports
            filled[id(old)] = nn.Parameter(gathered[name].to(old.dtype), requires_grad=old.requires_grad)
        module_name, _, attribute = name.rpartition(".")
        setattr(skeleton.get_submodule(module_name), attribute, filled[id(old)])
    return skeleton
