"""Write a compressed model as a plain Hugging Face folder that transformers alone loads: `export_hf`.

slimlm's own folders keep packed codes, codebooks, factors and cross-layer ties as they are and say
``"model_type": "slimlm"`` (storage.py), so that plain ``from_pretrained`` refuses them. This export gives up that
size for portability; `AutoModelForCausalLM.from_pretrained(folder)` loads what it writes:

- every StoredModule (storage.stored_modules; an outer wrapper stands for the modules inside it) becomes an
  nn.Linear holding the dense weight it applies (``dequantize_weight()``: codes decoded, codebooks looked up, B·A
  multiplied, an EoRA base plus its correction) and the bias it adds;
- cross-layer ties (config ``slimlm_tied_parameters``) are written as separate copies: a plain folder cannot say
  that two layers share a tensor (transformers' own tie of the LM head to the token embedding stays);
- every ``slimlm_*`` config attribute is dropped: they describe slimlm's storage and history, which the plain folder
  no longer has.

Dense tensors are written in the model's dtype (exact), or in bfloat16/float16 on request. The export works on a
deep copy (the caller's model keeps its modules and ties) and writes through slimlm.models.save_model, so the
folder appears complete or not at all. `plain_copy` is also the first step of the compressed-tensors export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.export.ggml_blocks import module_bias
from slimlm.models import save_model, torch_dtype
from slimlm.storage import TIED_KEY, stored_modules

DTYPES = ("auto", "float32", "bfloat16", "float16")
SLIMLM_PREFIX = "slimlm_"  # config attributes slimlm adds (ties, kept layers): meaningless in a plain folder


@dataclass
class FolderExport:
    """What a folder export wrote: its format and dense dtype, its size, and what became of slimlm's modules."""

    folder: Path
    format: str  # "hf" or "compressed-tensors"
    dtype: str  # of the dense tensors
    bytes: int
    dequantized: dict[str, str] = field(default_factory=dict)  # module name -> what it was, written dense
    quantized: dict[str, str] = field(default_factory=dict)  # module name -> the grid it is written on
    untied: list[str] = field(default_factory=list)  # cross-layer tie targets, written as copies of their source

    def line(self) -> str:
        parts = [f"{len(self.quantized)} modules quantized"] * bool(self.quantized)
        parts += [f"{len(self.dequantized)} modules dequantized to dense"] * bool(self.dequantized)
        parts += [f"{len(self.untied)} cross-layer ties written as copies"] * bool(self.untied)
        details = f": {', '.join(parts)}" if parts else ""
        return f"{self.folder} ({self.format}, {self.dtype}, {self.bytes / 2**20:.1f} MiB){details}"


def export_hf(model: nn.Module, tokenizer, folder: str | Path, dtype: str = "auto") -> FolderExport:
    """Write `model` and `tokenizer` to `folder` as a plain transformers folder (module docstring), atomically.

    dtype: of every tensor written ("auto": the model's own; "float32", "bfloat16", "float16").
    """
    target = dense_dtype(model, dtype)
    plain, dequantized, untied = plain_copy(model, target)
    save_model(plain, tokenizer, folder)
    return FolderExport(Path(folder), "hf", dtype_name(target), folder_bytes(Path(folder)), dequantized, untied=untied)


def dense_dtype(model: nn.Module, name: str) -> torch.dtype:
    if name == "auto":
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if name not in DTYPES:
        raise SlimlmError(f"export: dtype {name!r} is not one of {', '.join(DTYPES)}")
    return torch_dtype(name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def plain_copy(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, dict[str, str], list[str]]:
    """A deep copy of `model` that plain transformers can hold: every StoredModule an nn.Linear of its dense weight,
    cross-layer ties copied, slimlm's config attributes dropped, every floating tensor in `dtype`. Also returns
    {module name: its storage kind} of the modules replaced and the tie targets copied."""
    plain = copy.deepcopy(model)
    untied = _untie(plain)  # first: a tied module then appears under each of its names, and is replaced under each
    dequantized, inside = {}, ()
    for name, module in stored_modules(plain):
        if name.startswith(inside):
            continue  # inside a wrapper replaced whole (an EoRA base): the wrapper's weight includes it
        inside += (name + ".",)
        plain.set_submodule(name, dense_linear(module, dtype))
        dequantized[name] = module.kind
    for key in [key for key in vars(plain.config) if key.startswith(SLIMLM_PREFIX)]:
        delattr(plain.config, key)
    plain.to(dtype)
    _check_finite(plain, dtype)
    return plain, dequantized, untied


def _untie(model: nn.Module) -> list[str]:
    """Give every recorded tie target its own copy of the shared parameter or module; the targets."""
    tied = getattr(model.config, TIED_KEY, None) or {}
    for target in tied:
        owner_name, _, attribute = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, attribute, copy.deepcopy(getattr(owner, attribute)))  # a Parameter or a module alike
    return sorted(tied)


@torch.no_grad()
def dense_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear applying what a StoredModule applies: its dense weight and its bias, in `dtype`."""
    weight, bias = module.dequantize_weight(), module_bias(module)
    # built on the meta device: the random initialisation a real nn.Linear runs would be overwritten at once
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().to(dtype))
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.device, dtype))
    return linear


def _check_finite(model: nn.Module, dtype: torch.dtype) -> None:
    """A value past float16's range becomes inf in the cast: refused rather than written."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SlimlmError(
                f"{name}: values overflow {dtype_name(dtype)} (or are NaN/inf); export with "
                "dtype='float32' or 'bfloat16'"
            )
