"""llama.cpp's perplexity protocol, reproduced window for window: the figures `llama-perplexity` prints.

What ``llama-perplexity -m M.gguf -f FILE -c n_ctx [--chunks N]`` does (tools/perplexity/perplexity.cpp,
``perplexity()`` and ``kl_divergence()``; common/arg.cpp for ``-f``), and what this module does the same way:

- the text is the file as is (bytes, UTF-8), with one trailing ``"\\n"`` removed (``-f``: ``read_file``, then
  ``pop_back`` of a final newline); nothing is joined or split;
- the whole text is tokenized once, special-token text not parsed, with BOS in front when the vocabulary adds BOS
  (``common_tokenize(ctx, text, add_special=true)``; ``llama_vocab_get_add_bos``);
- it needs at least 2 * n_ctx tokens; chunk i is tokens [i*n_ctx, (i+1)*n_ctx), n_chunk = min(N, tokens // n_ctx)
  (the tail is dropped); each chunk is decoded alone from an empty KV cache;
- when the vocabulary adds BOS, the first token of every chunk is replaced by BOS (chunk 0 already starts with it);
- only the second half is scored: first = n_ctx // 2; the logits at positions first .. n_ctx-2 predict tokens
  first+1 .. n_ctx-1, so n_ctx - first - 1 tokens per chunk (255 of 512);
- "Final estimate: PPL = x +/- y": x = exp(mean NLL over all scored tokens of all chunks), y = x * sqrt((E[v²] -
  E[v]²) / (count - 1)) with v the per-token NLL;
- ``--kl-divergence-base F`` stores the base model's log-probs of every scored token row as uint16 (per row:
  scale = (max_logit - min_logit) / 65535, code = round((logit - min_logit) / scale), log p = scale * code +
  min_logit - max_logit - log Σ exp(logit - max_logit)); ``--kl-divergence`` then takes, per scored token,
  KL = Σ_i p_base_i (log p_base_i - log q_i) over the entries with log p_base_i > -16, and "Same top p" = the share
  of tokens whose argmax (first maximum) of the model equals that of the stored base log-probs.

`llamacpp_perplexity_records` computes these with the in-memory model; KL and top-1 agreement use a reference model
(the original) on the very same windows, its log-probs rounded through the same uint16 code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slimlm.data import TextSource, load_text
from slimlm.errors import SlimlmError
from slimlm.evaluate.perplexity import ReferenceLogits, _logits
from slimlm.evaluate.records import Record
from slimlm.paths import file_sha256
from slimlm.progress import progress_bar

PROTOCOL = "llama.cpp"
DEFAULT_N_CTX = 512  # llama-perplexity's default -c
KLD_LOG_P_FLOOR = -16.0  # perplexity.cpp: base entries with log p <= -16 are left out of the KL sum


def read_text_file(path: str | Path) -> str:
    """The text ``llama-perplexity -f path`` evaluates: the file's bytes as UTF-8, one trailing newline removed."""
    data = Path(path).read_bytes()
    if data.endswith(b"\n"):
        data = data[:-1]
    return data.decode("utf-8")


def text_path(task: str) -> Path:
    """The plain-text file a perplexity task names (wikitext2 → wiki.test.raw in the shared data folder)."""
    if task.endswith(".jsonl") or task.endswith(".parquet") or task == "c4":
        raise SlimlmError(
            f"{task}: the llama.cpp protocol reads a plain text file as llama-perplexity -f does; "
            "pass wikitext2, wikitext2-valid or a .txt/.raw file"
        )
    source: TextSource = load_text(task)
    path = Path(source.path)
    if not path.is_file():
        raise SlimlmError(f"{task}: the llama.cpp protocol needs the text as a local file, not {source.path}")
    return path


