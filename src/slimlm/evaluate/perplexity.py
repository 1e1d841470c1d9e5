"""Fixed-window perplexity, and KL divergence / top-1 agreement against a reference model on the same windows.

Protocol (pinned, printed with every number): the split's rows joined with "\\n\\n" (GPTQ/Wanda evaluation code),
tokenized once without special tokens, cut into non-overlapping windows of `seq_len` tokens (the tail is dropped),
each window scored on its own with no carried context; perplexity = exp(mean next-token NLL over all predicted
tokens). KL is KL(reference || model) per token, averaged over the same predicted tokens (llama.cpp's
``--kl-divergence``). Word perplexity follows lm-eval's definition, exp(total NLL / whitespace-separated words),
but over these windows; lm-eval's own wikitext task rolls over detokenized documents, so it differs slightly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimlm.data import TextSource, eval_windows, tokenize_joined
from slimlm.evaluate.records import Record
from slimlm.progress import progress_bar

_KL_CHUNK = 512  # positions per log-softmax chunk: bounds memory at chunk x vocab floats


@dataclass
class WindowTotals:
    nll: float = 0.0
    tokens: int = 0
    kl: float = 0.0
    top1_agree: int = 0
    words: int = 0
    bytes: int = 0


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _logits(model, window: torch.Tensor) -> torch.Tensor:
    return model(window.unsqueeze(0).to(_device_of(model)), use_cache=False).logits[0, :-1].float()


class ReferenceLogits:
    """The reference model's logits on evaluation windows; with ``keep=True`` each window's logits are computed
    once and kept in memory (float32, windows × seq_len × vocab × 4 bytes), so scoring many compressed models
    against one original costs one reference pass instead of one per model."""

    def __init__(self, model, keep: bool = False):
        self.model, self.keep = model, keep
        self._kept: dict[bytes, torch.Tensor] = {}

    def __call__(self, window: torch.Tensor, model=None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The reference's logits on `window`; `logits`, the scored `model`'s own on it, are taken as they are when
        that model is the reference itself (an original scored against itself) and nothing is kept yet."""
        key = window.cpu().numpy().tobytes() if self.keep else None
        if key is not None and key in self._kept:
            return self._kept[key]
        found = logits if logits is not None and model is self.model else _logits(self.model, window)
        if key is not None:
            self._kept[key] = found
        return found


def _score_window(model, reference: ReferenceLogits | None, window: torch.Tensor, totals: WindowTotals) -> None:
    logits = _logits(model, window)
    targets = window[1:].to(logits.device)
    totals.nll += F.cross_entropy(logits, targets, reduction="sum").item()
    totals.tokens += targets.numel()
    if reference is None:
        return
    ref_logits = reference(window, model, logits).to(logits.device)
    for start in range(0, logits.shape[0], _KL_CHUNK):
        log_p = F.log_softmax(ref_logits[start : start + _KL_CHUNK], dim=-1)
        log_q = F.log_softmax(logits[start : start + _KL_CHUNK], dim=-1)
        totals.kl += (log_p.exp() * (log_p - log_q)).sum().item()
        totals.top1_agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()


def _count_words_and_bytes(tokenizer, windows: torch.Tensor, totals: WindowTotals) -> None:
    # Only predicted tokens carry NLL: the first token of every window is context, not a prediction.
    for window in windows:
        text = tokenizer.decode(window[1:], skip_special_tokens=False)
        totals.words += len(re.split(r"\s+", text.strip())) if text.strip() else 0
        totals.bytes += len(text.encode("utf-8"))


@torch.inference_mode()
def perplexity_records(
    model, tokenizer, source: TextSource, task: str, seq_len: int = 2048, limit: int | None = None, reference=None
) -> list[Record]:
    """Perplexity (and KL / top-1 agreement when `reference` is given) of `model` on `source`.

    `reference` is the original model, or a `ReferenceLogits` to share its logits across several calls."""
    if reference is not None and not isinstance(reference, ReferenceLogits):
        reference = ReferenceLogits(reference)
    tokens = tokenize_joined(tokenizer, source)
    windows = eval_windows(tokens, seq_len, limit, source.path)
    available = tokens.numel() // seq_len
    totals = WindowTotals()
    with progress_bar(f"{task} perplexity", total=len(windows)) as advance:
        for window in windows:
            _score_window(model, reference, window, totals)
            advance()
    _count_words_and_bytes(tokenizer, windows, totals)
    protocol = {
        "data": source.path,
        "sha256": source.sha256[:12],
        "join": "\\n\\n",
        "seq_len": seq_len,
        "stride": seq_len,
        "windows": f"{len(windows)} of {available}",
        "tokens_scored": totals.tokens,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    mean_nll = totals.nll / totals.tokens
    records = [
        Record(task, "perplexity", math.exp(mean_nll), "", False, protocol),
        Record(
            task,
            "word_perplexity",
            math.exp(totals.nll / totals.words),
            "",
            False,
            protocol,
            "lm-eval's definition (exp(NLL / words)) on these fixed windows",
        ),
        Record(task, "bits_per_byte", totals.nll / totals.bytes / math.log(2), "bits", False, protocol),
    ]
    if reference is not None:
        records += [
            Record(
                task,
                "kl_divergence",
                totals.kl / totals.tokens,
                "nats/token",
                False,
                protocol,
                "KL(original || model), mean per predicted token",
            ),
            Record(
                task,
                "top1_agreement",
                totals.top1_agree / totals.tokens,
                "fraction",
                True,
                protocol,
                "argmax of model equals argmax of original",
            ),
        ]
    return records
