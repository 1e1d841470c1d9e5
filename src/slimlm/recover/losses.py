"""Distillation losses: what the student is pulled toward, per token, averaged over the tokens a mask keeps.

- Logit distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"): both
  distributions are softened with a temperature τ, and the loss is scaled by τ² so that its gradients keep the same
  magnitude whatever τ (the soft targets' gradients shrink as 1/τ²).
- Forward KL(p_teacher ‖ p_student) is mode-covering; reverse KL(p_student ‖ p_teacher) is mode-seeking, which
  MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models") argues suits a small
  student that cannot cover every mode of a large teacher.
- Generalized Jensen-Shannon divergence (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
  from Self-Generated Mistakes", GKD): with M = β·p_T + (1−β)·p_S, JSD(β) = β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M).
  JSD(β)/β → forward KL as β → 0 and JSD(β)/(1−β) → reverse KL as β → 1; as in TRL's GKD trainer, β = 0 and β = 1
  are taken to mean those limits (forward and reverse KL), not the degenerate 0.
- Hidden-state transfer (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020): MSE or cosine distance between a
  student layer's output and its mapped teacher layer's, through a learned linear projection when widths differ.
- Attention transfer (TinyBERT; MiniLM, Wang et al. 2020): KL between the teacher's and the student's attention
  probabilities of mapped layers with the same head count. The probabilities only exist with eager attention,
  which materialises a [batch, heads, seq, seq] matrix per layer: memory grows with seq², and SDPA/flash kernels
  cannot be used while this loss is on.

Teacher distributions enter as log-probabilities already softened by τ, so that several teachers can be mixed and a
top-k cache can stand in for a teacher (see teacher.py). Every loss works in float32 whatever the model dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token values over the tokens where `mask` is true (all tokens when mask is None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def tempered_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def mix_distributions(log_probs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """log Σ_k w_k p_k for normalised weights: several teachers as one distribution."""
    total = sum(weights)
    stacked = torch.stack([lp + math.log(w / total) for lp, w in zip(log_probs, weights)])
    return torch.logsumexp(stacked, dim=0)


def kl_per_token(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dimension, from log-probabilities; terms with p = 0 count 0 (not NaN)."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(dim=-1)


def forward_kl(student_log_probs, teacher_log_probs, mask=None) -> torch.Tensor:
    """KL(teacher ‖ student), the classic distillation loss (mode-covering)."""
    return masked_mean(kl_per_token(teacher_log_probs, student_log_probs), mask)


def reverse_kl(student_log_probs, teacher_log_probs, mask=None) -> torch.Tensor:
    """KL(student ‖ teacher), MiniLLM's mode-seeking loss."""
    return masked_mean(kl_per_token(student_log_probs, teacher_log_probs), mask)


def generalized_jsd(student_log_probs, teacher_log_probs, beta: float, mask=None) -> torch.Tensor:
    """GKD's JSD(β); β = 0 gives forward KL and β = 1 reverse KL (the normalised limits, see the module docstring)."""
    if beta <= 0:
        return forward_kl(student_log_probs, teacher_log_probs, mask)
    if beta >= 1:
        return reverse_kl(student_log_probs, teacher_log_probs, mask)
    mixture = mix_distributions([teacher_log_probs, student_log_probs], [beta, 1 - beta])
    per_token = beta * kl_per_token(teacher_log_probs, mixture) + (1 - beta) * kl_per_token(student_log_probs, mixture)
    return masked_mean(per_token, mask)


def logit_distillation(
    student_logits, teacher_logits, temperature: float = 1.0, kind: str = "forward", beta: float = 0.5, mask=None
) -> torch.Tensor:
    """One divergence between tempered distributions, scaled by τ² (Hinton et al. 2015). kind: forward|reverse|jsd."""
    student = tempered_log_probs(student_logits, temperature)
    teacher = tempered_log_probs(teacher_logits, temperature)
    divergences = {
        "forward": lambda: forward_kl(student, teacher, mask),
        "reverse": lambda: reverse_kl(student, teacher, mask),
        "jsd": lambda: generalized_jsd(student, teacher, beta, mask),
    }
    return temperature**2 * divergences[kind]()


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask=None) -> torch.Tensor:
    """Cross-entropy of position t's logits against token t+1; `mask` marks the positions (length T) to score."""
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    return masked_mean(losses.view(input_ids.shape[0], -1), None if mask is None else mask[:, :-1])


def hidden_state_loss(
    student_states: list[torch.Tensor],
    teacher_states: list[torch.Tensor],
    projection: torch.nn.Module | None = None,
    metric: str = "mse",
    mask=None,
) -> torch.Tensor:
    """Mean over mapped layer pairs of a per-token distance between student and teacher hidden states.

    mse: mean squared difference over features; cosine: 1 − cos. `projection` maps student width to teacher width.
    """
    losses = []
    for student, teacher in zip(student_states, teacher_states, strict=True):
        student = student.float() if projection is None else projection(student.to(projection.weight.dtype)).float()
        teacher = teacher.float()
        if metric == "cosine":
            per_token = 1 - F.cosine_similarity(student, teacher, dim=-1)
        else:
            per_token = (student - teacher).pow(2).mean(dim=-1)
        losses.append(masked_mean(per_token, mask))
    return torch.stack(losses).mean()


def attention_transfer_loss(
    student_attentions: list[torch.Tensor], teacher_attentions: list[torch.Tensor], mask=None
) -> torch.Tensor:
    """Mean over mapped layers of KL(teacher attention row ‖ student attention row), averaged over heads and the
    query positions `mask` keeps. Inputs are probabilities [batch, heads, query, key] (eager attention)."""
    losses = []
    for student, teacher in zip(student_attentions, teacher_attentions, strict=True):
        teacher = teacher.float()
        student_log = student.float().clamp_min(1e-12).log()
        teacher_log = teacher.clamp_min(1e-30).log()
        per_row = torch.where(teacher > 0, teacher * (teacher_log - student_log), torch.zeros_like(teacher)).sum(-1)
        losses.append(masked_mean(per_row.mean(dim=1), mask))  # heads averaged, then tokens
    return torch.stack(losses).mean()
