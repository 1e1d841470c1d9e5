"""One storage protocol for every module type slimlm puts into a model, and the save/load/size code that loops over it.

A module type slimlm creates (packed quantized Linears, W8A8 Linears, codebook Linears, low-rank factors, EoRA
wrappers) subclasses `StoredModule` with a ``kind`` (``class PackedLinear(StoredModule, kind="packed")``) and so is
registered once. It then says, for itself:

- ``storage_entry()``: the JSON description config.json keeps (shapes, bits, rank, ...);
- ``from_entry(entry, current)``: an empty module of that description, put where ``current`` sits in a model built
  from config.json, for ``load_state_dict`` to fill;
- ``dequantize_weight()``: the dense [out, in] weight it applies;
- ``weights_in_buffers()``: how many weights it holds outside parameters (codes in buffers), so that parameter
  counts do not drop when a matrix is packed;
- ``kernel_label()``: what computes its matmul, for speed records (None for wrappers whose inner module says it).

Saving (`write_storage_config`), loading (`load_stored_model`), footprint and kernel labels only loop over
`stored_modules(model)`; none of them names a module class.

A folder holding such modules (or cross-layer ties, whose targets are not written) says ``"model_type": "slimlm"``
in config.json, with the real type in the ``slimlm_storage`` section: plain ``from_pretrained`` would otherwise
drop the tensors it does not know and initialise the Linears they replaced at random. With the changed type it
fails loudly ("model type `slimlm` ... not recognized") instead; `slimlm.models.load_model` reads it, and
``slimlm export --format hf`` (the deploy issue) writes a plain folder.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from slimlm.errors import SlimlmError

SECTION = "slimlm_storage"
FORMAT_VERSION = 2
MODEL_TYPE = "slimlm"
# Recorded by the share stage's tie_layers: {target name: source name}, parameters or (after packing) modules.
TIED_KEY = "slimlm_tied_parameters"
# The modules that define storage kinds: imported before a load looks a kind up (they register on import).
KIND_MODULES = ("slimlm.quantize.packed", "slimlm.quantize.w8a8", "slimlm.quantize.codebook", "slimlm.lowrank.layers")
_LOAD_NOTE = (
    "slimlm's own module types (see 'modules'); load with slimlm.models.load_model, or write a plain or "
    "deployable copy with slimlm export"
)

_KINDS: dict[str, type[StoredModule]] = {}


class StoredModule(nn.Module):
    """Base of every module type slimlm creates; subclasses register with ``kind=...`` (module docstring)."""

    kind: ClassVar[str]
    # floating buffers stored in a fixed dtype (float16 scales, codebooks) that model-wide casts must not round
    fixed_dtype_buffers: ClassVar[tuple[str, ...]] = ()
    in_features: int
    out_features: int

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            if kind in _KINDS and _KINDS[kind] is not cls:
                raise ValueError(f"storage kind '{kind}' is registered twice")
            cls.kind = kind
            _KINDS[kind] = cls

    def storage_entry(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_entry(cls, entry: dict, current: nn.Module) -> StoredModule:
        raise NotImplementedError

    def dequantize_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def weights_in_buffers(self) -> int:
        return 0

    def kernel_label(self) -> str | None:
        return None

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self.fixed_dtype_buffers if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            if getattr(self, name).dtype != tensor.dtype:  # cast back from the original, not through the new dtype
                setattr(self, name, tensor.to(getattr(self, name).device))
        return self

    def own_bytes(self) -> int:
        """Bytes of this module's own parameters and buffers (not its children's)."""
        tensors = list(self.parameters(recurse=False)) + list(self.buffers(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)


def storage_kinds() -> dict[str, type[StoredModule]]:
    for module in KIND_MODULES:
        importlib.import_module(module)
    return dict(_KINDS)


def stored_modules(model: nn.Module) -> list[tuple[str, StoredModule]]:
    """Every StoredModule of `model` with its full name, outer modules before the modules inside them; a module
    shared under several names (tied) once, under its first name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, StoredModule)]