def vocab_adds_bos(tokenizer, gguf_path: str | Path | None = None) -> bool:
    """Whether llama.cpp's vocabulary adds BOS (``llama_vocab_get_add_bos``): the GGUF's
    ``tokenizer.ggml.add_bos_token`` when a GGUF is given and has it; otherwise what the tokenizer does with
    special tokens (as slimlm's export_gguf writes it: SmolLM's 49,152-token vocabulary never adds BOS)."""
    if gguf_path is not None and str(gguf_path).endswith(".gguf") and Path(gguf_path).is_file():
        import gguf

        field = gguf.GGUFReader(str(gguf_path)).get_field("tokenizer.ggml.add_bos_token")
        if field is not None:
            return bool(field.contents())
    if tokenizer.bos_token_id is None or len(tokenizer) == 49152:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def tokenize_text(tokenizer, text: str, add_bos: bool) -> torch.Tensor:
    """The whole text as one token stream, BOS first when `add_bos` (``common_tokenize(..., add_special=true)``)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if add_bos:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)


def llamacpp_windows(
    tokens: torch.Tensor, n_ctx: int, chunks: int | None = None, bos_id: int | None = None, where: str = "the text"
) -> torch.Tensor:
    """The chunks llama-perplexity decodes: (n_chunk, n_ctx), n_chunk = min(chunks, len // n_ctx); with `bos_id`
    (the vocabulary adds BOS) the first token of every chunk is that id."""
    if n_ctx < 4 or n_ctx % 2:
        raise SlimlmError(f"llama.cpp protocol: n_ctx={n_ctx} must be even and at least 4")
    if tokens.numel() < 2 * n_ctx:
        raise SlimlmError(
            f"{where}: {tokens.numel()} tokens; llama-perplexity needs at least {2 * n_ctx} (2 * n_ctx={n_ctx})"
        )
    available = tokens.numel() // n_ctx
    count = available if chunks is None or chunks < 0 else min(chunks, available)
    windows = tokens[: count * n_ctx].view(count, n_ctx).clone()
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows


def scored_range(n_ctx: int) -> tuple[int, int]:
    """Logit rows [first, n_ctx - 1) are scored; they predict tokens first+1 .. n_ctx-1."""
    return n_ctx // 2, n_ctx - 1


def quantized_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probs as a ``--kl-divergence-base`` file stores and reads them back (perplexity.cpp ``log_softmax``
    with its uint16 code), float32, one row per token."""
    logits = logits.float()
    max_logit = logits.max(dim=-1, keepdim=True).values
    min_logit = logits.min(dim=-1, keepdim=True).values
    sum_exp = torch.exp(logits - max_logit).double().sum(dim=-1, keepdim=True)
    log_sum_exp = torch.log(sum_exp).float()
    min_log_prob = min_logit - max_logit - log_sum_exp
    scale = (max_logit - min_logit) / 65535.0
    inv_scale = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.where(logits > min_logit, torch.round(inv_scale * (logits - min_logit)), torch.zeros_like(logits))
    return scale * codes + min_log_prob


@dataclass
class ChunkTotals:
    nll: float = 0.0
    nll2: float = 0.0
    tokens: int = 0
    kl: float = 0.0
    same_top: int = 0


def _score_chunk(model, reference: ReferenceLogits | None, window: torch.Tensor, totals: ChunkTotals) -> None:
    first, stop = scored_range(window.numel())
    full = _logits(model, window)
    logits = full[first:stop]  # row r predicts window[first + 1 + r]
    targets = window[first + 1 :].to(logits.device)
    log_q = F.log_softmax(logits, dim=-1)
    nll = -log_q.gather(1, targets[:, None])[:, 0].double()
    totals.nll += nll.sum().item()
    totals.nll2 += (nll * nll).sum().item()
    totals.tokens += targets.numel()
    if reference is None:
        return
    log_p = quantized_log_probs(reference(window, model, full)[first:stop].to(logits.device))
    kept = log_p > KLD_LOG_P_FLOOR
    terms = torch.where(kept, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
    totals.kl += terms.double().sum().item()
    totals.same_top += (logits.argmax(-1) == log_p.argmax(-1)).sum().item()


@torch.inference_mode()
def llamacpp_perplexity_records(
    model,
    tokenizer,
    task: str,
    n_ctx: int = DEFAULT_N_CTX,
    chunks: int | None = None,
    reference=None,
    add_bos: bool | None = None,
    gguf_path: str | Path | None = None,
) -> list[Record]:
    """Perplexity as ``llama-perplexity -f <task's file> -c n_ctx --chunks chunks`` computes it, and (with
    `reference`, the original model or a shared ReferenceLogits) KL divergence and top-1 agreement as
    ``--kl-divergence-base`` (computed from the reference) + ``--kl-divergence`` compute them.

    add_bos: None reads it from `gguf_path` (a GGUF's tokenizer.ggml.add_bos_token) or the tokenizer."""
    if reference is not None and not isinstance(reference, ReferenceLogits):
        reference = ReferenceLogits(reference)
    path = text_path(task)
    if add_bos is None:
        add_bos = vocab_adds_bos(tokenizer, gguf_path)
    if add_bos and tokenizer.bos_token_id is None:
        raise SlimlmError("llama.cpp protocol: add_bos is set but the tokenizer has no BOS token")
    tokens = tokenize_text(tokenizer, read_text_file(path), add_bos)
    windows = llamacpp_windows(tokens, n_ctx, chunks, tokenizer.bos_token_id if add_bos else None, str(path))
    totals = ChunkTotals()
    with progress_bar(f"{task} perplexity (llama.cpp protocol)", total=len(windows)) as advance:
        for window in windows:
            _score_chunk(model, reference, window, totals)
            advance()
    first, stop = scored_range(n_ctx)
    bos = (
        f"first token of every chunk replaced by BOS (id {tokenizer.bos_token_id}); text tokenized with BOS"
        if add_bos
        else "no BOS (the vocabulary does not add it)"
    )
    protocol = {
        "protocol": PROTOCOL,
        "data": str(path),
        "sha256": file_sha256(path)[:12],
        "text": "file as is, one trailing newline removed (llama-perplexity -f)",
        "n_ctx": n_ctx,
        "chunks": f"{len(windows)} of {tokens.numel() // n_ctx}",
        "scored": f"tokens {first + 1}..{n_ctx - 1} of each chunk ({stop - first} per chunk)",
        "tokens_scored": totals.tokens,
        "bos": bos,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    mean = totals.nll / totals.tokens
    ppl = math.exp(mean)
    variance = totals.nll2 / totals.tokens - mean * mean
    err = ppl * math.sqrt(variance / (totals.tokens - 1)) if variance > 0 and totals.tokens > 1 else float("nan")
    records = [Record(task, "perplexity", ppl, "", False, protocol, f"llama-perplexity's Final estimate; ± {err:.5f}")]
    if reference is not None:
        p = totals.same_top / totals.tokens
        same_err = math.sqrt(p * (1 - p) / (totals.tokens - 1)) if totals.tokens > 1 else float("nan")
        records += [
            Record(
                task,
                "kl_divergence",
                totals.kl / totals.tokens,
                "nats/token",
                False,
                protocol,
                "llama-perplexity --kl-divergence's Mean KLD: KL(original || model) per scored token, original "
                "log-probs in its uint16 code, terms with log p <= -16 left out",
            ),
            Record(
                task,
                "top1_agreement",
                p,
                "fraction",
                True,
                protocol,
                f"llama-perplexity's Same top p (argmax of model = argmax of original); ± {same_err:.5f}",
            ),
        ]
    return records


def evaluate_model_llamacpp(
    model, tokenizer, config, reference=None, model_path: str | Path | None = None, add_bos: bool | None = None
) -> list[Record]:
    """`slimlm.evaluate.suite.evaluate_model` with perplexity tasks scored by the llama.cpp protocol:
    config.seq_len is n_ctx, config.limit the number of chunks; downstream tasks, size and speed as usual."""
    from slimlm.evaluate.suite import check_finite, evaluate_model, is_perplexity_task

    check_finite(model)
    records: list[Record] = []
    if reference is not None:
        reference = ReferenceLogits(reference)
    for task in config.tasks:
        if is_perplexity_task(task):
            records += llamacpp_perplexity_records(
                model, tokenizer, task, config.seq_len, config.limit, reference, add_bos, model_path
            )
    rest = config.model_copy(update={"tasks": [task for task in config.tasks if not is_perplexity_task(task)]})
    return records + evaluate_model(model, tokenizer, rest, None, model_path)
