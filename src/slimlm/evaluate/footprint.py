"""How big a model is: parameters (total and nonzero), per-layer sparsity, bytes on disk, and peak memory.

Tied tensors (LM head sharing the token embedding) are counted once: a model's size is the storage it needs,
not the number of names pointing into it. "Nonzero" counts exact zeros only, which is what unstructured
pruning produces; sparsity only saves memory once an export stores it sparsely, so both figures are reported.

A module holding its weight in buffers (packed codes and scales, int8 weights, codebook indices: every StoredModule
whose ``weights_in_buffers()`` is non-zero, slimlm/storage.py) counts as the out × in parameters it stands for,
nonzero where a code dequantizes to a nonzero value, so params_total does not drop after quantization and
bits_per_weight = 8 · size_on_disk / params_total is the stored bits per weight.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import psutil
import torch
from torch import nn

from slimlm.evaluate.records import Record
from slimlm.modules import decoder_layers, named_decoder_linears
from slimlm.storage import StoredModule, weight_modules

# Weight formats in the order from_pretrained prefers them: a folder holding both safetensors and a .bin copy
# is loaded (and therefore sized) from the safetensors only.
_WEIGHT_SUFFIX_PREFERENCE = ((".safetensors",), (".bin", ".pt", ".pth", ".ckpt"), (".gguf",))
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_SAMPLE_SECONDS = 0.02


def _unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    # named_parameters already drops repeated Parameter objects; the storage check also catches two Parameters
    # viewing the same memory (ties made by assigning .data).
    seen, unique = set(), []
    for _, param in model.named_parameters(remove_duplicate=True):
        key = (param.device, param.data_ptr(), param.numel()) if param.device.type != "meta" else id(param)
        if key not in seen:
            seen.add(key)
            unique.append(param)
    return unique


def _count_nonzero(tensor: torch.Tensor) -> int:
    return int(torch.count_nonzero(tensor.detach()).item())


def _packed_linears(model: nn.Module) -> list[StoredModule]:
    """The modules holding a weight in buffers (packed codes, int8, codebook indices), from the storage registry."""
    return [module for _, module in weight_modules(model)]


def _parameter_total(model: nn.Module) -> int:
    """Unique parameters plus the weights packed Linears stand for."""
    packed = sum(module.weights_in_buffers() for module in _packed_linears(model))
    return sum(p.numel() for p in _unique_parameters(model)) + packed


def _decoder_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, weight) of every decoder Linear in model order, a packed one's weight dequantized (one at a time); a
    packed LM head (quantize.lm_head) is not one."""
    plain = {id(linear) for _, linear in named_decoder_linears(model)}
    inside = {id(module) for layer in decoder_layers(model) for module in layer.modules()}
    packed = {id(module) for module in _packed_linears(model) if id(module) in inside}
    for name, module in model.named_modules():
        if id(module) in plain:
            yield name, module.weight
        elif id(module) in packed:
            yield name, module.dequantize_weight()


def parameter_counts(model: nn.Module) -> dict:
    """Parameters of `model`, tied tensors once.

    ``linear_*`` cover the weights of the decoder's Linear projections (q/k/v/o, gate/up/down: what pruning
    acts on, packed ones included), not biases and not the LM head.
    """
    params = _unique_parameters(model)
    packed_nonzero = sum(_count_nonzero(module.dequantize_weight()) for module in _packed_linears(model))
    linear_total = linear_nonzero = 0
    for _, weight in _decoder_weights(model):
        linear_total += weight.numel()
        linear_nonzero += _count_nonzero(weight)
    return {
        "total": _parameter_total(model),
        "nonzero": sum(_count_nonzero(p) for p in params) + packed_nonzero,
        "linear_total": linear_total,
        "linear_nonzero": linear_nonzero,
    }


