"""Speculative decoding: a small draft model proposes `k` tokens, the target checks them all in one forward.

Each round the draft decodes `k` tokens one by one (its own decoder: the compiled static-cache step when it
compiles), then the target runs one forward over its last token and the `k` proposals, which gives its distribution
after every prefix of them. Greedy: the longest prefix of proposals equal to the target's argmax is accepted, plus
the target's own next token, so the text is the target's greedy text (up to rounding: the k+1-token forward may
round differently from a one-token step, which only matters on a near tie). Sampling: the rejection rule of
Leviathan et al. (2023) / Chen et al. (2023): proposal x drawn from q is kept with probability min(1, p(x)/q(x));
at the first rejection the token is drawn from norm(max(0, p − q)); when all k are kept, one more is drawn from the
target's p. Both p and q are warped as generate.py's Sampling warps logits (temperature, top-p), so the output
follows the target's sampling distribution exactly, whatever the draft (tests check both rules).

Both models keep their KV cache across rounds; on a rejection the positions after the last kept token are dropped
(`rewind`): a static cache's length counter is set back (the stale slots are masked and overwritten later), other
caches are cropped. Every round proposes k tokens (the last may overshoot the length limit, its extra tokens
dropped), so the target's verifying forward has one length: compiled once (`Verifier`), as the draft's steps are.

`assisted_generate` runs the same through transformers' assisted generation (`generate(assistant_model=...)`,
eager, dynamic caches) for comparison. benchmarks/speculative.py measures both: with SmolLM2-135M and its W4 GPTQ
draft at k 3, 32 tokens per CPU second here against transformers' 24, so this loop is the one `slimlm generate
--draft` runs.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Cache, StaticCache

from slimlm.errors import SlimlmError
from slimlm.inference.decode import (
    COMPILED,
    Decoder,
    compile_graph,
    decoder_for,
    error_reason,
    inductor_settings,
    onednn_head,
)
from slimlm.inference.generate import (
    Generation,
    GenerationStats,
    Sampling,
    TextStream,
    kernel_line,
    sampling_probabilities,
    stop_ids,
)
from slimlm.progress import progress_bar
from slimlm.storage import kernel_summary

SLIMLM_LOOP = "slimlm"
TRANSFORMERS_LOOP = "transformers"


@dataclass
class SpeculativeStats(GenerationStats):
    """GenerationStats plus the draft's figures. The prefill covers both models' prompts (time to first token)."""

    draft_tokens: int = 0  # proposed by the draft
    accepted_tokens: int = 0  # of those, kept
    target_forwards: int = 0  # verifying forwards after the prefill
    k: int = 0
    loop: str = SLIMLM_LOOP

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens_per_target_forward(self) -> float | None:
        """Decoded tokens (all after the prefill's) per verifying forward: 1 without a draft, at most k + 1."""
        return (self.new_tokens - 1) / self.target_forwards if self.target_forwards else None

    def line(self) -> str:
        rate, per_forward = self.acceptance_rate, self.tokens_per_target_forward
        accepted = f"{rate:.1%} of {self.draft_tokens}" if rate is not None else "n/a"
        forward = f"{per_forward:.2f}" if per_forward is not None else "n/a"
        return (
            f"draft ({self.loop} loop, k {self.k}): acceptance {accepted}, {forward} tokens per target forward; "
            + super().line()
        )

    def to_dict(self) -> dict:
        return {
            **super().to_dict(),
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_target_forward": self.tokens_per_target_forward,
        }


def check_same_vocabulary(target, draft, target_tokenizer, draft_tokenizer=None) -> None:
    """One clear error when the draft cannot propose the target's tokens: another vocabulary or tokenizer."""
    sizes = (target.config.vocab_size, draft.config.vocab_size)
    if sizes[0] != sizes[1]:
        raise SlimlmError(
            f"draft: vocabulary of {sizes[1]} tokens, the target's has {sizes[0]}; need the same tokenizer"
        )
    if draft_tokenizer is not None and draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise SlimlmError("draft: its tokenizer's vocabulary differs from the target's; need the same tokenizer")


@torch.inference_mode()  # a static cache's counter is an inference tensor (decode.py makes it so)
def rewind(cache: Cache, length: int) -> None:
    """Drop every cached position from `length` on."""
    if isinstance(cache, StaticCache):
        for layer in cache.layers:  # in place: the compiled step reads this counter at a fixed address
            layer.cumulative_length.fill_(length)
    elif (extra := cache.get_seq_length() - length) > 0:
        cache.crop(-extra)


@torch.inference_mode()
def all_logits(model, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """float32 logits of every position [tokens, vocab] (batch 1), the cache extended."""
    return model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[0].float()


def all_hidden(model, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """The final (normed) hidden states of every position [batch, tokens, hidden], the cache extended."""
    return model.base_model(input_ids=input_ids, past_key_values=cache, use_cache=True).last_hidden_state


class Verifier:
    """The target's verifying forward over k+1 tokens. On a static cache its decoder compiled, it is compiled the
    way decode.py compiles the one-token step (inductor, one graph per length, the model's guards skipped, a dense
    float32 head on oneDNN after the graph): eagerly, a 5-token forward of SmolLM2-135M took 2.4 one-token compiled
    steps here, mostly Python and the LM head on MKL (decode.compile_graph). Any failure falls back to the eager
    forward, with a `note`."""

    def __init__(self, decoder: Decoder, backend: str | object = "inductor"):
        self.decoder, self.note, self._graph, self._head = decoder, "", None, None
        self.compile_seconds, self._lengths = 0.0, set()
        if decoder.compiled:
            self._head = onednn_head(decoder.model)
            self._graph = compile_graph(all_hidden if self._head is not None else _all_logits_graph, backend)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """float32 logits of every position [tokens, vocab]."""
        if self._graph is None or self.decoder.step_path(cache) != COMPILED:
            return all_logits(self.decoder.model, input_ids, cache)
        out = self._graph(self.decoder.model, input_ids.clone(), cache)[0]
        return (out if self._head is None else self._head(out)).float()

    def warm_up(self, tokens: int, length: int) -> None:
        """Compile for `tokens` tokens on a throwaway cache of `length` (before any timing); eager from here on
        if that fails."""
        if self._graph is None or tokens in self._lengths:
            return
        start = time.perf_counter()
        cache = self.decoder.new_cache(length)
        with torch.inference_mode():
            self.decoder.prefill(torch.zeros(1, 1, dtype=torch.long, device=self.decoder.model.device), cache)
        with progress_bar(
            f"compiling the verifying forward (torch.compile, {tokens} tokens, once per process)", 1
        ) as done:
            try:
                with inductor_settings(self.decoder.tuned):
                    for _ in range(2):  # the second call checks the graph is reused
                        self(torch.zeros(1, tokens, dtype=torch.long, device=self.decoder.model.device), cache)
            except Exception as err:  # noqa: BLE001  (inductor fails in many ways: no compiler, unsupported op)
                self._graph = self._head = None
                self.note = f"verifying forward not compiled ({error_reason(err)})"
            done()
        self._lengths.add(tokens)
        self.compile_seconds += time.perf_counter() - start


def _all_logits_graph(model, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    return model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits


_VERIFIERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def verifier_for(decoder: Decoder, backend: str | object = "inductor") -> Verifier:
    """The process's verifier of a decoder (its compiled graphs kept with it; `backend` when it is made)."""
    if decoder not in _VERIFIERS:
        _VERIFIERS[decoder] = Verifier(decoder, backend)
    return _VERIFIERS[decoder]


class _Greedy:
    """Argmax proposals; keep the prefix the target's argmax agrees with, then the target's own token."""

    def first(self, logits: torch.Tensor) -> int:
        return int(logits.argmax())

    def propose(self, logits: torch.Tensor) -> tuple[int, None]:
        return int(logits.argmax()), None

    def verify(self, target_logits: torch.Tensor, proposals: list[int], _draws) -> tuple[int, int]:
        best = target_logits.argmax(dim=-1).tolist()
        kept = next((i for i, token in enumerate(proposals) if token != best[i]), len(proposals))
        return kept, best[kept]


class _Rejection:
    """The standard speculative sampling rule (module docstring), with one seeded generator for every draw."""

    def __init__(self, sampling: Sampling, device):
        self.probabilities = sampling_probabilities(sampling)
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def first(self, logits: torch.Tensor) -> int:
        """The prefill's token, drawn from p (with the same generator: two equally seeded ones would correlate)."""
        return int(torch.multinomial(self.probabilities(logits.view(1, -1))[0], 1, generator=self.generator))

    def propose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        q = self.probabilities(logits.view(1, -1))[0]
        return int(torch.multinomial(q, 1, generator=self.generator)), q

    def verify(self, target_logits: torch.Tensor, proposals: list[int], draws: list[torch.Tensor]) -> tuple[int, int]:
        p = self.probabilities(target_logits)
        for i, (token, q) in enumerate(zip(proposals, draws)):
            if torch.rand((), generator=self.generator) * q[token] >= p[i, token]:  # rejected: u >= p / q
                residual = (p[i] - q).clamp_min(0)
                if residual.sum() <= 0:  # p == q up to rounding: a rejection is then (almost) impossible
                    residual = p[i]
                return i, int(torch.multinomial(residual, 1, generator=self.generator))
        return len(proposals), int(torch.multinomial(p[len(proposals)], 1, generator=self.generator))


class _Draft:
    """The draft's side of the loop: its cache, and the emitted tokens it has not read yet (`pending`)."""

    def __init__(self, decoder: Decoder, cache: Cache, length: int, pending: list[int]):
        self.decoder, self.cache, self.length, self.pending = decoder, cache, length, pending

    def propose(self, k: int, rule) -> tuple[list[int], list]:
        """k proposals (and their distributions when sampling): the cache ends holding pending + k−1 of them."""
        device = self.decoder.model.device
        for token in self.pending:
            logits = self.decoder.step(torch.tensor([[token]], device=device), self.cache)[0]
        self.length += len(self.pending)
        proposals, draws = [], []
        for i in range(k):
            token, q = rule.propose(logits)
            proposals.append(token)
            draws.append(q)
            if i < k - 1:
                logits = self.decoder.step(torch.tensor([[token]], device=device), self.cache)[0]
        self.length += k - 1
        return proposals, draws

    def settle(self, proposals: list[int], kept: int, token: int) -> None:
        """After the target kept `kept` proposals and chose `token`: drop the rest, read the kept ones next time."""
        read = len(proposals) - 1  # proposals the draft's cache holds
        self.length -= read - min(kept, read)
        rewind(self.cache, self.length)
        self.pending = [*proposals[read:kept], token]


def speculative_generate(
    model,
    draft,
    tokenizer,
    prompt_ids: torch.Tensor,
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    k: int = 4,
    decoder: Decoder | None = None,
    draft_decoder: Decoder | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """`generate` with `draft` proposing k tokens per target forward (module docstring); stats: SpeculativeStats."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 1:
        raise SlimlmError(f"prompt: expected one non-empty sequence of token ids, got shape {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1 or k < 1:
        raise SlimlmError(f"max_new_tokens {max_new_tokens}, draft tokens {k}: both must be at least 1")
    check_same_vocabulary(model, draft, tokenizer)
    sampling = sampling or Sampling()
    decoder, draft_decoder = decoder or decoder_for(model), draft_decoder or decoder_for(draft)
    prompt_ids, length = prompt_ids.to(model.device), prompt_ids.shape[1]
    room = length + max_new_tokens + k + 1  # the last round may run k + 1 positions past the last token kept
    cache, draft_cache = decoder.new_cache(room), draft_decoder.new_cache(room)
    verify = verifier_for(decoder)
    verify.warm_up(k + 1, room)  # every round has k proposals (the last may overshoot): one graph
    rule = _Greedy() if sampling.temperature == 0 else _Rejection(sampling, model.device)
    stops, stream = stop_ids(model, tokenizer), TextStream(tokenizer)
    compiled = decoder.compile_seconds + draft_decoder.compile_seconds + verify.compile_seconds
    stats = SpeculativeStats(length, 0, 0.0, 0.0, decoder.step_path(cache), compiled, "", "length")
    stats.k, stats.note = k, "; ".join(note for note in (decoder.note, draft_decoder.note, verify.note) if note)

    start = time.perf_counter()
    token = rule.first(decoder.prefill(prompt_ids, cache))
    draft_decoder.prefill(prompt_ids.to(draft.device), draft_cache)
    stats.prefill_seconds = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    drafter, new, stop = _Draft(draft_decoder, draft_cache, length, [token]), [token], ""
    while not stop:
        for token in new:  # the round's tokens, up to an end token or the length limit
            if token in stops:
                stop = "eos"
                break
            if (piece := stream.put(token)) and on_text is not None:
                on_text(piece)
            if len(stream.ids) == max_new_tokens:
                stop = "length"
                break
        if stop:
            break
        proposals, draws = drafter.propose(k, rule)
        verify_ids = torch.tensor([[token, *proposals]], device=model.device)
        kept, token = rule.verify(verify(verify_ids, cache), proposals, draws)
        length += kept + 1  # the last token, then the proposals kept
        rewind(cache, length)
        drafter.settle(proposals, kept, token)
        new = [*proposals[:kept], token]
        stats.draft_tokens += len(proposals)
        stats.accepted_tokens += kept
        stats.target_forwards += 1
    stats.decode_seconds, stats.decode_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    stats.new_tokens, stats.stop = len(stream.ids) + (stop == "eos"), stop  # the end token was generated too
    stats.kernel = kernel_line(model, decoder, cache)
    return Generation(stream.ids, stream.text(), stats)


@torch.inference_mode()
def assisted_generate(
    model, draft, tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int = 128, sampling: Sampling | None = None,
    k: int = 4, schedule: str = "constant",
) -> Generation:  # fmt: skip
    """The same through transformers' assisted generation (eager, dynamic caches); `schedule` "heuristic" is its
    adaptive k. Forward hooks count the target's forwards and the draft's steps; its acceptance is not exposed."""
    check_same_vocabulary(model, draft, tokenizer)
    sampling = sampling or Sampling()
    counts = {"target": 0, "draft": 0}
    hooks = [
        m.register_forward_hook(lambda *_, key=key: counts.__setitem__(key, counts[key] + 1))
        for m, key in ((model, "target"), (draft, "draft"))
    ]
    options = {"do_sample": False} if sampling.temperature == 0 else {
        "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": None,
    }  # fmt: skip
    if sampling.temperature:
        torch.manual_seed(sampling.seed)
    draft.generation_config.num_assistant_tokens = k
    draft.generation_config.num_assistant_tokens_schedule = schedule
    draft.generation_config.assistant_confidence_threshold = 0  # stop drafting early only by schedule
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        out = model.generate(
            prompt_ids.to(model.device), assistant_model=draft, max_new_tokens=max_new_tokens, **options
        )
    finally:
        for hook in hooks:
            hook.remove()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    ids = out[0, prompt_ids.shape[1] :].tolist()
    stopped = bool(ids) and ids[-1] in stop_ids(model, tokenizer)
    kept = ids[:-1] if stopped else ids
    stats = SpeculativeStats(
        prompt_ids.shape[1], len(ids), 0.0, seconds, "transformers assisted generation (eager)", 0.0,
        kernel_summary(model), "eos" if stopped else "length", k=k, loop=TRANSFORMERS_LOOP,
        target_forwards=counts["target"] - 1,  # the prefill's forward apart
        note=f"prefill inside decode seconds; {counts['draft']} draft forwards; acceptance not exposed",
        decode_cpu_seconds=cpu_seconds,
    )  # fmt: skip
    return Generation(kept, tokenizer.decode(kept, skip_special_tokens=True), stats)
