"""Teachers: frozen models in eval mode whose tempered distributions are mixed, or a top-k cache standing in for them.

Several teachers give one target: p_T = Σ_k w_k softmax(z_k/τ) with normalised weights (a mixture of the
distributions, not of the logits). Hidden-state and attention targets come from the first teacher.

Top-k cache: the mixed, tempered teacher distribution of every window training will read is computed once and
written to disk as the k most likely tokens and their log-probabilities (float32; N·T·k·8 bytes). Training then
rebuilds each distribution as those k probabilities plus the remaining mass spread evenly over the other V − k
tokens; the teacher need not stay in memory and is not run again. The cache is only usable for off-policy logit
losses (on-policy samples and hidden/attention targets need the live teacher).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from slimlm.recover.losses import mix_distributions, tempered_log_probs


@contextmanager
def frozen(models: list[nn.Module], eager_attention: bool = False, device=None) -> Iterator[None]:
    """Teachers frozen (no grad, eval mode) for the duration; their flags, attention kernel and device restored
    after, since the pipeline's original model is shared with evaluation."""
    saved = []
    for model in models:
        flags = [p.requires_grad for p in model.parameters()]
        attention = getattr(model.config, "_attn_implementation", None)
        where = next(model.parameters()).device
        saved.append((model, flags, attention, model.training, where))
        model.requires_grad_(False).eval()
        if eager_attention and attention != "eager":
            model.set_attn_implementation("eager")
        if device is not None:
            model.to(device)
    try:
        yield
    finally:
        for model, flags, attention, training, where in saved:
            for parameter, flag in zip(model.parameters(), flags):
                parameter.requires_grad_(flag)
            if eager_attention and attention not in (None, "eager"):
                model.set_attn_implementation(attention)
            model.train(training).to(where)


class Teachers:
    """The teacher models and their mixing weights."""

    def __init__(self, models: list[nn.Module], weights: list[float]):
        self.models = models
        self.weights = weights

    @property
    def first(self) -> nn.Module:
        return self.models[0]

    @torch.no_grad()
    def each_log_probs(self, input_ids: torch.Tensor, temperature: float) -> list[torch.Tensor]:
        """Each teacher's tempered log-probabilities [B, T, V]."""
        return [
            tempered_log_probs(model(input_ids=input_ids, use_cache=False).logits, temperature) for model in self.models
        ]

    def log_probs(self, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """Mixed tempered log-probabilities [B, T, V]."""
        outputs = self.each_log_probs(input_ids, temperature)
        return outputs[0] if len(outputs) == 1 else mix_distributions(outputs, self.weights)


def cache_key(
    teacher_names: list[str],
    weights: list[float],
    temperature: float,
    k: int,
    windows: torch.Tensor,
    window_ids: list[int],
) -> str:
    digest = hashlib.sha256(json.dumps([teacher_names, weights, temperature, k, window_ids]).encode())
    digest.update(windows[window_ids].numpy().tobytes())
    return digest.hexdigest()[:16]


class TopKCache:
    """The teacher's top-k tokens and log-probabilities for the windows training reads, loaded memory-mapped."""

    def __init__(self, path: Path, vocab_size: int):
        data = torch.load(path, mmap=True, weights_only=True)
        self.row = {int(w): r for r, w in enumerate(data["window_ids"].tolist())}
        self.top_ids = data["top_ids"]
        self.top_log_probs = data["top_log_probs"]
        self.vocab_size = vocab_size

    @staticmethod
    @torch.no_grad()
    def build(
        path: Path,
        teachers: Teachers,
        windows: torch.Tensor,
        window_ids: list[int],
        temperature: float,
        k: int,
        batch_size: int,
        device,
        advance=lambda *a, **kw: None,
    ) -> None:
        """Run the teachers once over the windows and write the cache atomically (main process only)."""
        top_ids, top_log_probs = [], []
        for start in range(0, len(window_ids), batch_size):
            ids = windows[window_ids[start : start + batch_size]].to(device)
            log_probs = teachers.log_probs(ids, temperature)
            values, indices = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
            top_ids.append(indices.to(torch.int32).cpu())
            top_log_probs.append(values.float().cpu())
            advance()
        payload = {
            "window_ids": torch.tensor(window_ids),
            "top_ids": torch.cat(top_ids),
            "top_log_probs": torch.cat(top_log_probs),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp"
        torch.save(payload, tmp)
        tmp.replace(path)

    def log_probs(self, window_ids: list[int], device) -> torch.Tensor:
        """Dense [B, T, V] log-probabilities: the cached top k, the rest of the mass spread evenly over V − k."""
        rows = [self.row[w] for w in window_ids]
        ids = self.top_ids[rows].long().to(device)
        values = self.top_log_probs[rows].to(device)
        k = ids.shape[-1]
        if k >= self.vocab_size:
            return torch.full((*ids.shape[:-1], self.vocab_size), -math.inf, device=device).scatter(-1, ids, values)
        rest = (1 - values.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / (self.vocab_size - k)
        dense = rest.log().expand(*ids.shape[:-1], self.vocab_size).clone()
        return dense.scatter(-1, ids, values)
