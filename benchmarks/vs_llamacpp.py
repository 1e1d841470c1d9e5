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
  code for code as Q4_0 / Q8_0, with the token embedding as f16 (export_gguf's default: slimlm's stages leave it
  dense), which is most of the size gap to llama.cpp's files.
- rows marked "emb Q8_0†": the same quantize run exported with `embeddings="q8_0"` (the exporter's ggml rounding of
  the dense embedding; its bytes equal llama-quantize's own Q8_0 token_embd, checked and recorded). Only these rows
  have llama.cpp's embedding and can be compared at equal file size. (The recorded † rows were made by splicing
  gguf-py's Q8_0 into the f16 file before the exporter had the option; the exporter writes the same bytes: sha256
  of slimlm RTN W4 with either embedding equal to the recorded files.)
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
import time
from pathlib import Path

from llamacpp_common import EMBD, file_sha256, gguf_facts, lcpp, log, quantize_llama, read_bandwidth, tensor_array
from slimlm.paths import shared_data_dir
from vs_llamacpp_mix import PROXIES, SLIM_TIER, fisher_diagonal, input_second_moments, write_mix
from vs_llamacpp_rows import Row, best_speed, print_table, rows

RESULTS = Path(__file__).parent / "results"
CALIB_SAMPLES, CALIB_SEQ_LEN, CALIB_SEED = 4, 2048, 0
CALIBRATION = {"data": "c4", "samples": CALIB_SAMPLES, "seq_len": CALIB_SEQ_LEN, "seed": CALIB_SEED}
BENCH = {"threads": 2, "prompt": 128, "gen": 64, "repetitions": 3}
EMBEDDINGS = ("auto", "q8_0")  # export_gguf's token embedding: dense (f16 here), or Q8_0 by ggml's rounding


class Bench:
    def __init__(self, args):
        self.args = args
        self.work: Path = args.work
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.wiki = shared_data_dir() / "wikitext-2-raw-v1" / "wiki.test.raw"
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

    def slim_model_file(self, method: str, bits: int, embeddings: str = "auto") -> tuple[Path, dict]:
        """slimlm quantize stage (method, bits, sym, group 32) on a copy of the dense model, exported by export_gguf
        (dtype f16) with the token embedding as f16 (embeddings "auto") or as Q8_0 ("q8_0")."""
        path = self.slim_path(method, bits, embeddings)
        info_path = path.with_suffix(".json")
        if not (path.exists() and info_path.exists()):
            self.quantize_and_export(method, bits)
        return path, json.loads(info_path.read_text())

    def slim_path(self, method: str, bits: int, embeddings: str) -> Path:
        return self.work / f"slimlm-{method}-w{bits}g32{'' if embeddings == 'auto' else '-emb' + embeddings}.gguf"

    def quantize_and_export(self, method: str, bits: int) -> None:
        """One quantize run, exported with each token embedding choice (files and their .json beside them)."""
        from slimlm.calibration import Calibration
        from slimlm.export.gguf import export_gguf
        from slimlm.recipe import CalibrationConfig
        from slimlm.registry import StageContext, get_stage

        loaded = self.dense()
        options = {"method": method, "bits": bits, "group_size": 32, "sym": True}
        log(f"slimlm quantize {options}")
        scratch = self.work / f"scratch-{method}-{bits}"
        scratch.mkdir(exist_ok=True)
        calibration = Calibration(CalibrationConfig(**CALIBRATION), loaded.tokenizer, windows=self._windows)
        context = StageContext(loaded.tokenizer, calibration, scratch, load_original=lambda: loaded.model)
        spec = get_stage("quantize")
        start = time.perf_counter()
        model = spec.apply(copy.deepcopy(loaded.model), spec.options_model(options).model_validate(options), context)
        seconds = time.perf_counter() - start
        for embeddings in EMBEDDINGS:
            path = self.slim_path(method, bits, embeddings)
            summary = export_gguf(model, loaded.tokenizer, path, dtype="f16", embeddings=embeddings)
            info = {
                "tool": "slimlm",
                "stage": {"quantize": options},
                "calibration": CALIBRATION,
                "quantize_seconds": seconds,
                "export": f"{summary.line()} (export_gguf dtype='f16', embeddings='{embeddings}')",
                "notes": context.notes,
            }
            path.with_suffix(".json").write_text(json.dumps(info, indent=2))
        self.check_embedding(self.slim_path(method, bits, "q8_0"))

    def check_embedding(self, path: Path) -> None:
        """Record whether the exporter's Q8_0 token_embd has the bytes llama-quantize writes for it."""
        theirs = self.work / "llama-Q4_0.gguf"
        if theirs.exists() and "embd_q8_equals_llama_quantize" not in self.meta:
            ours, other = tensor_array(path, EMBD), tensor_array(theirs, EMBD)
            self.meta["embd_q8_equals_llama_quantize"] = bool(
                ours.tensor_type == other.tensor_type and ours.data.tobytes() == other.data.tobytes()
            )

    def mix_file(self, budget_row: str, budget_path: Path, proxy: str = "fisher") -> tuple[Path, dict]:
        """Per-tensor choice among GPTQ Q4_0 / Q5_0 / Q8_0 blocks (vs_llamacpp_mix), greedy by proxy-error drop per
        byte, the whole file at most the size of `budget_path`."""
        tag = re.sub(r"\W+", "-", budget_row).strip("-")
        path = self.work / f"slimlm-gptq-mix-{proxy}-{tag}.gguf"
        info_path = path.with_suffix(".json")
        if path.exists() and info_path.exists():
            return path, json.loads(info_path.read_text())
        self.ensure_f32()  # the proxies' reference weights
        budget = budget_path.stat().st_size
        tiers = {bits: self.slim_model_file("gptq", bits, "q8_0")[0] for bits in (4, 5, 8)}
        loaded = self.dense()
        if proxy == "fisher":
            weights = fisher_diagonal(loaded.model, self._windows, self.work / "fisher-diagonal.npz")
        else:
            weights = input_second_moments(loaded.model, self._windows, self.work / "input-second-moments.npz")
        choice, proxy_totals = write_mix(tiers, self.f32, weights, budget, path)
        info = {
            "tool": "slimlm",
            "mix": {"budget_from": budget_row, "budget_bytes": budget, **choice},
            "proxy": PROXIES[proxy] + "; greedy upgrades by proxy drop per extra byte",
            "sources": {SLIM_TIER[b]: str(p) for b, p in tiers.items()},
            "post_process": "tensors spliced from the GPTQ GGUFs (token_embd Q8_0 by the exporter) by this script",
            **proxy_totals,
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
        before = os.getloadavg()[0]
        bench = lcpp.run_bench(path, **BENCH)
        after = os.getloadavg()[0]
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
