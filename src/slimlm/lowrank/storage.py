"""Saving and reloading models with low-rank modules.

`save_model` writes the state dict as it is, so a LowRankLinear's tensors are saved as ``<name>.a.weight``,
``<name>.b.weight`` (+ ``<name>.b.bias``) and a CompensatedLinear's as ``<name>.base.<base tensors>``, ``<name>.a``,
``<name>.b``. A model built from config.json has plain Linears there; `restore_lowrank` puts empty modules of the
right shapes in their place, from the JSON section `describe_lowrank` wrote beside the weights (`LOWRANK_FILE`), so
that `load_state_dict` fills them; `load_lowrank_model` does all of it for a saved folder.

Other modules that change the structure (packed quantized Linears) are restored after `restore_lowrank`: an EoRA
entry wraps the plain Linear a fresh model holds, and the packed module then takes the ``<name>.base`` place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.lowrank.layers import CompensatedLinear, LowRankLinear

LOWRANK_FILE = "slimlm_lowrank.json"
FORMAT = 1


def describe_lowrank(model: nn.Module) -> dict | None:
    """Every LowRankLinear and CompensatedLinear of `model` by full name, outer modules first; None if none."""
    modules = []
    for name, module in model.named_modules():  # pre-order: a wrapper comes before the modules inside it
        if isinstance(module, (LowRankLinear, CompensatedLinear)):
            entry = {"name": name, "rank": module.rank, "in_features": module.in_features,
                     "out_features": module.out_features}
            if isinstance(module, LowRankLinear):
                modules.append({**entry, "kind": "svd", "bias": module.b.bias is not None})
            else:
                modules.append({**entry, "kind": "eora", "base": type(module.base).__name__})
    return {"format": FORMAT, "modules": modules} if modules else None


def lowrank_extra_json(model: nn.Module) -> dict:
    """``{LOWRANK_FILE: section}`` for save_model's extra_json, or {} for a model without low-rank modules."""
    section = describe_lowrank(model)
    return {LOWRANK_FILE: section} if section else {}


def restore_lowrank(model: nn.Module, section: dict) -> None:
    """Put empty low-rank modules where `section` lists them, in a freshly built model, ready for load_state_dict.

    An EoRA entry wraps whatever module is there (a plain Linear, or a packed quantized Linear restored before);
    a strict load_state_dict then checks that the base's tensors are the saved ones."""
    if section.get("format") != FORMAT:
        raise SlimlmError(f"{LOWRANK_FILE}: format {section.get('format')!r} is not supported (expected {FORMAT})")
    for entry in section["modules"]:
        current = _module_at(model, entry["name"])
        if entry["kind"] == "svd":
            replacement = _empty_factors(current, entry)
        elif entry["kind"] == "eora":
            replacement = CompensatedLinear.empty(current, entry["rank"], entry["in_features"], entry["out_features"])
        else:
            raise SlimlmError(f"{LOWRANK_FILE}: {entry['name']} has unknown kind {entry['kind']!r} (svd or eora)")
        model.set_submodule(entry["name"], replacement)


def _module_at(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SlimlmError(f"{LOWRANK_FILE}: the model has no module {name}") from None


def _empty_factors(current: nn.Module, entry: dict) -> LowRankLinear:
    shape = (entry["out_features"], entry["in_features"])
    if not isinstance(current, nn.Linear) or tuple(current.weight.shape) != shape:
        raise SlimlmError(f"{LOWRANK_FILE}: {entry['name']} should be a Linear with a {list(shape)} weight to "
                          f"factorize, found {current}")
    weight = current.weight
    return LowRankLinear(entry["in_features"], entry["out_features"], entry["rank"], entry["bias"],
                         device=weight.device, dtype=weight.dtype)


def load_lowrank_model(folder: str | Path, config, dtype: torch.dtype):
    """The model saved in `folder` when it holds low-rank modules (a LOWRANK_FILE), else None: built from `config`,
    low-rank modules restored, then every saved tensor loaded. (from_pretrained would drop the tensors it does not
    know and initialise the plain Linears they replace at random.)"""
    folder = Path(folder)
    path = folder / LOWRANK_FILE
    if not path.is_file():
        return None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    restore_lowrank(model, json.loads(path.read_text()))
    saved = {}
    for file in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(file))
    _load_saved(model, saved, folder)
    return model.eval()


def _load_saved(model: nn.Module, saved: dict, folder: Path) -> None:
    """load_state_dict, where only tensors tied to a loaded one (the LM head) may be absent from the files."""
    result = model.load_state_dict(saved, strict=False)
    current = model.state_dict()
    loaded = {current[key].data_ptr() for key in saved if key in current}
    missing = [key for key in result.missing_keys if current[key].data_ptr() not in loaded]
    odd = result.unexpected_keys or missing
    if odd:
        raise SlimlmError(f"{folder}: the saved tensors do not match the model {LOWRANK_FILE} describes "
                          f"({len(result.unexpected_keys)} unexpected, {len(missing)} missing, e.g. {odd[0]})")
