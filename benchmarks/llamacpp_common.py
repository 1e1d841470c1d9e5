"""What the llama.cpp benchmarks (vs_llamacpp.py, decode.py) share: llama-quantize with its log kept, facts read
back from a GGUF file, splicing tensors into one, and the machine's memory read bandwidth that bounds decode."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from slimlm.export import llamacpp as lcpp

EMBD = "token_embd.weight"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- llama.cpp tools ---------------------------------------------------------------------------------------------


def quantize_llama(src: Path, dst: Path, qtype: str, imatrix: Path | None, logs: Path) -> float:
    """llama-quantize, keeping its output (run_quantize returns none; the fallback warnings are in it)."""
    temporary = dst.with_name(f".{dst.name}.tmp")  # renamed into place: an interrupted run leaves no half file
    args = (["--imatrix", str(imatrix)] if imatrix else []) + [str(src), str(temporary), qtype, "2"]
    start = time.perf_counter()
    try:
        done = lcpp.run_tool("llama-quantize", args)
        os.replace(temporary, dst)
    finally:
        temporary.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    (logs / f"{dst.stem}.quantize.log").write_text(done.stdout + done.stderr)
    return seconds


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- GGUF files --------------------------------------------------------------------------------------------------


def gguf_facts(path: Path) -> dict:
    """File bytes, tensor bytes, parameters, and the tensor types actually in the file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types = Counter()
    linear_types = Counter()
    embd_type, embd_bytes, tensor_bytes, params = None, 0, 0, 0
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        types[kind] += 1
        tensor_bytes += int(tensor.n_bytes)
        params += int(tensor.n_elements)
        if tensor.name == EMBD:
            embd_type, embd_bytes = kind, int(tensor.n_bytes)
        elif len(tensor.shape) >= 2 and int(tensor.shape[1]) > 1:
            linear_types[kind] += 1
    return {
        "file_bytes": path.stat().st_size,
        "tensor_bytes": tensor_bytes,
        "parameters": params,
        "token_embd_type": embd_type,
        "token_embd_bytes": embd_bytes,
        "tensor_types": dict(types),
        "linear_tensor_types": dict(linear_types),
    }


def splice_gguf(meta_from: Path, out: Path, replace: dict[str, tuple[np.ndarray, object]]) -> None:
    """Copy `meta_from` (metadata and tensors, in order) into `out`, with some tensors replaced by
    (block bytes uint8 [rows, bytes] or floats, GGML type); written beside `out`, then renamed into place."""
    import gguf

    reader = gguf.GGUFReader(str(meta_from))
    temporary = out.with_name(f".{out.name}.tmp")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(temporary), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    datas = []
    for tensor in reader.tensors:
        data, qtype = replace.get(tensor.name, (tensor.data, tensor.tensor_type))
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, qtype)
        datas.append(data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in datas:
        writer.write_tensor_data(data)
    writer.close()
    os.replace(temporary, out)


def tensor_array(path: Path, name: str):
    import gguf

    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.name == name:
            return tensor
    raise KeyError(f"{path}: no tensor {name}")


# --- memory bandwidth --------------------------------------------------------------------------------------------


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict:
    """Best-of-`repeats` streaming read of a float32 array much larger than the caches (L3 here: 32 MiB) with
    `max` (a vectorized, memory-bound reduction; np.sum's pairwise float loop is compute-bound at ~18 GB/s on this
    CPU), on 1 thread and on 2 threads (halves)."""
    array = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    halves = np.array_split(array, 2)

    def one() -> float:
        start = time.perf_counter()
        array.max()
        return array.nbytes / (time.perf_counter() - start)

    def two() -> float:
        threads = [threading.Thread(target=part.max) for part in halves]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return array.nbytes / (time.perf_counter() - start)

    load = os.getloadavg()[0]
    single = max(one() for _ in range(repeats))
    double = max(two() for _ in range(repeats))
    return {
        "bytes": array.nbytes,
        "repeats": repeats,
        "gbps_1_thread": single / 1e9,
        "gbps_2_threads": double / 1e9,
        "gbps": max(single, double) / 1e9,
        "loadavg_1min": load,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "method": f"numpy float32 max over a 1 GiB array (1 thread, and 2 threads on halves), best of {repeats}",
    }
