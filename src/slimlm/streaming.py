"""Layer streaming: compress a model bigger than memory by holding one decoder layer's weights at a time.

The model is built on the meta device (accelerate's `init_empty_weights`); only the tensors outside the decoder
layers (embeddings, final norm, LM head) are read up front. The calibration walk (`slimlm.calibrate.walk_layers`)
asks the model's `LayerStream` to load layer i just before a method visits it, and to release it once it has produced
the next layer's inputs: release runs the stage's layer finishers (`finishing_layers`: packing quantized Linears,
checks), writes the (possibly changed) layer to its own safetensors shard in the output folder and turns its tensors
back into meta tensors. Reads go through safetensors' memory map and copy one layer's tensors, cast to the stream's
dtype (a no-op when the checkpoint has it: bf16 stays bf16), so peak memory is the non-layer tensors + one layer +
the calibration activations (+ the method's statistics for that layer), whatever the depth.

Every calibration-walk method (Wanda, SparseGPT, OWL, GPTQ, AWQ, SmoothQuant, EoRA) streams without knowing it: a
module a method puts into a layer (packed, W8A8, EoRA wrappers) is written with the layer, stays in the model as a
meta placeholder, and `finish` describes it in config.json (storage.py's ``slimlm_storage`` section), so the output
loads with `slimlm.models.load_model` and streams again as the source of the next stage. Methods that touch every
layer outside a walk (magnitude pruning, RTN, depth or width surgery, SVD, cross-layer ties, distillation) need the
whole model and refuse a streamed one. A layer released once is read back from the output on the next walk, so
stages that walk twice see their own changes. The output is a sharded checkpoint (index + one shard per layer + the
rest), written to a temporary folder and renamed into place by `finish`.

A method that compares with the original model (EoRA) gets it as `streamed_reference`: a meta model that reads a
layer's tensors from the original checkpoint only when asked (`read_tensors`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.modules import decoder_layers
from slimlm.storage import TIED_KEY, read_config, restore_modules, write_storage_config

_LAYER_PREFIX = "model.layers."
_INDEX = "model.safetensors.index.json"
# finish(indices): what a stage does to decoder layers once its method is done with them (finishing_layers)
LayerFinisher = Callable[[list[int]], None]


def _layer_of(name: str) -> int | None:
    if not name.startswith(_LAYER_PREFIX):
        return None
    return int(name[len(_LAYER_PREFIX) :].split(".", 1)[0])


def _layer_prefix(index: int) -> str:
    return f"{_LAYER_PREFIX}{index}."


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


def checkpoint_numel(folder: str | Path) -> int:
    """Elements of every tensor of a safetensors checkpoint, from the file headers (no weight is read)."""
    folder = Path(folder)
    weight_map = _weight_map(folder)
    total = 0
    for file in sorted(set(weight_map.values())):
        with safe_open(folder / file, framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # noqa: SIM118
    return total


def _read(names: list[str], folder: Path, weight_map: dict[str, str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({weight_map[name] for name in names}):
        with safe_open(folder / file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in names if weight_map[name] == file})
    return tensors


class LayerStream:
    """Loads decoder layers of `model` from `source` on demand and writes them to `output` when released
    (`output` None: read only, for a reference model that is never written)."""

    def __init__(self, model: nn.Module, source: Path, output: Path | None, dtype: torch.dtype):
        self.model, self.source, self.dtype = model, Path(source), dtype
        self.output = None if output is None else Path(output)
        self.staging = None if output is None else self.output.with_name(f".{self.output.name}.partial")
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
        self.source_map = _weight_map(self.source)
        self.layer_count = len(decoder_layers(model))
        self.written: dict[str, str] = {}  # tensor name -> shard in staging
        self.released: set[int] = set()
        self.finishers: list[LayerFinisher] = []  # run on a layer just before it is written (finishing_layers)
        self.peak_layer_bytes = 0
        self.layer_seconds: dict[int, float] = {}  # wall time from a layer's load to the end of its release
        self._loaded_at: dict[int, float] = {}

    def _layer_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index` as last written: our own copy once released, else the source's."""
        if index in self.released:
            return _read([n for n in self.written if _layer_of(n) == index], self.staging, self.written)
        return _read([n for n in self.source_map if _layer_of(n) == index], self.source, self.source_map)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """These layer tensors (full names) as the checkpoint holds them now, without loading them into the model."""
        wanted = set(names)
        found: dict[str, torch.Tensor] = {}
        for index in sorted({_layer_of(name) for name in names}):
            found.update({n: t for n, t in self._layer_tensors(index).items() if n in wanted})
        if len(found) != len(wanted):
            raise SlimlmError(f"{self.source}: no tensor {sorted(wanted - set(found))[0]} in the checkpoint")
        return found

    def load_rest(self) -> None:
        """Read every tensor outside the decoder layers (embeddings, final norm, LM head), cast to the model's dtype."""
        names = [name for name in self.source_map if _layer_of(name) is None]
        for name, tensor in _read(names, self.source, self.source_map).items():
            set_module_tensor_to_device(self.model, name, "cpu", value=tensor)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def load(self, index: int) -> None:
        self._loaded_at[index] = time.perf_counter()
        tensors = self._layer_tensors(index)
        prefix = _layer_prefix(index)
        layer = decoder_layers(self.model)[index]
        try:  # load_state_dict, not per-tensor assignment: packed modules rebuild their kernel layout on load
            layer.load_state_dict({n.removeprefix(prefix): t for n, t in tensors.items()}, assign=True)
        except RuntimeError as err:
            raise SlimlmError(
                f"{self.source}: layer {index}'s tensors do not fit the model its config.json describes "
                f"({str(err).strip().splitlines()[-1].strip()})"
            ) from None
        layer.to(self.dtype)  # floating tensors only; packed modules keep their float16 scales (StoredModule)
        self.peak_layer_bytes = max(self.peak_layer_bytes, sum(t.numel() * t.element_size() for t in tensors.values()))

    def release(self, index: int) -> None:
        """Finish layer `index` (the stage's finishers), write it as it is now to its shard, then drop it to meta."""
        if self.staging is None:
            raise SlimlmError(f"{self.source}: a read-only stream (a reference model) cannot write layers")
        for finish in self.finishers:
            finish([index])
        layer = decoder_layers(self.model)[index]
        shard = f"model-layer-{index:05d}.safetensors"
        state = {name: t.detach().contiguous() for name, t in layer.state_dict(prefix=_layer_prefix(index)).items()}
        save_file(state, self.staging / shard, metadata={"format": "pt"})
        self.written = {name: file for name, file in self.written.items() if _layer_of(name) != index}
        self.written.update({name: shard for name in state})
        self.released.add(index)
        layer.to("meta")  # through each module's _apply: a packed module drops its kernel layout too
        if index in self._loaded_at:
            self.layer_seconds[index] = time.perf_counter() - self._loaded_at.pop(index)

    def finish(self, tokenizer=None, extra_json: dict | None = None) -> Path:
        """Write the non-layer tensors, index, config (with the storage section of slimlm's modules) and tokenizer,
        and `extra_json` files (name -> JSON-serialisable object), then move the folder into place."""
        missing = sorted(set(range(self.layer_count)) - self.released)
        if missing:
            raise SlimlmError(
                f"streamed output is incomplete: {len(missing)} decoder layers were never released "
                f"(first: layer {missing[0]}); run a calibration walk over every layer before finish()"
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
        write_storage_config(self.staging, self.model)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.staging)
        for name, payload in (extra_json or {}).items():
            (self.staging / name).write_text(json.dumps(payload, indent=2))
        shutil.rmtree(self.output, ignore_errors=True)
        self.staging.rename(self.output)
        return self.output


