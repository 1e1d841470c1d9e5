"""A GGUF with a llama.cpp type per tensor and decoder layers removed, from a dense model: `export_mixed_gguf`.

The recipe form of what `slimlm auto --target gguf` finds (options.py: a gguf export with tensor_types,
prune_layers, base_type). The model goes out as an f32 GGUF (gguf.py's export_gguf) into a temporary file beside
the output, and mixed_types.write_mixed_gguf has llama-quantize write the mix from it, exactly as the search wrote
its candidates; the temporary is removed whatever happens, and the output appears whole or not at all.

What llama-quantize would silently do otherwise is refused first, each in one line: a name with no matrix in the
file (a norm, a tied LM head), a type the tensor's rows do not allow (llama-quantize would fall back to another),
a type for a tensor of a removed layer, removing a layer the model lacks or every layer, and packed slimlm modules
(llama-quantize re-quantizes float weights; a packed module would be rounded twice).
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import gguf

from slimlm.errors import SlimlmError
from slimlm.export import mixed_types as mixed
from slimlm.export.gguf import ExportSummary, export_gguf
from slimlm.storage import stored_modules

_WHAT = "GGUF export with tensor_types/prune_layers/base_type"


def export_mixed_gguf(
    model,
    tokenizer,
    path: str | Path,
    tensor_types: dict[str, str],
    prune_layers: frozenset[int] = frozenset(),
    base_type: str = mixed.BASE_TYPE,
    pre: str | None = None,
    threads: int = 2,
) -> ExportSummary:
    """Write `model` to the GGUF `path` with llama-quantize: each module of `tensor_types` (module names of `model`,
    model.embed_tokens for the token embedding) at its type, the other matrices at `base_type`, the decoder layers
    in `prune_layers` (indices in `model`) removed."""
    path = Path(path)
    types = gguf_types(model, tensor_types, prune_layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.parent / f".{path.name}.f32-{uuid.uuid4().hex[:8]}.gguf"
    try:
        f32 = export_gguf(model, tokenizer, source, dtype="f32", pre=pre)
        mixed.write_mixed_gguf(source, path, types, base_type=base_type, removed=prune_layers, threads=threads)
    finally:
        source.unlink(missing_ok=True)
    return _summary(path, f32.tokenizer_pre)


def gguf_types(model, tensor_types: dict[str, str], prune_layers: frozenset[int]) -> dict[str, str]:
    """`tensor_types` by GGUF tensor name, checked against `model` (nothing is written here)."""
    _check_dense(model)
    return check_type_map(tensor_types, prune_layers, model.config, _written_matrices(model))


def check_type_map(
    tensor_types: dict[str, str], prune_layers: frozenset[int], config, matrices: dict[str, int]
) -> dict[str, str]:
    """`tensor_types` by GGUF tensor name; `matrices` maps the module name of every matrix the GGUF holds to its
    row width. Needs no weights: a check before the model loads can pass widths from the config."""
    layers = config.num_hidden_layers
    if any(layer >= layers for layer in prune_layers) or len(prune_layers) >= layers:
        raise SlimlmError(
            f"{_WHAT}: prune_layers {sorted(prune_layers)}: the model has {layers} decoder layers (0-{layers - 1}) "
            "and at least one must stay"
        )
    by_hf = {hf: name for name, hf in mixed.hf_names_by_gguf(config).items()}
    found = {}
    for module, type_name in tensor_types.items():
        name = by_hf.get(module + ".weight")
        if name is None or module not in matrices:
            raise SlimlmError(
                f"tensor_types: {module!r} names no matrix the GGUF holds; names are module names such as "
                f"model.embed_tokens, model.layers.0.self_attn.q_proj{_tied_hint(module)}"
            )
        columns = matrices[module]
        if type_name not in mixed.allowed_types(columns):
            allowed = ", ".join(mixed.allowed_types(columns)) or "none"
            raise SlimlmError(
                f"tensor_types: {module}: {type_name} does not fit its rows of {columns} weights (k-quants need a "
                f"multiple of 256, the others of 32; llama-quantize would write another type); allowed: {allowed}"
            )
        if mixed.renumbered(name, prune_layers) is None:
            raise SlimlmError(f"tensor_types: {module} is in a layer prune_layers removes; drop it from tensor_types")
        found[name] = type_name
    return found


def _check_dense(model) -> None:
    packed = stored_modules(model)
    if packed:
        name, module = packed[0]
        raise SlimlmError(
            f"{_WHAT}: {name} is a packed slimlm module ({module.kind}); llama-quantize re-quantizes float weights "
            "only: drop the stage that packs it, or export with slimlm's blocks (type: auto, no tensor_types)"
        )


def _written_matrices(model) -> dict[str, int]:
    """Module name -> row width (columns) of every matrix the GGUF holds: not the LM head tied to the embedding
    (llama.cpp reads token_embd for it, gguf.py writes no output.weight)."""
    embedding = model.get_input_embeddings()
    matrices = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2 or (weight is embedding.weight and module is not embedding):
            continue
        matrices[name] = weight.shape[-1]
    return matrices


def _tied_hint(module: str) -> str:
    return " (the LM head is the token embedding here: set model.embed_tokens)" if module == "lm_head" else ""


def _summary(path: Path, pre: str) -> ExportSummary:
    reader = gguf.GGUFReader(path)
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    file_type = gguf.LlamaFileType(int(reader.fields["general.file_type"].parts[-1][0])).name
    return ExportSummary(path, dict(counts), path.stat().st_size, pre, file_type)