def weight_modules(model: nn.Module) -> list[tuple[str, StoredModule]]:
    """The StoredModules that hold a weight in buffers (packed codes), not wrappers of other modules."""
    return [(name, module) for name, module in stored_modules(model) if module.weights_in_buffers()]


def empty_module_args(current: nn.Module) -> dict:
    """device/dtype of the module a restored one replaces (a packed module may hold only buffers)."""
    tensors = list(current.parameters()) + list(current.buffers())
    floating = [t for t in tensors if t.is_floating_point()]
    return {"device": tensors[0].device if tensors else None, "dtype": floating[0].dtype if floating else None}


def replace_linears(
    model: nn.Module, linears: list[tuple[str, nn.Linear]], build: Callable[[nn.Linear], StoredModule]
) -> int:
    """Put ``build(linear)`` in place of each named Linear; the number replaced. Linears sharing one weight through a
    cross-layer tie share one built module (the tie moves from their weights to the modules), except those with a
    bias of their own, which get their own module and lose the tie (both copies are then stored and counted)."""
    config = getattr(model, "config", None)  # a decoder layer (smoothquant's walk) has none, and no ties
    tied = dict(getattr(config, TIED_KEY, None) or {})
    built: dict[int, tuple[str, StoredModule]] = {}
    for name, linear in linears:
        source = built.get(id(linear.weight))
        target = name + ".weight"
        if source is not None and linear.bias is None and tied.get(target) == source[0] + ".weight":
            del tied[target]
            tied[name] = source[0]
            model.set_submodule(name, source[1])
            continue
        tied.pop(target, None)
        module = build(linear)
        built.setdefault(id(linear.weight), (name, module))
        model.set_submodule(name, module)
    if tied or getattr(config, TIED_KEY, None):
        setattr(config, TIED_KEY, tied)
    return len(linears)


def storage_section(model: nn.Module) -> dict | None:
    """The config.json section describing every StoredModule of `model`; None when it has none and no ties."""
    modules = [{"name": name, "kind": module.kind, **module.storage_entry()} for name, module in stored_modules(model)]
    if not modules and not getattr(model.config, TIED_KEY, None):
        return None
    return {"format": FORMAT_VERSION, "model_type": model.config.model_type, "note": _LOAD_NOTE, "modules": modules}


def write_storage_config(folder: str | Path, model: nn.Module) -> None:
    """Mark a saved folder's config.json as slimlm storage (module docstring) when the model needs it."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    section = storage_section(model)
    config.pop(SECTION, None)
    if section is not None:
        config[SECTION] = section
        config["model_type"] = MODEL_TYPE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(folder: str | Path, trust_remote_code: bool = False):
    """(transformers config, slimlm storage section or None) of a saved folder."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SlimlmError(f"{path}: not a readable JSON config ({err})") from None
    section = data.pop(SECTION, None) if isinstance(data, dict) else None
    if section is None:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), None
    if section.get("format") != FORMAT_VERSION or section.get("model_type") not in CONFIG_MAPPING:
        raise SlimlmError(
            f"{path}: {SECTION} format {section.get('format')!r} of model type "
            f"{section.get('model_type')!r} is not supported (expected format {FORMAT_VERSION}); "
            "upgrade slimlm"
        )
    data["model_type"] = section["model_type"]
    return CONFIG_MAPPING[section["model_type"]].from_dict(data), section


def restore_modules(model: nn.Module, section: dict) -> None:
    """Put empty StoredModules where `section` lists them, in a freshly built model, outer modules first (an EoRA
    wrapper then wraps the plain Linear, and the packed module its entry lists next takes the ``.base`` place)."""
    kinds = storage_kinds()
    for entry in section.get("modules", []):
        name, kind = entry.get("name"), entry.get("kind")
        if kind not in kinds:
            raise SlimlmError(f"config.json {SECTION}: {name} has unknown kind {kind!r}; known: {', '.join(kinds)}")
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise SlimlmError(f"config.json {SECTION}: the model has no module {name}") from None
        try:
            model.set_submodule(name, kinds[kind].from_entry(entry, current))
        except (KeyError, TypeError, ValueError) as err:
            raise SlimlmError(
                f"config.json {SECTION}: the {kind} entry of {name} does not fit the model "
                f"({type(err).__name__}: {err})"
            ) from None


