"""Text generation on the fast decode path (decode.py): greedy or sampled, streamed, with the figures that matter.

`generate` prefills the prompt, then decodes one token per step until `max_new_tokens` or an end-of-sequence token,
handing each token's text to `on_text` as soon as it is complete (a token that ends inside a multi-byte character
waits for the next). Sampling uses transformers' own temperature and top-p warpers and a seeded generator, so a
seed gives the same text on every run of the same path. The figures (`GenerationStats`): prefill ms, decode
tokens/s (every token after the first, which the prefill produces; the loop's sampling and streaming included),
the path that ran, the compile time (paid once per process, never inside tokens/s) and the kernel summary.

Any transformers `Cache` can be passed in (`cache=`): a `StaticCache` of a compiled length decodes on the compiled
path, any other cache on the plain one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import Cache
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from slimlm.errors import SlimlmError
from slimlm.inference.decode import COMPILED, Decoder, decoder_for
from slimlm.storage import kernel_summary


@dataclass
class Sampling:
    """temperature 0: greedy (argmax); otherwise softmax(logits / temperature) cut to the top-p mass, drawn with
    a generator seeded by `seed`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise SlimlmError(f"temperature {self.temperature}: must be 0 (greedy) or positive")
        if not 0 < self.top_p <= 1:
            raise SlimlmError(f"top_p {self.top_p}: must be in (0, 1]")


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    path: str
    compile_seconds: float
    kernel: str
    stop: str  # "eos" or "length"
    note: str = ""
    decode_cpu_seconds: float = 0.0  # this process's CPU time while decoding: steadier than wall on a busy machine

    @property
    def prefill_ms(self) -> float:
        return self.prefill_seconds * 1e3

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = self.new_tokens - 1  # the first new token comes out of the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None

    def line(self) -> str:
        rate = self.decode_tokens_per_s
        decode = f"{rate:.1f} tok/s ({self.new_tokens - 1} steps)" if rate is not None else "n/a (no decode step)"
        compiled = f" (compiled in {self.compile_seconds:.1f} s, once per process)" if self.path == COMPILED else ""
        note = f"; {self.note}" if self.note else ""
        return (
            f"prefill {self.prefill_ms:.1f} ms ({self.prompt_tokens} tokens), decode {decode}, "
            f"path: {self.path}{compiled}, kernel: {self.kernel}{note}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_ms": self.prefill_ms, "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    stats: GenerationStats


class TextStream:
    """Token ids in, newly completed text out: decodes everything so far and returns what was not returned yet,
    holding back a trailing U+FFFD (a character whose bytes are still arriving)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.done = tokenizer, [], 0

    def put(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.text()
        if text.endswith("\ufffd"):
            return ""
        piece, self.done = text[self.done :], len(text)
        return piece

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def stop_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the generation config's (an id or a list) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list | tuple) else [] if ids is None else [ids])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def sampling_probabilities(sampling: Sampling) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits [rows, vocab] -> the distributions sampled from [rows, vocab]: softmax(logits / temperature) cut to
    the top-p mass by transformers' warpers (temperature > 0; speculative decoding warps both models' logits so)."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_p < 1:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return lambda logits: torch.softmax(warpers(None, logits), dim=-1)


def chooser(sampling: Sampling, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits [1, vocab] -> the next token [1, 1]."""
    if sampling.temperature == 0:
        return lambda logits: logits.argmax(dim=-1, keepdim=True)
    probabilities = sampling_probabilities(sampling)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    return lambda logits: torch.multinomial(probabilities(logits), 1, generator=generator)


def kernel_line(model, decoder: Decoder, cache: Cache) -> str:
    """The model's kernels, and what ran its LM head when the compiled path put it elsewhere."""
    head = decoder.head_kernel if decoder.step_path(cache) == COMPILED else None
    return kernel_summary(model) + (f"; LM head: {head}" if head else "")


def generate(
    model,
    tokenizer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    decoder: Decoder | None = None,
    cache: Cache | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Continue `prompt_ids` [1, n] by up to `max_new_tokens` tokens (module docstring)."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 1:
        raise SlimlmError(f"prompt: expected one non-empty sequence of token ids, got shape {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1:
        raise SlimlmError(f"max_new_tokens {max_new_tokens}: must be at least 1")
    decoder = decoder or decoder_for(model)
    prompt_ids = prompt_ids.to(model.device)
    cache = cache if cache is not None else decoder.new_cache(prompt_ids.shape[1] + max_new_tokens)
    choose = chooser(sampling or Sampling(), model.device)
    stops, stream = stop_ids(model, tokenizer), TextStream(tokenizer)

    start = time.perf_counter()
    token = choose(decoder.prefill(prompt_ids, cache))
    prefill_seconds = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    while (token_id := int(token)) not in stops:
        piece = stream.put(token_id)
        if piece and on_text is not None:
            on_text(piece)
        if len(stream.ids) == max_new_tokens:
            break
        token = choose(decoder.step(token, cache))
    decode_seconds, decode_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    new_tokens = len(stream.ids) + (token_id in stops)  # the end token was generated too
    stats = GenerationStats(
        prompt_tokens=prompt_ids.shape[1],
        new_tokens=new_tokens,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        path=decoder.step_path(cache),
        compile_seconds=decoder.compile_seconds,
        kernel=kernel_line(model, decoder, cache),
        stop="eos" if token_id in stops else "length",
        note=decoder.note,
        decode_cpu_seconds=decode_cpu_seconds,
    )
    return Generation(stream.ids, stream.text(), stats)
