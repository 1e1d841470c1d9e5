"""Which teacher layer each student layer imitates, and capturing layer outputs and attention maps with hooks.

Layer map (student layer i ↔ teacher layer map[i], both 0-based decoder layer indices), first that applies:

1. the stage's explicit ``layer_map``;
2. ``model.config.slimlm_kept_layers``: the original indices of the layers a depth-pruned student kept (recorded
   by prune_depth when it records them), used when the teacher is that original;
3. equal depths: the identity;
4. uniform spacing: map[i] = round((i + 1)·L_teacher / L_student) − 1, so the last layers correspond.

Outputs are captured by forward hooks on the decoder layers (their output hidden state, before the final norm) and
on their ``self_attn`` modules (the attention probabilities, which only eager attention returns).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from slimlm.errors import SlimlmError
from slimlm.modules import ATTENTION, decoder_layers, query_head_count

KEPT_LAYERS_ATTRIBUTE = "slimlm_kept_layers"


def causal_lm(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a DDP- or peft-wrapped student."""
    while hasattr(model, "module") and not hasattr(model, "model"):  # DistributedDataParallel
        model = model.module
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


def uniform_layer_map(student_depth: int, teacher_depth: int) -> list[int]:
    return [round((i + 1) * teacher_depth / student_depth) - 1 for i in range(student_depth)]


def check_layer_map(layer_map: list[int], student_depth: int, teacher_depth: int, where: str) -> list[int]:
    """A one-line SlimlmError naming `where` unless the map gives every student layer a teacher layer."""
    if len(layer_map) != student_depth:
        raise SlimlmError(
            f"{where}: has {len(layer_map)} entries but the student has {student_depth} layers; "
            "give one teacher layer per student layer"
        )
    bad = [index for index in layer_map if not 0 <= index < teacher_depth]
    if bad:
        raise SlimlmError(
            f"{where}: {bad[0]} is not a teacher layer; the teacher has {teacher_depth} layers (0..{teacher_depth - 1})"
        )
    return list(layer_map)


def resolve_layer_map(
    student: nn.Module,
    teacher_depth: int,
    explicit: list[int] | None,
    teacher_is_original: bool,
    where: str = "distill.layer_map",
) -> tuple[list[int], str]:
    """The layer map and how it was chosen (for the report)."""
    student_depth = len(decoder_layers(student))
    if explicit is not None:
        return check_layer_map(explicit, student_depth, teacher_depth, where), "explicit layer_map"
    kept = getattr(student.config, KEPT_LAYERS_ATTRIBUTE, None)
    if (
        teacher_is_original
        and isinstance(kept, (list, tuple))
        and len(kept) == student_depth
        and all(0 <= k < teacher_depth for k in kept)
    ):
        return [int(k) for k in kept], f"config.{KEPT_LAYERS_ATTRIBUTE} (the layers depth pruning kept)"
    if student_depth == teacher_depth:
        return list(range(student_depth)), "identity (equal depths)"
    return uniform_layer_map(student_depth, teacher_depth), "uniform spacing (round((i+1)·L_t/L_s) − 1)"


@contextmanager
def captured_layers(model: nn.Module, indices: list[int], hidden: bool, attention: bool) -> Iterator[dict]:
    """While active, each forward fills ``found["hidden"][i]`` / ``found["attention"][i]`` for i in indices."""
    found: dict[str, dict[int, object]] = {"hidden": {}, "attention": {}}
    layers = decoder_layers(causal_lm(model))
    handles = []

    def keep(kind: str, index: int, pick_attention: bool):
        def hook(module, args, output):
            if pick_attention:
                found[kind][index] = output[1]
            else:
                found[kind][index] = output[0] if isinstance(output, tuple) else output

        return hook

    for index in sorted(set(indices)):
        if hidden:
            handles.append(layers[index].register_forward_hook(keep("hidden", index, False)))
        if attention:
            handles.append(layers[index].get_submodule(ATTENTION).register_forward_hook(keep("attention", index, True)))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def attention_heads(model: nn.Module, index: int) -> int:
    return query_head_count(decoder_layers(causal_lm(model))[index])


def matching_head_pairs(student: nn.Module, teacher: nn.Module, layer_map: list[int]) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs whose query head counts match: attention maps compare head by head."""
    return [(s, t) for s, t in enumerate(layer_map) if attention_heads(student, s) == attention_heads(teacher, t)]