def retie(model: nn.Module) -> int:
    """Re-establish the recorded cross-layer ties (parameters, or whole modules after packing); how many."""
    tied = getattr(model.config, TIED_KEY, None) or {}
    for target, source in tied.items():
        try:
            shared = _named_member(model, source)
            owner_name, _, attribute = target.rpartition(".")
            current = getattr(model.get_submodule(owner_name), attribute)
        except AttributeError as err:
            raise SlimlmError(f"config {TIED_KEY}: {target} -> {source} names nothing in the model ({err})") from None
        if _shape(current) != _shape(shared):
            raise SlimlmError(
                f"config {TIED_KEY}: {target} has shape {_shape(current)}, {source} has shape "
                f"{_shape(shared)}; they cannot be one tensor"
            )
        if isinstance(shared, nn.Module):
            model.set_submodule(target, shared)
        else:
            setattr(model.get_submodule(owner_name), attribute, shared)
    return len(tied)


def _named_member(model: nn.Module, name: str):
    owner_name, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(owner_name), attribute)


def _shape(member) -> tuple:
    """A parameter's shape, or a module's (out_features, in_features)."""
    if isinstance(member, nn.Module):
        return (getattr(member, "out_features", None), getattr(member, "in_features", None))
    return tuple(member.shape)


def untied_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict without the tie targets (each shared tensor saved once, under its source's name), for
    ``save_pretrained(state_dict=...)``; None when nothing is tied (save_pretrained then takes the whole one)."""
    tied = getattr(model.config, TIED_KEY, None) or {}
    if not tied:
        return None
    prefixes = tuple(target + "." for target in tied)
    return {name: t for name, t in model.state_dict().items() if name not in tied and not name.startswith(prefixes)}


def read_saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    saved = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            saved.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise SlimlmError(f"{file}: not a complete safetensors file, truncated or corrupt ({err})") from None
    return saved


def load_saved_tensors(model: nn.Module, folder: Path) -> None:
    """Every tensor of the folder's safetensors files into `model`, which must expect exactly those: a tensor the
    model lacks, or a model tensor no file holds (except one sharing a loaded tensor's storage, as a tied LM head or
    a cross-layer tie), is an error, so nothing is ever left initialised at random."""
    saved = read_saved_tensors(folder)
    expected = model.state_dict()
    loaded_storage = {expected[key].data_ptr() for key in saved if key in expected}
    missing = [key for key in expected if key not in saved and expected[key].data_ptr() not in loaded_storage]
    unexpected = [key for key in saved if key not in expected]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise SlimlmError(
            f"{folder}: the saved tensors do not match the model config.json describes "
            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {example}); the folder is "
            "incomplete or was edited"
        )
    try:
        model.load_state_dict(saved, strict=False)
    except RuntimeError as err:
        raise SlimlmError(
            f"{folder}: a saved tensor has the wrong shape for the model config.json describes "
            f"({str(err).strip().splitlines()[-1].strip()})"
        ) from None


def load_stored_model(folder: str | Path, config, section: dict | None, dtype: torch.dtype) -> nn.Module:
    """The model saved in `folder`: built from `config` without initialising weights, StoredModules restored from
    `section`, ties re-established, then every saved tensor loaded (load_saved_tensors' checks)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is loaded below; random initialisation would be wasted time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips the tying init_weights does
    if section is not None:
        restore_modules(model, section)
    retie(model)
    load_saved_tensors(model, Path(folder))
    return model.eval()


def kernel_summary(model: nn.Module) -> str:
    """What computes the model's matmuls, for speed records: ``dense``, or each kernel label with its count."""
    counts: dict[str, int] = {}
    for _, module in stored_modules(model):
        label = module.kernel_label()
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    return "; ".join(f"{label} ×{count}" for label, count in sorted(counts.items())) or "dense"
