"""Layer streaming: compress a model bigger than memory by holding one decoder layer's weights at a time.

The model is built on the meta device (accelerate's `init_empty_weights`); only the tensors outside the decoder
layers (embeddings, final norm, LM head) are read up front. The calibration walk (`slimlm.calibrate.walk_layers`)
asks the model's `LayerStream` to load layer i just before a method visits it, and to release it once it has produced
the next layer's inputs: release writes the (possibly changed) layer to its own safetensors shard in the output
folder and turns its parameters back into meta tensors. Reads go through safetensors' memory map and copy one
layer's tensors in their stored dtype (bf16 stays bf16), so peak memory is the non-layer tensors + one layer +
the calibration activations, whatever the depth.

Every calibration-walk method (Wanda, SparseGPT, OWL, GPTQ, …) streams without knowing it. Methods that touch every
layer outside a walk (magnitude pruning, depth or width surgery) need the whole model and refuse a streamed one.
A layer released once is read back from the output on the next walk, so stages that walk twice see their own
changes. The output is a sharded Hugging Face checkpoint (index + one shard per layer) that `from_pretrained`
loads; it is written to a temporary folder and renamed into place by `finish`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimlm.errors import SlimlmError

_LAYER_PREFIX = "model.layers."
_INDEX = "model.safetensors.index.json"


def _layer_of(name: str) -> int | None:
    if not name.startswith(_LAYER_PREFIX):
        return None
    return int(name[len(_LAYER_PREFIX) :].split(".", 1)[0])


def _weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> file name, for a sharded (index.json) or single-file safetensors checkpoint."""
    index = folder / _INDEX
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = folder / "model.safetensors"
    if not single.exists():
        raise SlimlmError(f"{folder}: streaming needs safetensors weights (model.safetensors or {_INDEX})")
    with safe_open(single, framework="pt") as handle:
        return {name: single.name for name in handle.keys()}  # noqa: SIM118 - safe_open is no mapping


class LayerStream:
    """Loads decoder layers of `model` from `source` on demand and writes them to `output` when released."""

    def __init__(self, model: nn.Module, source: Path, output: Path):
        self.model, self.source = model, Path(source)
        self.output = Path(output)
        self.staging = self.output.with_name(f".{self.output.name}.partial")
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.source_map = _weight_map(self.source)
        self.written: dict[str, str] = {}  # tensor name -> shard in staging
        self.peak_layer_bytes = 0

    def _names(self, index: int) -> list[str]:
        return [name for name in self.source_map if _layer_of(name) == index]

    def _read(self, names: list[str], folder: Path, weight_map: dict[str, str]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted({weight_map[name] for name in names}):
            with safe_open(folder / file, framework="pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in names if weight_map[name] == file})
        return tensors

    def _assign(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            set_module_tensor_to_device(self.model, name, "cpu", value=tensor)

    def load_rest(self) -> None:
        """Read every tensor outside the decoder layers (embeddings, final norm, LM head)."""
        names = [name for name in self.source_map if _layer_of(name) is None]
        self._assign(self._read(names, self.source, self.source_map))
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def load(self, index: int) -> None:
        names = self._names(index)
        if names and names[0] in self.written:  # released before: read our own (changed) copy
            tensors = self._read(names, self.staging, self.written)
        else:
            tensors = self._read(names, self.source, self.source_map)
        self._assign(tensors)
        self.peak_layer_bytes = max(self.peak_layer_bytes, sum(t.numel() * t.element_size() for t in tensors.values()))

    def release(self, index: int) -> None:
        """Write layer `index` as it is now to its shard, then drop its weights back to meta."""
        shard = f"model-layer-{index:05d}.safetensors"
        state = {
            name: tensor.detach().contiguous()
            for name, tensor in self.model.state_dict().items()
            if _layer_of(name) == index
        }
        save_file(state, self.staging / shard, metadata={"format": "pt"})
        self.written.update({name: shard for name in state})
        for name in state:
            set_module_tensor_to_device(self.model, name, "meta")

    def finish(self, tokenizer=None) -> Path:
        """Write the non-layer tensors, index and config (and tokenizer), then move the folder into place."""
        missing = [name for name in self.source_map if _layer_of(name) is not None and name not in self.written]
        if missing:
            raise SlimlmError(
                f"streamed output is incomplete: {len(missing)} layer tensors were never released "
                f"(first: {missing[0]}); run a calibration walk over every layer before finish()"
            )
        state = {
            name: tensor.detach().contiguous()
            for name, tensor in self.model.state_dict().items()
            if _layer_of(name) is None and name in self.source_map
        }
        save_file(state, self.staging / "model-rest.safetensors", metadata={"format": "pt"})
        weight_map = {**self.written, **{name: "model-rest.safetensors" for name in state}}
        total = sum((self.staging / f).stat().st_size for f in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.staging / _INDEX).write_text(json.dumps(index, indent=2))
        self.model.config.save_pretrained(self.staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.staging)
        shutil.rmtree(self.output, ignore_errors=True)
        self.staging.rename(self.output)
        return self.output


def load_streamed(path: str | Path, output: str | Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A model whose decoder layers stay on the meta device until a calibration walk streams them in;
    `model.slimlm_layer_stream.finish()` writes the compressed checkpoint to `output`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    stream = LayerStream(model, path, Path(output))
    stream.load_rest()
    model.slimlm_layer_stream = stream
    return model


def layer_stream(model: nn.Module) -> LayerStream | None:
    return getattr(model, "slimlm_layer_stream", None)


def require_materialized(model: nn.Module, what: str) -> None:
    """Refuse a streamed model in a method that needs every layer's weights at once."""
    if layer_stream(model) is not None:
        raise SlimlmError(
            f"{what} needs the whole model in memory; with a layer-streamed model use a "
            "calibration-walk method (wanda, sparsegpt, gptq, ...)"
        )
