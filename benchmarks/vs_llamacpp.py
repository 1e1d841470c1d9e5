"""slimlm's quantizers side by side with llama.cpp's `llama-quantize`, scored by llama.cpp itself.

Same source weights: the built-in SmolLM2-135M (dequantized from its Q4_1 GGUF: every Linear weight sits on a 4-bit
asymmetric group-32 grid, so Q4_1 would give those weights back exactly and is left out), exported once by slimlm
as an f32 GGUF. Same scorer for every row: `llama-perplexity -c 512 --chunks N` on WikiText-2 test
(`wiki.test.raw` as is), KL divergence and same-top-1 against the f32 model's log-probs (`--kl-divergence-base`,
written once from the f32 GGUF), prefill / decode tokens/s from `llama-bench -t 2 -p 128 -n 64 -r 3`, with the
1-minute load average read before and after each speed figure.

Rows
- llama.cpp: `llama-quantize` from the f32 GGUF to Q8_0, Q4_0, IQ4_NL, Q4_K_M, Q3_K_M, Q2_K, each without and
  with an importance matrix from `llama-imatrix -c 512` on the f32 GGUF over C4 calibration text: the very
  4 x 2048 tokens slimlm calibrates on (c4, seed 0), decoded to text and written to `<work>/c4-calibration.txt`.
  The tensor types it actually chose are read back from each file (its k-quants need rows that are multiples of
  256: SmolLM2's 576-wide matrices fall back to other types, and the tied token_embd goes Q6_K -> Q8_0).
- slimlm: RTN, GPTQ (attention-weighted v_proj, its default) and AWQ at 4-bit symmetric group 32 and 8-bit
  group 32, calibrated on the same 4 x 2048 c4 tokens (seed 0), exported by `slimlm.export.gguf.export_gguf`
  code for code as Q4_0 / Q8_0. slimlm keeps the token embedding dense; the exporter writes it as f16
  (dtype="f16"; it has no quantized-embedding option), which is most of the size gap to llama.cpp's files.
- rows marked "emb Q8_0†": the same slimlm GGUF with token_embd replaced by gguf-py's reference Q8_0 of the
  f32 embedding (a post-processing step of this script, NOT slimlm's exporter; the bytes equal llama-quantize's
  own Q8_0 token_embd, checked and recorded). Only these rows have llama.cpp's embedding and can be compared at
  equal file size.
- "GPTQ mix" rows: per tensor, the Q4_0 / Q5_0 / Q8_0 blocks of independent GPTQ W4 / W5 / W8 g32 runs,
  allocated greedily under a byte budget (the size of llama.cpp's Q4_K_M or Q3_K_M file) by a cheap proxy:
  the Fisher-weighted error sum_ij F_ij (W^_ij - W_ij)^2 (F: squared gradients of the dense model's loss on the
  calibration tokens), or the output error sum_ij E[x_j^2] (W^_ij - W_ij)^2.

Also measured: this machine's memory read bandwidth (numpy float32 max over a 1 GiB array, 1 and 2 threads, best of
several) and, per row, the decode bound bandwidth / bytes read per token (all tensor bytes of the GGUF: every
Linear once, plus token_embd read whole by the tied output head; the embedding lookup reads one row).

    python benchmarks/vs_llamacpp.py [--chunks 80] [--only REGEX] [--redo REGEX] [--out PATH] [--work DIR]

Resumable: rows already in --out are skipped (--redo REGEX measures them again); work files (GGUFs, the KLD base,
the imatrix, logs) stay in --work and are reused.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
LLAMA_TYPES = ("Q8_0", "Q4_0", "IQ4_NL", "Q4_K_M", "Q3_K_M", "Q2_K")
SLIM_METHODS = ("rtn", "gptq", "awq")
CALIB_SAMPLES, CALIB_SEQ_LEN, CALIB_SEED = 4, 2048, 0
BENCH = {"threads": 2, "prompt": 128, "gen": 64, "repetitions": 3}
EMBD = "token_embd.weight"
SLIM_TIER = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}
SHORT = {  # Hugging Face projection -> GGUF tensor kind
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
PROXIES = {
    "fisher": "sum_ij F_ij (W^_ij - W_ij)^2, F the empirical Fisher diagonal (squared gradients of the dense model's "
    "next-token loss, 16 slices of 512 of the 4 x 2048 calibration tokens)",
    "output": "sum_ij E[x_j^2] (W^_ij - W_ij)^2 (the Linear's output error), E[x_j^2] of the dense model's Linear "
    "inputs on the 4 x 2048 calibration tokens",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# --- llama.cpp tools ---------------------------------------------------------------------------------------------

from slimlm.export import llamacpp as lcpp  # noqa: E402  (the colleague's module: tools, runs, parsing)


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
    import hashlib

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

    load = loadavg()
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


# --- the benchmark -----------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    priority: int  # processing order (lower first); the table keeps the display order
    build: Callable[[], tuple[Path, dict]]  # -> (GGUF path, what to record about how it was made)
    group: str


class Bench:
    def __init__(self, args):
        self.args = args
        self.work: Path = args.work
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.wiki = Path(_shared_dir()) / "wikitext-2-raw-v1" / "wiki.test.raw"
        self.f32 = self.work / "f32.gguf"
        self.kld_base = self.work / f"f32-c512-chunks{args.chunks}.kld"
        self.calib_txt = self.work / "c4-calibration.txt"
        self.imatrix = self.work / "c4-calibration.imatrix.gguf"
        self._dense = None
        self._windows = None
        payload = json.loads(args.out.read_text()) if args.out.exists() else {}
        if payload and payload.get("protocol", {}).get("chunks") != args.chunks:
            log(f"{args.out} was measured with other --chunks: starting a new table")
            payload = {}
        self.payload = payload
        self.rows: dict = payload.get("rows", {})
        self.skipped: dict = payload.get("skipped", {})
        self.meta: dict = payload.get("inputs", {})

    # inputs ------------------------------------------------------------------------------------------------------

    def dense(self):
        if self._dense is None:
            import torch

            from slimlm.data import calibration_windows, load_text
            from slimlm.models import load_model

            torch.set_grad_enabled(False)
            loaded = load_model("smollm2-135m")
            self._dense = loaded
            self._windows = calibration_windows(
                loaded.tokenizer, load_text("c4"), CALIB_SAMPLES, CALIB_SEQ_LEN, CALIB_SEED
            )
        return self._dense

    def ensure_f32(self) -> None:
        if not self.f32.exists():
            from slimlm.export.gguf import export_gguf

            loaded = self.dense()
            log("exporting the f32 GGUF")
            summary = export_gguf(loaded.model, loaded.tokenizer, self.f32, dtype="f32")
            self.meta["f32_export"] = summary.line()
        if not self.kld_base.exists():
            log(f"llama-perplexity on the f32 GGUF, writing the KLD base {self.kld_base.name}")
            temporary = self.kld_base.with_name(self.kld_base.name + ".tmp")
            result = lcpp.run_perplexity(
                self.f32, self.wiki, ctx=512, chunks=self.args.chunks, threads=2, save_kld_base=temporary
            )
            os.replace(temporary, self.kld_base)
            (self.logs / "f32.perplexity.log").write_text(result["raw"])

    def ensure_imatrix(self) -> Path:
        if not self.calib_txt.exists():
            loaded = self.dense()
            text = "\n\n".join(loaded.tokenizer.decode(window.tolist()) for window in self._windows)
            self.calib_txt.write_text(text, encoding="utf-8")
        self.meta["imatrix_text"] = {
            "file": str(self.calib_txt),
            "what": f"the {CALIB_SAMPLES} x {CALIB_SEQ_LEN} c4 calibration windows slimlm uses "
            f"(slimlm.data.calibration_windows(tokenizer, load_text('c4'), {CALIB_SAMPLES}, {CALIB_SEQ_LEN}, "
            f"seed {CALIB_SEED}): seeded random offsets into the joined 1,000-document C4 train prefix), decoded "
            "to text and joined with blank lines",
            "chars": len(self.calib_txt.read_text(encoding="utf-8")),
        }
        if not self.imatrix.exists():
            self.ensure_f32()
            log("llama-imatrix on the f32 GGUF over the c4 calibration text")
            start = time.perf_counter()
            temporary = self.imatrix.with_name("tmp-" + self.imatrix.name)
            lcpp.run_imatrix(self.f32, self.calib_txt, ctx=512, threads=2, output=temporary)
            os.replace(temporary, self.imatrix)
            self.meta["imatrix_seconds"] = time.perf_counter() - start
        self.meta["imatrix"] = f"llama-imatrix -c 512 -t 2 --no-ppl (all chunks of {self.calib_txt.name})"
        return self.imatrix

    # builders ----------------------------------------------------------------------------------------------------

    def llama_file(self, qtype: str, imatrix: bool) -> tuple[Path, dict]:
        self.ensure_f32()
        matrix = self.ensure_imatrix() if imatrix else None
        path = self.work / f"llama-{qtype}{'-imatrix' if imatrix else ''}.gguf"
        info = {"tool": "llama-quantize", "type": qtype, "imatrix": imatrix}
        if not path.exists():
            log(f"llama-quantize {qtype}{' with imatrix' if imatrix else ''}")
            info["quantize_seconds"] = quantize_llama(self.f32, path, qtype, matrix, self.logs)
        quant_log = self.logs / f"{path.stem}.quantize.log"
        if quant_log.exists():
            text = quant_log.read_text()
            info["fallbacks"] = re.findall(
                r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by (\d+)[^>]*-> falling back to\s+(\S+)", text
            )
            info["fallback_summary"] = next(
                iter(re.findall(r"WARNING: (\d+ of \d+ tensor\(s\) required fallback quantization)", text)), None
            )
        return path, info

    def slim_model_file(self, method: str, bits: int) -> tuple[Path, dict]:
        """slimlm quantize stage (method, bits, sym, group 32) on a copy of the dense model, exported by
        export_gguf with the token embedding as f16."""
        path = self.work / f"slimlm-{method}-w{bits}g32.gguf"
        info_path = path.with_suffix(".json")
        if path.exists() and info_path.exists():
            return path, json.loads(info_path.read_text())
        from slimlm.calibration import Calibration
        from slimlm.export.gguf import export_gguf
        from slimlm.recipe import CalibrationConfig
        from slimlm.registry import StageContext, get_stage

        loaded = self.dense()
        options = {"method": method, "bits": bits, "group_size": 32, "sym": True}
        log(f"slimlm quantize {options}")
        config = CalibrationConfig(data="c4", samples=CALIB_SAMPLES, seq_len=CALIB_SEQ_LEN, seed=CALIB_SEED)
        scratch = self.work / f"scratch-{method}-{bits}"
        scratch.mkdir(exist_ok=True)
        context = StageContext(
            loaded.tokenizer,
            Calibration(config, loaded.tokenizer, windows=self._windows),
            scratch,
            load_original=lambda: loaded.model,
        )
        spec = get_stage("quantize")
        model = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        model = spec.apply(model, spec.options_model(options).model_validate(options), context)
        seconds = time.perf_counter() - start
        summary = export_gguf(model, loaded.tokenizer, path, dtype="f16")
        info = {
            "tool": "slimlm",
            "stage": {"quantize": options},
            "calibration": {"data": "c4", "samples": CALIB_SAMPLES, "seq_len": CALIB_SEQ_LEN, "seed": CALIB_SEED},
            "quantize_seconds": seconds,
            "export": summary.line() + " (export_gguf dtype='f16': the dense token embedding as f16)",
            "notes": context.notes,
        }
        info_path.write_text(json.dumps(info, indent=2))
        del model
        return path, info

    def embedding_q8(self) -> tuple[np.ndarray, object]:
        """gguf-py's reference Q8_0 of the f32 model's token embedding (block bytes), and whether its bytes equal
        those llama-quantize wrote."""
        import gguf

        self.ensure_f32()
        floats = np.asarray(tensor_array(self.f32, EMBD).data, dtype=np.float32)
        blocks = gguf.quants.quantize(floats, gguf.GGMLQuantizationType.Q8_0)
        theirs = self.work / "llama-Q4_0.gguf"
        if theirs.exists() and "embd_q8_equals_llama_quantize" not in self.meta:
            other = tensor_array(theirs, EMBD)
            self.meta["embd_q8_equals_llama_quantize"] = bool(
                other.tensor_type == gguf.GGMLQuantizationType.Q8_0 and np.array_equal(np.asarray(other.data), blocks)
            )
        return blocks, gguf.GGMLQuantizationType.Q8_0

    def slim_q8emb_file(self, method: str, bits: int) -> tuple[Path, dict]:
        source, info = self.slim_model_file(method, bits)
        path = self.work / f"slimlm-{method}-w{bits}g32-embq8.gguf"
        if not path.exists():
            log(f"token_embd -> Q8_0 in {source.name}")
            splice_gguf(source, path, {EMBD: self.embedding_q8()})
        return path, {
            **info,
            "post_process": "token_embd replaced by gguf-py's Q8_0 of the f32 embedding "
            "(this script, not slimlm's exporter)",
        }

    def input_second_moments(self) -> dict[str, np.ndarray]:
        """E[x_j^2] of the input of every decoder Linear on the calibration windows (dense model), by GGUF name."""
        cache = self.work / "input-second-moments.npz"
        if cache.exists():
            return dict(np.load(cache))
        import torch

        loaded = self.dense()
        sums: dict[str, torch.Tensor] = {}
        counts: Counter = Counter()
        hooks = []
        for name, module in loaded.model.named_modules():
            match = re.search(r"layers\.(\d+)\.\w+\.(\w+_proj)$", name)
            if match and isinstance(module, torch.nn.Linear):
                key = f"blk.{match[1]}.{SHORT[match[2]]}.weight"

                def hook(_module, inputs, _output, key=key):
                    x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
                    sums[key] = sums.get(key, 0) + (x * x).sum(0)
                    counts[key] += x.shape[0]

                hooks.append(module.register_forward_hook(hook))
        log("input second moments of every Linear on the calibration windows")
        try:
            for window in self._windows:
                loaded.model(window[None])
        finally:
            for h in hooks:
                h.remove()
        moments = {key: (sums[key] / counts[key]).float().numpy() for key in sums}
        np.savez(cache, **moments)
        return moments

    def fisher_diagonal(self) -> dict[str, np.ndarray]:
        """Empirical Fisher diagonal E[g_ij^2] of every decoder Linear weight (dense model; g the gradient of the
        next-token loss of one 512-token slice of the calibration windows, 16 slices), by GGUF name, rows in the
        GGUF's order (q/k permuted as the exporter permutes them)."""
        cache = self.work / "fisher-diagonal.npz"
        if cache.exists():
            return dict(np.load(cache))
        import torch

        from slimlm.export.gguf import permute_rows

        loaded = self.dense()
        model, config = loaded.model, loaded.model.config
        linears = {}
        for name, module in model.named_modules():
            match = re.search(r"layers\.(\d+)\.\w+\.(\w+_proj)$", name)
            if match and isinstance(module, torch.nn.Linear):
                linears[f"blk.{match[1]}.{SHORT[match[2]]}.weight"] = module
        sums = {key: torch.zeros_like(module.weight) for key, module in linears.items()}
        slices = self._windows.reshape(-1, 512)
        log(f"empirical Fisher diagonal over {len(slices)} slices of 512 calibration tokens")
        try:
            with torch.enable_grad():
                for tokens in slices:
                    model.zero_grad(set_to_none=True)
                    model(tokens[None], labels=tokens[None]).loss.backward()
                    for key, module in linears.items():
                        sums[key] += module.weight.grad.detach() ** 2
        finally:
            model.zero_grad(set_to_none=True)
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
        fisher = {}
        for key, total in sums.items():
            values = (total / len(slices)).numpy()
            kind = key.split(".")[2]
            fisher[key] = permute_rows(values, heads[kind]) if kind in heads else values
        np.savez(cache, **fisher)
        return fisher

    def mix_file(self, budget_row: str, budget_path: Path, proxy: str = "fisher") -> tuple[Path, dict]:
        """Per-tensor choice among GPTQ Q4_0 / Q5_0 / Q8_0 blocks, greedy by proxy-error drop per byte, with the
        whole file at most the size of `budget_path`. proxy "fisher": sum_ij F_ij (W^_ij - W_ij)^2 with the
        empirical Fisher diagonal; "output": sum_ij E[x_j^2] (W^_ij - W_ij)^2 (the Linear's output error)."""
        import gguf

        tag = re.sub(r"\W+", "-", budget_row).strip("-")
        path = self.work / f"slimlm-gptq-mix-{proxy}-{tag}.gguf"
        info_path = path.with_suffix(".json")
        if path.exists() and info_path.exists():
            return path, json.loads(info_path.read_text())
        budget = budget_path.stat().st_size
        tiers = {bits: self.slim_q8emb_file("gptq", bits)[0] for bits in (4, 5, 8)}
        moments = self.fisher_diagonal() if proxy == "fisher" else self.input_second_moments()
        readers = {bits: gguf.GGUFReader(str(p)) for bits, p in tiers.items()}
        reference = {t.name: t for t in gguf.GGUFReader(str(self.f32)).tensors}
        tensors = {bits: {t.name: t for t in r.tensors} for bits, r in readers.items()}
        errors: dict[str, dict[int, float]] = {}
        sizes: dict[str, dict[int, int]] = {}
        log("proxy errors of every Linear at Q4_0 / Q5_0 / Q8_0")
        for name in moments:
            exact = np.asarray(reference[name].data, dtype=np.float32)
            errors[name], sizes[name] = {}, {}
            for bits in tiers:
                tensor = tensors[bits][name]
                values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
                squared = (values - exact).astype(np.float64) ** 2
                weight = moments[name].astype(np.float64)
                errors[name][bits] = float((squared * weight).sum() if weight.ndim == 2 else (squared @ weight).sum())
                sizes[name][bits] = int(tensor.n_bytes)
        chosen = {name: 4 for name in moments}
        base_size = tiers[4].stat().st_size
        margin = 64 * 1024  # alignment padding and header differences; checked on the written file below
        spend = base_size
        order: list[tuple[str, int, int]] = []  # (tensor, from, to) in the order chosen
        while True:
            best = None
            for name, bits in chosen.items():
                for up in (b for b in tiers if b > bits):
                    cost = sizes[name][up] - sizes[name][bits]
                    gain = errors[name][bits] - errors[name][up]
                    if spend + cost <= budget - margin and gain > 0 and (best is None or gain / cost > best[0]):
                        best = (gain / cost, name, up, cost)
            if best is None:
                break
            _, name, up, cost = best
            order.append((name, chosen[name], up))
            chosen[name] = up
            spend += cost
        while True:
            replace = {
                n: (np.asarray(tensors[b][n].data), tensors[b][n].tensor_type) for n, b in chosen.items() if b != 4
            }
            splice_gguf(tiers[4], path, replace)
            if path.stat().st_size <= budget or not order:
                break
            name, previous, _ = order.pop()  # over budget: undo the last upgrade and write again
            chosen[name] = previous
        counts = Counter(SLIM_TIER[b] for b in chosen.values())
        info = {
            "tool": "slimlm",
            "mix": {
                "budget_from": budget_row,
                "budget_bytes": budget,
                "tensor_types": dict(counts),
                "upgraded": {n: SLIM_TIER[b] for n, b in chosen.items() if b != 4},
            },
            "proxy": PROXIES[proxy] + "; greedy upgrades by proxy drop per extra byte",
            "sources": {SLIM_TIER[b]: str(p) for b, p in tiers.items()},
            "post_process": "token_embd Q8_0 (gguf-py), tensors spliced from the GPTQ GGUFs by this script",
            "proxy_total": {SLIM_TIER[b]: sum(e[b] for e in errors.values()) for b in tiers},
            "proxy_mix": sum(errors[n][b] for n, b in chosen.items()),
        }
        info_path.write_text(json.dumps(info, indent=2))
        return path, info

    # measuring ---------------------------------------------------------------------------------------------------

    def measure(self, row: Row, speed_only: bool = False) -> None:
        if speed_only:
            self.speed(row.label, Path(self.rows[row.label]["gguf"]))
            self.save()
            return
        path, info = row.build()
        facts = gguf_facts(path)
        facts["sha256"] = file_sha256(path)
        self.ensure_f32()
        stem = path.stem
        for other in self.rows.values():  # rows measured before sha256 was recorded
            if "sha256" not in other and Path(other["gguf"]).exists():
                other["sha256"] = file_sha256(Path(other["gguf"]))
        twin = next(
            (label for label, r in self.rows.items() if r.get("sha256") == facts["sha256"] and label != row.label),
            None,
        )
        if twin is not None:  # the very same bytes (llama-quantize Q8_0 ignores the imatrix): same figures
            log(f"{row.label}: same file as {twin!r}, quality figures taken from it")
            scored = {**self.rows[twin]["perplexity"], "same_file_as": twin}
        elif path == self.f32:
            text = (self.logs / "f32.perplexity.log").read_text()
            scored = lcpp.parse_perplexity(text)
            scored.update(kld=0.0, kld_err=0.0, same_top_p=1.0, same_top_p_err=0.0)
        else:
            saved = self.logs / f"{stem}.perplexity.log"
            scored = None
            if saved.exists() and saved.stat().st_mtime > path.stat().st_mtime:  # an earlier run of this script
                scored = lcpp.parse_perplexity(saved.read_text())
                if scored["kld"] is None or scored["chunks"] != self.args.chunks:
                    scored = None
                else:
                    log(f"{row.label}: reusing {saved}")
            if scored is None:
                log(f"{row.label}: llama-perplexity --kl-divergence ({self.args.chunks} chunks)")
                start = time.perf_counter()
                scored = lcpp.run_perplexity(
                    path, None, ctx=512, chunks=self.args.chunks, threads=2, kld_base=self.kld_base
                )
                saved.write_text(scored.pop("raw"))
                scored["seconds"] = time.perf_counter() - start
        scored.pop("raw", None)
        self.rows[row.label] = {
            "group": row.group,
            "gguf": str(path),
            **facts,
            "bits_per_weight": 8 * facts["file_bytes"] / facts["parameters"],
            "perplexity": {k: v for k, v in scored.items() if k != "command"},
            "perplexity_command": scored.get("command"),
            "how": info,
        }
        self.speed(row.label, path)
        self.skipped.pop(row.label, None)
        self.save()
        r = self.rows[row.label]
        log(
            f"{row.label}: {facts['file_bytes'] / 1e6:.1f} MB, ppl {scored['ppl']:.3f}, KLD {scored['kld']:.4f}, "
            f"top-1 {100 * scored['same_top_p']:.2f} %, decode {r['speed']['decode_tps']:.1f} tok/s "
            f"(load {r['speed']['loadavg_1min_after']:.1f})"
        )

    def speed(self, label: str, path: Path) -> None:
        """llama-bench prefill / decode tok/s, with the 1-minute load average before and after; earlier speed
        figures of the row are kept in speed_history."""
        log(f"{label}: llama-bench")
        before = loadavg()
        bench = lcpp.run_bench(path, **BENCH)
        after = loadavg()
        bench.pop("rows", None)
        row = self.rows[label]
        if "speed" in row:
            row.setdefault("speed_history", []).append(row["speed"])
        row["speed"] = {
            **bench,
            "loadavg_1min_before": before,
            "loadavg_1min_after": after,
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        row["speed_best"] = best_speed(row)

    def save(self) -> None:
        from slimlm.evaluate.machine import machine_info
        from slimlm.report import atomic_write

        payload = {
            "model": "smollm2-135m (SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF), exported as f32 GGUF",
            "protocol": {
                "chunks": self.args.chunks,
                "scorer": f"llama-perplexity -c 512 --chunks {self.args.chunks} -t 2 on wiki.test.raw; "
                "--kl-divergence against --kl-divergence-base written once from the f32 GGUF",
                "text": str(self.wiki),
                "speed": f"llama-bench -t {BENCH['threads']} -p {BENCH['prompt']} -n {BENCH['gen']} "
                f"-r {BENCH['repetitions']} (mean tok/s); 1-minute load average read before and after; the machine is "
                "shared, so every row's runs are kept (speed, speed_history) and the table shows the run with the "
                "highest decode tok/s (speed_best)",
                "bits_per_weight": "8 * file bytes / parameters (all GGUF tensor elements; tied embedding once)",
                "decode_bound": "memory read bandwidth / tensor bytes of the GGUF (each Linear read once per token, "
                "token_embd read whole by the tied output head; KV cache and the one-row lookup ignored)",
                "llama_cpp": (Path(lcpp.llama_cpp_bin()).parent / "VERSION").read_text().strip(),
            },
            "inputs": self.meta,
            "machine": machine_info(),
            "bandwidth": self.payload.get("bandwidth", []),
            "rows": self.rows,
            "skipped": self.skipped,
        }
        self.payload = payload
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.args.out, json.dumps(payload, indent=2, default=str).encode())