def layer_sparsity(model: nn.Module) -> list[dict]:
    """One row per decoder Linear: its full name, weight shape and fraction of exactly-zero weights."""
    rows = []
    for name, weight in _decoder_weights(model):
        rows.append(
            {
                "name": name,
                "shape": tuple(weight.shape),
                "sparsity": 1.0 - _count_nonzero(weight) / weight.numel(),
            }
        )
    return rows


def weight_files(path: str | Path) -> list[Path]:
    """The weight files a model at `path` is loaded from: the file itself, or a folder's files of one format."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no model file or folder at {path}")
    files = [f for f in sorted(path.iterdir()) if f.is_file()]
    for suffixes in _WEIGHT_SUFFIX_PREFERENCE:
        chosen = [f for f in files if f.name.endswith(suffixes)]
        if chosen:
            return chosen
    return []


def size_on_disk(path: str | Path) -> int:
    """Bytes of the weight files at `path` (a model folder or one file); tokenizer and config files not included."""
    return sum(f.stat().st_size for f in weight_files(path))


def dense_sizes(model: nn.Module) -> dict:
    """Bytes a dense copy of the unique parameters would take in fp32 and in bf16."""
    total = _parameter_total(model)
    return {"fp32": total * 4, "bf16": total * 2}


def _is_2_of_4(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs (the layout sparse tensor cores accelerate)."""
    if weight.shape[-1] % 4:
        return False
    return bool(((weight.detach().reshape(-1, 4) != 0).sum(dim=-1) <= 2).all())


def sparse_format_sizes(model: nn.Module, value_bytes: int = 2) -> dict:
    """Bytes the model would take with its decoder Linear weights in a sparse storage format, values in
    `value_bytes` (2 = bf16/fp16), every other tensor dense at the same width.

    ``bitmask``: one bit per weight plus the nonzero values (compressed-tensors' bitmask format).
    ``2:4``: the kept values plus 2 bits of position each (NVIDIA's 2:4 metadata); None unless every decoder
    Linear is 2:4 sparse.
    """
    params = _unique_parameters(model)
    linear_ids = {id(linear.weight) for _, linear in named_decoder_linears(model)}
    other = sum(p.numel() for p in params if id(p) not in linear_ids) * value_bytes
    bitmask = two_four = 0.0
    all_2_of_4, count = True, 0
    for _, weight in _decoder_weights(model):  # packed weights are dequantized one at a time
        bitmask += weight.numel() / 8 + _count_nonzero(weight) * value_bytes
        two_four += weight.numel() // 2 * (value_bytes + 0.25)
        all_2_of_4 = all_2_of_4 and _is_2_of_4(weight)
        count += 1
    return {"bitmask": int(other + bitmask), "2:4": int(other + two_four) if all_2_of_4 and count else None}


def _sparse_format_records(sizes: dict, base: dict) -> list[Record]:
    protocol = {**base, "values": "bf16", "other_tensors": "dense bf16", "computed": "not written to disk"}
    note = "the size a sparse storage format would take; slimlm saves dense tensors, and dense kernels gain no speed"
    records = [
        Record(
            "size",
            "sparse_bitmask_bf16_bytes",
            sizes["bitmask"],
            "bytes",
            False,
            {**protocol, "format": "1-bit mask per weight + nonzero values"},
            note,
        )
    ]
    if sizes["2:4"] is not None:
        records.append(
            Record(
                "size",
                "sparse_2of4_bf16_bytes",
                sizes["2:4"],
                "bytes",
                False,
                {**protocol, "format": "2 kept values per 4 + 2-bit index each"},
                note,
            )
        )
    return records


def _in_memory_bits(model: nn.Module) -> float:
    tensors = _unique_parameters(model) + [buffer for module in _packed_linears(model) for buffer in module.buffers()]
    return sum(t.numel() * t.element_size() * 8 for t in tensors) / max(1, _parameter_total(model))


