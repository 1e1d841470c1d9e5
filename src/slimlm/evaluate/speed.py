"""Prefill latency, greedy decode throughput and (where a counter exists) energy per decoded token.

Protocol (pinned, printed with every number): batch 1; the prompt is a fixed English paragraph tokenized without
special tokens and repeated/cut to exactly `prompt_tokens` tokens (random ids from a seeded generator when no
tokenizer is given). Each run is one forward over the prompt with a fresh cache (timed: prefill), then
`new_tokens` single-token forwards feeding back the argmax through the cache (timed together: decode). No EOS
check, so every run decodes exactly `new_tokens` tokens. The decode path (slimlm.inference.decode) is on the
protocol: "plain" (eager forward, DynamicCache; the default) or, with ``compile=True``, "compiled static cache"
(StaticCache, the step compiled by torch.compile) with its compile seconds beside, never inside, the figures; if
compiling fails the plain path runs and the record's note says why. Warm-up runs are discarded; figures are
medians, each with the [min, max] of its runs. The 1-minute load average is read before and after the runs: above
the cores this process may use, other work competed for them, and the figures are flagged `busy` rather than
presented as plain.
Energy is read from RAPL or NVML over the decode steps only; without a counter the figure is None, never guessed.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from slimlm.evaluate.machine import EnergyCounter, energy_counter, usable_cores
from slimlm.evaluate.records import Record
from slimlm.inference.decode import Decoder, decoder_for
from slimlm.progress import progress_bar

PROMPT_TEXT = (
    "The history of the printing press begins in the middle of the fifteenth century, when Johannes Gutenberg, "
    "a goldsmith from Mainz, combined movable metal type, oil-based ink and a screw press adapted from those "
    "used to make wine. Books had been copied by hand for centuries, a slow and costly craft that kept reading "
    "the privilege of monasteries, universities and the wealthy. Within fifty years, presses were running in "
    "more than two hundred European towns, and millions of volumes had been printed. Cheaper books spread new "
    "ideas about science, religion and government faster than any authority could control them, and the habit "
    "of reading slowly moved from the few to the many."
)


@dataclass
class DecodeRun:
    """One timed run: prefill seconds, decode seconds, tokens produced by the decode steps, energy if measured."""

    prefill_seconds: float
    decode_seconds: float
    decoded_ids: list[int] = field(default_factory=list)
    decode_joules: float | None = None


def prompt_ids(tokenizer, prompt_tokens: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Exactly `prompt_tokens` ids, shape (1, prompt_tokens): the paragraph repeated, or seeded random ids."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (1, prompt_tokens), generator=generator)
    # Repeat the text before tokenizing (not the ids after) so every token boundary is one real text would have.
    repeats = 1
    while True:
        text = " ".join([PROMPT_TEXT] * repeats)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= prompt_tokens:
            break
        if not ids:
            raise ValueError("the tokenizer turned the prompt paragraph into no tokens")
        repeats = max(repeats + 1, (repeats * prompt_tokens) // max(1, len(ids)) + 1)
    return torch.tensor([ids[:prompt_tokens]], dtype=torch.long)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _dtype_of(model) -> torch.dtype:
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floating[0] if floating else next(model.parameters()).dtype


def _clock(device: torch.device) -> float:
    # CUDA kernels run asynchronously: wait for them, or the clock measures only the launches.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def greedy_decode(
    model,
    input_ids: torch.Tensor,
    new_tokens: int,
    counter: EnergyCounter | None = None,
    decoder: Decoder | None = None,
) -> DecodeRun:
    """Prefill `input_ids`, then decode `new_tokens` tokens greedily through the KV cache, timing each phase; on the
    plain path unless a compiling `decoder` is given (its cache is made, and compiled for, before the clock starts)."""
    device = input_ids.device
    decoder = decoder or Decoder(model, compile=False)
    cache = decoder.new_cache(input_ids.shape[1] + new_tokens)
    start = _clock(device)
    next_token = decoder.prefill(input_ids, cache).argmax(dim=-1, keepdim=True)
    prefill_seconds = _clock(device) - start

    decoded = []
    energy_start = counter.sample() if counter is not None else None
    start = _clock(device)
    for _ in range(new_tokens):
        next_token = decoder.step(next_token, cache).argmax(dim=-1, keepdim=True)
        decoded.append(next_token)
    decode_seconds = _clock(device) - start
    joules = counter.joules_since(energy_start) if counter is not None else None
    decoded_ids = torch.cat(decoded, dim=1)[0].tolist() if decoded else []
    return DecodeRun(prefill_seconds, decode_seconds, decoded_ids, joules)


def _median_record(
    metric: str, values: list[float], unit: str, higher_is_better: bool, protocol: dict, note: str
) -> Record:
    return Record(
        "speed",
        metric,
        statistics.median(values),
        unit,
        higher_is_better,
        dict(protocol),
        note,
        [min(values), max(values)],
    )


def _energy_record(runs: list[DecodeRun], counter: EnergyCounter | None, protocol: dict, note: str) -> Record:
    metric = "decode_joules_per_token"
    if counter is None:
        return Record("speed", metric, None, "J/token", False, dict(protocol), note="no energy counter")
    joules = [run.decode_joules / len(run.decoded_ids) for run in runs]
    energy_protocol = {**protocol, "energy_counter": counter.name, "energy_scope": counter.scope}
    return _median_record(metric, joules, "J/token", False, energy_protocol, note)


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _busy_note(before: float | None, after: float | None, cores: int) -> str:
    """Why the figures are not clean, or "" when the machine was not busy (or its load cannot be read)."""
    loads = [load for load in (before, after) if load is not None]
    if not loads or max(loads) <= cores:
        return ""
    return (
        f"busy machine: 1-min load average {before} before, {after} after the runs, above its {cores} usable "
        "cores; other work competed for them, so these figures understate its speed"
    )


@torch.inference_mode()
def measure_speed(
    model,
    tokenizer,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    runs: int = 5,
    warmup: int = 1,
    seed: int = 0,
    kernel: str = "dense",
    compile: bool = False,
) -> list[Record]:
    """Prefill ms and tokens/s, decode tokens/s and decode J/token of `model` at batch 1 (see module doc)."""
    if prompt_tokens < 1 or new_tokens < 1 or runs < 1:
        raise ValueError("prompt_tokens, new_tokens and runs must be at least 1")
    model.eval()
    load_before = _load_average()  # other busy processes slow every figure below
    device = _device_of(model)
    input_ids = prompt_ids(tokenizer, prompt_tokens, model.config.vocab_size, seed).to(device)
    counter = energy_counter(device)
    torch.manual_seed(seed)
    decoder = decoder_for(model, compile)
    decoder.new_cache(prompt_tokens + new_tokens)  # compiles here, on the compiled path: apart from the runs
    timed = []
    with progress_bar("speed (warm-up, then timed runs)", total=warmup + runs) as advance:
        for run in range(warmup + runs):
            result = greedy_decode(model, input_ids, new_tokens, counter if run >= warmup else None, decoder)
            if run >= warmup:
                timed.append(result)
            advance()
    load_after, cores = _load_average(), usable_cores()
    busy = _busy_note(load_before, load_after, cores)
    note = "; ".join(text for text in (decoder.note, busy) if text)
    protocol = {
        "prompt_tokens": prompt_tokens,
        "prompt": "fixed English paragraph" if tokenizer is not None else f"random ids (seed {seed})",
        "new_tokens": new_tokens,
        "runs": runs,
        "warmup": warmup,
        "statistic": "median",
        "threads": torch.get_num_threads(),
        "dtype": str(_dtype_of(model)).removeprefix("torch."),
        "device": str(device),
        "batch": 1,
        "kernel": kernel,
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": load_after,
        "usable_cores": cores,
        "busy": bool(busy),
        "decoding": "greedy, KV cache, no EOS stop, prefill logits of the last position only",
        "path": decoder.path,
        "compile_seconds": round(decoder.compile_seconds, 2) if decoder.compiled else None,
        "lm_head_kernel": decoder.head_kernel,  # None: the model's own head module
    }
    return [
        _median_record("prefill_ms", [run.prefill_seconds * 1e3 for run in timed], "ms", False, protocol, note),
        _median_record(
            "prefill_tokens_per_s",
            [prompt_tokens / run.prefill_seconds for run in timed],
            "tokens/s",
            True,
            protocol,
            note,
        ),
        _median_record(
            "decode_tokens_per_s",
            [len(run.decoded_ids) / run.decode_seconds for run in timed],
            "tokens/s",
            True,
            protocol,
            note,
        ),
        _energy_record(timed, counter, protocol, note),
    ]