def _shared_dir() -> Path:
    from slimlm.paths import shared_data_dir

    return shared_data_dir()


def rows(bench: Bench) -> list[Row]:
    table = [
        Row("f32 (reference)", 0, lambda: (bench.ensure_f32() or bench.f32, {"tool": "slimlm export_gguf f32"}), "f32")
    ]
    # processing order: what the size-matched comparisons need first; cheap or optional rows last
    prio_imatrix = {"Q4_0": 10, "Q3_K_M": 11, "Q4_K_M": 12, "IQ4_NL": 13, "Q2_K": 14, "Q8_0": 15}
    prio_plain = {"Q4_0": 30, "IQ4_NL": 31, "Q3_K_M": 32, "Q4_K_M": 33, "Q2_K": 34, "Q8_0": 35}
    for qtype in LLAMA_TYPES:
        table.append(
            Row(
                f"llama.cpp {qtype}",
                prio_plain[qtype],
                lambda q=qtype: bench.llama_file(q, False),
                "llama.cpp",
            )
        )
        table.append(
            Row(
                f"llama.cpp {qtype} + imatrix",
                prio_imatrix[qtype],
                lambda q=qtype: bench.llama_file(q, True),
                "llama.cpp + imatrix",
            )
        )
    prio_slim = {("gptq", 4): 21, ("awq", 4): 22, ("rtn", 4): 23, ("gptq", 8): 40, ("rtn", 8): 50, ("awq", 8): 51}
    for bits in (8, 4):
        for method in SLIM_METHODS:
            table.append(
                Row(
                    f"slimlm {method.upper()} W{bits} g32 → {SLIM_TIER[bits]}",
                    prio_slim[method, bits],
                    lambda m=method, b=bits: bench.slim_model_file(m, b),
                    "slimlm (emb f16)",
                )
            )
    for method, bits, prio in (("gptq", 8, 46), ("gptq", 5, 41), ("gptq", 4, 20), ("awq", 4, 44), ("rtn", 4, 45)):
        table.append(
            Row(
                f"slimlm {method.upper()} W{bits} g32 → {SLIM_TIER[bits]}, emb Q8_0†",
                prio,
                lambda m=method, b=bits: bench.slim_q8emb_file(m, b),
                "slimlm (emb Q8_0†)",
            )
        )
    for qtype, proxy, prio in (("Q4_K_M", "fisher", 42), ("Q3_K_M", "fisher", 43), ("Q3_K_M", "output", 52)):
        budget = f"llama.cpp {qtype} + imatrix"
        table.append(
            Row(
                f"slimlm GPTQ mix Q4_0/Q5_0/Q8_0 ≤ {qtype} size ({proxy} proxy), emb Q8_0†",
                prio,
                lambda q=qtype, b=budget, x=proxy: bench.mix_file(b, bench.llama_file(q, True)[0], x),
                "slimlm (emb Q8_0†)",
            )
        )
    return table