def footprint_records(model: nn.Module, model_path: str | Path | None = None) -> list[Record]:
    """Size records (task "size"); `model_path` is the saved folder, or the .gguf file for GGUF models."""
    counts = parameter_counts(model)
    dense = dense_sizes(model)
    linear_sparsity = 1.0 - counts["linear_nonzero"] / counts["linear_total"] if counts["linear_total"] else 0.0
    base = {"tied_tensors": "counted once"}
    records = [
        Record("size", "params_total", counts["total"], "params", None, dict(base)),
        Record(
            "size",
            "params_nonzero",
            counts["nonzero"],
            "params",
            None,
            {**base, "zero_means": "exactly 0.0"},
            note=f"decoder Linear sparsity {linear_sparsity:.4f}",
        ),
    ]
    if model_path is not None:
        files = weight_files(model_path)
        disk = size_on_disk(model_path)
        disk_protocol = {"path": str(model_path), "files": [f.name for f in files]}
        records.append(Record("size", "size_on_disk", disk, "bytes", False, disk_protocol))
        bits = 8 * disk / counts["total"]
        bits_protocol = {"basis": "size_on_disk", **disk_protocol}
    else:
        bits = _in_memory_bits(model)
        bits_protocol = {"basis": "in-memory dtypes", "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    records += [
        Record("size", "dense_fp32_bytes", dense["fp32"], "bytes", False, dict(base)),
        Record("size", "dense_bf16_bytes", dense["bf16"], "bytes", False, dict(base)),
        Record("size", "bits_per_weight", bits, "bits", False, {**bits_protocol, "per": "params_total"}),
    ]
    sparse = sparse_format_sizes(model)
    if sparse["bitmask"] < dense["bf16"]:  # only once a sparse format would pay off
        records += _sparse_format_records(sparse, base)
    return records


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} missing from {_STATUS}")
    return int(match.group(1)) * 1024


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False when this kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        # Some sandboxes accept the write and ignore it: after a real reset the mark equals the current RSS.
        return _status_bytes("VmHWM") <= _status_bytes("VmRSS") + (1 << 20)
    except OSError:
        return False


class PeakMemory:
    """Peak resident memory (RSS) of this process inside a ``with`` block, plus peak CUDA memory when there is a GPU.

    On Linux the kernel's high-water mark (VmHWM) is reset on entry and read on exit, so nothing is missed;
    elsewhere a thread samples RSS every 20 ms and may miss short spikes (``method`` says which).
    Nested blocks are allowed: an inner reset first banks the outer blocks' peak so far.
    """

    _active: ClassVar[list[PeakMemory]] = []

    def __init__(self):
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None
        self.method: str | None = None
        self.peak_cuda_bytes: int | None = None
        self._banked_peak = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        for outer in PeakMemory._active:
            if outer.method == "VmHWM":
                outer._banked_peak = max(outer._banked_peak, _status_bytes("VmHWM"))
        self.start_bytes = psutil.Process().memory_info().rss
        if _reset_high_water_mark():
            self.method = "VmHWM"
        else:
            self.method = "sampled"
            self._banked_peak = self.start_bytes
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        PeakMemory._active.append(self)
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(_SAMPLE_SECONDS):
            self._banked_peak = max(self._banked_peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        PeakMemory._active.remove(self)
        if self.method == "VmHWM":
            self.peak_bytes = max(self._banked_peak, _status_bytes("VmHWM"))
        else:
            self._stop.set()
            self._sampler.join()
            self.peak_bytes = max(self._banked_peak, psutil.Process().memory_info().rss)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_cuda_bytes = torch.cuda.max_memory_allocated()


def peak_memory_record(peak: PeakMemory, what: str) -> Record:
    """The block's peak RSS as a "memory" record; the CUDA peak (if any) and the RSS on entry go in the protocol."""
    protocol = {"method": peak.method, "rss_at_start_bytes": peak.start_bytes}
    if peak.peak_cuda_bytes is not None:
        protocol["peak_cuda_allocated_bytes"] = peak.peak_cuda_bytes
    return Record("memory", f"peak_rss_{what}", peak.peak_bytes, "bytes", False, protocol)
