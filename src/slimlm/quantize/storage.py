"""Saving and reloading models that hold packed quantized Linears (packed.py).

`save_model` writes the state dict as it is, so a QuantizedLinear's tensors land in the safetensors files as
``<name>.qweight`` (U8, packed codes), ``<name>.scales`` (F16), ``<name>.zeros`` (U8, asymmetric grids only) and
``<name>.bias``; `write_quantization_section` then adds the ``slimlm_quantization`` section to config.json: the
format, how codes are laid out, and one entry per packed module (bits, group size, symmetry, shape, kernel). The key
is not ``quantization_config`` on purpose: transformers would take that for one of its own quantizers.

`load_packed_model` rebuilds such a folder: the model from config.json without initialising its weights, low-rank
modules restored first when the folder has them (lowrank/storage.py: an EoRA wrapper's ``base`` is then a packed
module), empty QuantizedLinears in place of the listed Linears, then every saved tensor loaded. A saved tensor the
model lacks, or a model tensor no file holds (except one tied to a loaded tensor, as the LM head), is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.quantize.grid import QuantGrid
from slimlm.quantize.packed import SCALE_DTYPE, QuantizedLinear, quantized_linears

SECTION = "slimlm_quantization"
FORMAT = "slimlm-packed"
VERSION = 1
LAYOUT = {
    "qweight": "uint8 [out, ceil(in/k)*m]: each row's b-bit codes as a little-endian bit stream along the input "
               "dimension (4-bit: two per byte, first code in the low nibble; 8-bit: one per byte)",
    "scales": "float16 [out, groups]",
    "zeros": "uint8 [out, groups], asymmetric grids only; symmetric grids have the zero point 2^(bits-1)",
    "value": "scale * (code - zero)",
}


def quantization_section(model: nn.Module) -> dict | None:
    """The config.json section describing every packed module of `model`; None when it has none."""
    modules = {
        name: {"bits": module.grid.bits, "group_size": module.grid.group_size, "sym": module.grid.sym,
               "in_features": module.in_features, "out_features": module.out_features,
               "bias": module.bias is not None, "kernel": module.kernel}
        for name, module in quantized_linears(model)
    }
    if not modules:
        return None
    return {"format": FORMAT, "version": VERSION, "scale_dtype": str(SCALE_DTYPE).removeprefix("torch."),
            "layout": LAYOUT, "modules": modules}


def write_quantization_section(folder: str | Path, model: nn.Module) -> None:
    """Set (or, for a model without packed modules, drop a stale) section in the config.json of a saved folder."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    section = quantization_section(model)
    if section is None and SECTION not in config:
        return
    if section is None:
        del config[SECTION]
    else:
        config[SECTION] = section
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def restore_packed(model: nn.Module, section: dict) -> None:
    """Put empty QuantizedLinears where `section` lists them, in a freshly built model, ready for load_state_dict."""
    if section.get("format") != FORMAT or section.get("version") != VERSION:
        raise SlimlmError(f"config.json {SECTION}: format {section.get('format')!r} version {section.get('version')!r} "
                          f"is not supported (expected {FORMAT!r} version {VERSION}); upgrade slimlm")
    for name, entry in section.get("modules", {}).items():
        model.set_submodule(name, _empty_packed(_linear_at(model, name, entry), name, entry))


def _linear_at(model: nn.Module, name: str, entry: dict) -> nn.Linear:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise SlimlmError(f"config.json {SECTION}: the model has no module {name}") from None
    shape = [entry.get("out_features"), entry.get("in_features")]
    if not isinstance(linear, nn.Linear) or list(linear.weight.shape) != shape:
        raise SlimlmError(f"config.json {SECTION}: {name} should be a Linear with a {shape} weight, found {linear}")
    return linear


def _empty_packed(linear: nn.Linear, name: str, entry: dict) -> QuantizedLinear:
    try:
        grid = QuantGrid(entry["bits"], entry["sym"], entry["group_size"])
        return QuantizedLinear(linear.in_features, linear.out_features, grid, entry["bias"],
                               device=linear.weight.device, dtype=linear.weight.dtype)
    except (KeyError, ValueError) as err:
        raise SlimlmError(f"config.json {SECTION}: the entry of {name} is invalid ({err!r}); expected bits, "
                          "group_size, sym, in_features, out_features, bias") from None


def load_packed_model(folder: str | Path, config, dtype: torch.dtype):
    """The model saved in `folder` if its config has a SECTION, else None (see the module docstring)."""
    section = getattr(config, SECTION, None)
    if section is None:
        return None
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from slimlm.lowrank.storage import LOWRANK_FILE, restore_lowrank

    folder = Path(folder)
    delattr(config, SECTION)  # the model's config must not carry a section save_model would not refresh
    with no_init_weights():  # every weight is loaded below; random initialisation would be wasted time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips the tying init_weights does
    if (folder / LOWRANK_FILE).is_file():
        restore_lowrank(model, json.loads((folder / LOWRANK_FILE).read_text()))
    restore_packed(model, section)
    load_saved_tensors(model, folder)
    return model.eval()


def load_saved_tensors(model: nn.Module, folder: Path) -> None:
    """Every tensor of the folder's safetensors files into `model`, which must expect exactly those."""
    saved = {}
    for file in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(file))
    expected = model.state_dict()
    loaded_storage = {expected[key].data_ptr() for key in saved if key in expected}
    # save_pretrained writes a tied tensor once: the LM head sharing the embedding is absent from the files
    missing = [key for key in expected if key not in saved and expected[key].data_ptr() not in loaded_storage]
    unexpected = [key for key in saved if key not in expected]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise SlimlmError(f"{folder}: the saved tensors do not match the packed model config.json describes "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {example}); the folder is "
                          "incomplete or was edited")
    try:
        model.load_state_dict(saved, strict=False)
    except RuntimeError as err:
        raise SlimlmError(f"{folder}: a saved tensor has the wrong shape for the packed model config.json describes "
                          f"({str(err).strip().splitlines()[-1].strip()})") from None