def best_speed(row: dict) -> dict:
    """The llama-bench run of this row with the highest decode tok/s (the machine is shared: other jobs only ever
    slow a run down), with how many runs there were."""
    runs = [row["speed"], *row.get("speed_history", [])]
    return {**max(runs, key=lambda run: run["decode_tps"] or 0), "runs": len(runs)}


def print_table(bench: Bench, labels: list[str], markdown: bool) -> None:
    rows_ = bench.rows
    bandwidth = bench.payload.get("bandwidth") or []
    gbps = max((b["gbps"] for b in bandwidth if "max over" in b["method"]), default=None)
    header = [
        "row",
        "token_embd",
        "Linear types",
        "MB",
        "bits/w",
        "ppl ± err",
        "KLD",
        "same top-1 %",
        "prefill tok/s",
        "decode tok/s",
        "load 1m (runs)",
        "bound tok/s",
        "decode GB/s",
    ]
    lines = []
    for label in labels:
        row = rows_.get(label)
        if row is None:
            continue
        p, s = row["perplexity"], best_speed(row)
        linear = " ".join(f"{n}×{t}" for t, n in sorted(row["linear_tensor_types"].items(), key=lambda kv: -kv[1]))
        bound = "—" if gbps is None else f"{gbps * 1e9 / row['tensor_bytes']:.0f}"
        lines.append(
            [
                label,
                row["token_embd_type"],
                linear,
                f"{row['file_bytes'] / 1e6:.1f}",
                f"{row['bits_per_weight']:.2f}",
                f"{p['ppl']:.3f} ± {p['ppl_err']:.3f}",
                f"{p['kld']:.4f}",
                f"{100 * p['same_top_p']:.2f}",
                f"{s['prefill_tps']:.0f}",
                f"{s['decode_tps']:.1f}",
                f"{s['loadavg_1min_before']:.1f}/{s['loadavg_1min_after']:.1f} ({s['runs']})",
                bound,
                f"{s['decode_tps'] * row['tensor_bytes'] / 1e9:.1f}",
            ]
        )
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(
            title=f"slimlm vs llama-quantize — SmolLM2-135M, llama-perplexity -c 512 --chunks "
            f"{bench.args.chunks} on WikiText-2 test, KLD vs f32"
        )
        for column in header:
            table.add_column(column, overflow="fold")
        for line in lines:
            table.add_row(*line)
        Console(width=240).print(table)
    if gbps is not None:
        print(
            f"memory read bandwidth (best): {gbps:.1f} GB/s; bound tok/s = bandwidth / tensor bytes per token; "
            "decode GB/s = decode tok/s x tensor bytes (the bandwidth decoding actually drew)"
        )
    for label, why in bench.skipped.items():
        print(f"skipped {label}: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=80, help="llama-perplexity chunks of 512 tokens (>= 80)")
    parser.add_argument("--only", help="regex on row labels: measure only these")
    parser.add_argument("--redo", help="regex on row labels: measure again even if already in --out")
    parser.add_argument("--out", type=Path, default=RESULTS / "vs_llamacpp.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimlm-vs-llamacpp"), help="scratch folder")
    parser.add_argument("--rebench", help="regex on row labels: measure only the speed of these rows again")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the memory bandwidth measurement")
    parser.add_argument("--table", action="store_true", help="print the table from --out and exit")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    bench = Bench(args)
    table = rows(bench)
    labels = [row.label for row in table]
    if args.table:
        print_table(bench, labels, args.markdown)
        return
    if not args.no_bandwidth:
        measured = read_bandwidth()
        log(
            f"memory read bandwidth: {measured['gbps_1_thread']:.1f} GB/s (1 thread), "
            f"{measured['gbps_2_threads']:.1f} GB/s (2 threads), load {measured['loadavg_1min']:.1f}"
        )
        bench.payload.setdefault("bandwidth", []).append(measured)
        bench.save()
    if args.rebench:
        for row in table:
            if row.label in bench.rows and re.search(args.rebench, row.label):
                bench.measure(row, speed_only=True)
        print_table(bench, labels, args.markdown)
        return
    todo = [
        row
        for row in sorted(table, key=lambda r: r.priority)
        if (args.only is None or re.search(args.only, row.label))
        and (row.label not in bench.rows or (args.redo and re.search(args.redo, row.label)))
    ]
    for row in table:
        if row.label in bench.rows and row not in todo:
            log(f"skip {row.label}: already in {args.out}")
    start = time.perf_counter()
    for index, row in enumerate(todo, 1):
        log(f"--- row {index}/{len(todo)}: {row.label} (elapsed {(time.perf_counter() - start) / 60:.1f} min)")
        try:
            bench.measure(row)
        except Exception as error:  # noqa: BLE001 - a row that fails is recorded as skipped, never faked
            bench.skipped[row.label] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            log(f"{row.label}: FAILED, skipped: {bench.skipped[row.label]}")
            bench.save()
    print_table(bench, labels, args.markdown)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