def _meta_model(path: Path, dtype: torch.dtype) -> nn.Module:
    """The model `path`'s config.json describes, every parameter on meta, slimlm's own modules (a compressed source:
    packed, W8A8, EoRA ...) in place as meta placeholders."""
    from transformers import AutoModelForCausalLM

    config, section = read_config(path)
    if getattr(config, TIED_KEY, None):
        raise SlimlmError(
            f"{path}: has cross-layer ties (share: tie_layers), whose tensors live in another layer's shard; "
            "streaming needs each layer's tensors in its own layer"
        )
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if section is not None:
            restore_modules(model, section)
    return model.eval()


def load_streamed(path: str | Path, output: str | Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A model whose decoder layers stay on the meta device until a calibration walk streams them in, computed and
    written in `dtype`; `model.slimlm_layer_stream.finish()` writes the compressed checkpoint to `output`."""
    path = Path(path)
    model = _meta_model(path, dtype)
    stream = LayerStream(model, path, Path(output), dtype)
    stream.load_rest()
    model.slimlm_layer_stream = stream
    return model


def streamed_reference(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A read-only meta model of the checkpoint at `path` (the original a method compares with): nothing is read
    until `read_tensors` asks for a layer's tensors."""
    path = Path(path)
    model = _meta_model(path, dtype)
    model.slimlm_layer_stream = LayerStream(model, path, None, dtype)
    return model


def layer_stream(model: nn.Module) -> LayerStream | None:
    return getattr(model, "slimlm_layer_stream", None)


def read_tensors(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Decoder-layer tensors of `model` by full name: from memory where they are, else (a streamed model's layer not
    loaded now) read from its checkpoint."""
    found = {name: _member(model, name) for name in names}
    on_meta = [name for name, tensor in found.items() if tensor.device.type == "meta"]
    stream = layer_stream(model)
    if on_meta and stream is not None:
        found.update(stream.read(on_meta))
    return found


def _member(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(owner), attribute)


@contextmanager
def finishing_layers(model: nn.Module, finish: LayerFinisher) -> Iterator[None]:
    """Within the block a method works on the decoder layers; `finish(indices)` then does what the stage does to a
    layer once the method is done with it. On a streamed model it runs on each layer just before the layer is written
    (so the layer's final form, not its intermediate one, goes to disk and memory), otherwise once for every layer
    when the block ends. Not run when the block raises."""
    stream = layer_stream(model)
    if stream is None:
        yield
        finish(list(range(len(decoder_layers(model)))))
        return
    stream.finishers.append(finish)
    try:
        yield
    finally:
        stream.finishers.remove(finish)


def require_materialized(model: nn.Module, what: str) -> None:
    """Refuse a streamed model in a method that needs every layer's weights at once."""
    if layer_stream(model) is not None:
        raise SlimlmError(
            f"{what} needs the whole model in memory; with a layer-streamed model use a "
            "calibration-walk method (wanda, sparsegpt, gptq, awq, smoothquant, eora)"
        )
