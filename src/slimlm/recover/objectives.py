"""Training objectives: what a batch costs the student. The trainer calls ``objective(student, batch)``.

- `LanguageModelObjective`: next-token cross-entropy on the data (plain fine-tuning, LoRA with ``loss: lm``).
- `DistillObjective`: a weighted sum of forward KL, reverse KL, GKD's generalized JSD (all on τ-softened
  distributions, scaled by τ²), hidden-state and attention transfer, and next-token cross-entropy (losses.py);
  τ, the weights and the teachers' mixture may change over training (adaptive.py). On teacher-written text
  (teacher_text.py) an LM mask keeps the prompt tokens out of the cross-entropy.

On-policy distillation (GKD, Agarwal et al. 2024): a fraction λ of micro-batches replaces the data by sequences the
student writes itself: the window's first quarter is the prompt and the rest is sampled from the student
(temperature 1, its own KV cache), then the teacher scores them; only positions that predict sampled tokens count,
and the LM loss is skipped on them (the targets are the student's own). Which micro-batches are on-policy, and the
samples, come from generators seeded by (seed, micro-batch), so a resumed run draws the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, NonNegativeFloat
from torch import nn

from slimlm.recover import adaptive, losses
from slimlm.recover.layers import captured_layers
from slimlm.recover.teacher import Teachers, TopKCache


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    window_ids: list[int]  # rows of the packed windows (for the teacher cache)
    micro_batch: int  # global position in the data stream


class LossWeights(BaseModel):
    """The weight of each loss term (distill's `loss` in a recipe)."""

    model_config = ConfigDict(extra="forbid")
    kl: NonNegativeFloat = 1.0
    reverse_kl: NonNegativeFloat = 0.0
    jsd: NonNegativeFloat = 0.0
    hidden: NonNegativeFloat = 0.0
    attention: NonNegativeFloat = 0.0
    lm: NonNegativeFloat = 0.0

    def active(self) -> dict[str, float]:
        return {name: weight for name, weight in self.model_dump().items() if weight > 0}


def window_mask(lm_mask: torch.Tensor | None, batch: Batch) -> torch.Tensor | None:
    """The batch's rows of a per-window LM-loss mask (teacher-generated text: only the teacher's tokens are
    targets), None when every token is one."""
    return None if lm_mask is None else lm_mask[batch.window_ids].to(batch.input_ids.device)


@dataclass
class LanguageModelObjective:
    lm_mask: torch.Tensor | None = None  # [N, T] over the packed windows: position t scores token t+1

    def trainable_modules(self) -> list[nn.Module]:
        return []

    def to(self, device) -> None:
        pass

    def __call__(self, student: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = student(input_ids=batch.input_ids, use_cache=False).logits
        loss = losses.next_token_loss(logits, batch.input_ids, window_mask(self.lm_mask, batch))
        return loss, {"lm": loss.item()}


@torch.no_grad()
def sample_continuation(
    model: nn.Module, prompt: torch.Tensor, length: int, generator: torch.Generator, temperature: float = 1.0
) -> torch.Tensor:
    """prompt [B, P] extended to [B, length] by ancestral sampling with the KV cache and a seeded generator."""
    tokens = prompt
    output = model(input_ids=prompt, use_cache=True)
    while tokens.shape[1] < length:
        probs = torch.softmax(output.logits[:, -1].float() / temperature, dim=-1)
        following = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, following], dim=1)
        if tokens.shape[1] < length:
            output = model(input_ids=following, past_key_values=output.past_key_values, use_cache=True)
    return tokens


@dataclass
class DistillObjective:
    teachers: Teachers | None
    weights: LossWeights
    temperature: float = 1.0
    jsd_beta: float = 0.5
    layer_pairs: list[tuple[int, int]] = field(default_factory=list)  # (student layer, teacher layer): hidden
    attention_pairs: list[tuple[int, int]] = field(default_factory=list)  # pairs with matching head counts
    hidden_metric: str = "mse"
    projection: nn.Module | None = None  # student width → teacher width, learned with the student
    on_policy: float = 0.0
    seed: int = 0
    cache: TopKCache | None = None
    lm_mask: torch.Tensor | None = None  # teacher-generated text: the LM loss scores the teacher's tokens only
    # adaptive settings (adaptive.py); the defaults keep temperature, loss weights and teacher weights fixed
    temperature_schedule: adaptive.TemperatureSchedule | None = None  # replaces `temperature`
    loss_end: LossWeights | None = None  # the weights move from `weights` to these
    loss_schedule: str = "linear"
    teacher_weighting: str = "fixed"  # fixed | gap
    total_micro_batches: int = 1

    def trainable_modules(self) -> list[nn.Module]:
        return [self.projection] if self.projection is not None else []

    def to(self, device) -> None:
        """Teachers go where the trainer put the student (accelerate's device)."""
        for model in self.teachers.models if self.teachers is not None else []:
            model.to(device)

    def is_on_policy(self, micro_batch: int) -> bool:
        if self.on_policy <= 0:
            return False
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + micro_batch)
        return torch.rand((), generator=generator).item() < self.on_policy

    def _on_policy_batch(self, student: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch.input_ids
        prompt_len = max(1, ids.shape[1] // 4)
        # On the batch's device, so sampling needs no host round trip per token.
        generator = torch.Generator(device=ids.device).manual_seed(self.seed * 1_000_003 + batch.micro_batch + 7_919)
        was_training = student.training
        student.eval()  # no dropout while sampling
        sampled = sample_continuation(student, ids[:, :prompt_len], ids.shape[1], generator)
        student.train(was_training)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, prompt_len - 1 :] = True  # positions whose next token was sampled (and the last one)
        return sampled, mask

    def current(self, micro_batch: int) -> tuple[float, dict[str, float]]:
        """This micro-batch's temperature and loss weights (fixed unless a schedule is set)."""
        fraction = adaptive.training_fraction(micro_batch, self.total_micro_batches)
        temperature = adaptive.temperature_at(self.temperature_schedule or self.temperature, fraction)
        end = None if self.loss_end is None else self.loss_end.model_dump()
        return temperature, adaptive.mixed_weights(self.weights.model_dump(), end, fraction, self.loss_schedule)

    def __call__(self, student: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        on_policy = self.is_on_policy(batch.micro_batch)
        ids, mask = self._on_policy_batch(student, batch) if on_policy else (batch.input_ids, None)
        temperature, weights = self.current(batch.micro_batch)
        need_hidden = weights["hidden"] > 0 and bool(self.layer_pairs)
        need_attention = weights["attention"] > 0 and bool(self.attention_pairs)
        student_layers = [s for s, _ in self.layer_pairs]
        teacher_layers = [t for _, t in self.layer_pairs]
        with captured_layers(student, student_layers, need_hidden, need_attention) as student_found:
            logits = student(input_ids=ids, use_cache=False).logits
        teacher_found: dict = {"hidden": {}, "attention": {}}
        teacher_log_probs, report = None, {}
        if not (need_hidden or need_attention or weights["kl"] or weights["reverse_kl"] or weights["jsd"]):
            pass  # the LM loss alone needs no teacher: skip its forward pass
        elif self.cache is not None:
            student_log_probs = losses.tempered_log_probs(logits, temperature)
            teacher_log_probs = self.cache.log_probs(batch.window_ids, logits.device)
        else:
            student_log_probs = losses.tempered_log_probs(logits, temperature)
            capture = captured_layers(self.teachers.first, teacher_layers, need_hidden, need_attention)
            with capture as teacher_found:
                teacher_log_probs, report = self._teacher_log_probs(ids, temperature, student_log_probs, mask)
        parts = {}
        if teacher_log_probs is not None:
            parts = self._logit_parts(student_log_probs, teacher_log_probs, mask, temperature, weights)
        if need_hidden:
            parts["hidden"] = losses.hidden_state_loss(
                [student_found["hidden"][s] for s, _ in self.layer_pairs],
                [teacher_found["hidden"][t] for _, t in self.layer_pairs],
                self.projection,
                self.hidden_metric,
                mask,
            )
        if need_attention:
            parts["attention"] = losses.attention_transfer_loss(
                [student_found["attention"][s] for s, _ in self.attention_pairs],
                [teacher_found["attention"][t] for _, t in self.attention_pairs],
                mask,
            )
        if weights["lm"] > 0 and not on_policy:
            parts["lm"] = losses.next_token_loss(logits, ids, window_mask(self.lm_mask, batch))
        total = sum(weights[name] * value for name, value in parts.items())
        report.update({name: value.item() for name, value in parts.items()})
        report["on_policy"] = float(on_policy)
        if self.temperature_schedule is not None:
            report["temperature"] = temperature
        return total, report

    def _teacher_log_probs(self, ids, temperature: float, student_log_probs, mask) -> tuple[torch.Tensor, dict]:
        """The teachers' mixed distribution: fixed weights, or (teacher_weighting: gap) weights from the student's
        forward KL to each teacher on this batch (adaptive.gap_weights); the weights used are reported."""
        if self.teacher_weighting != "gap" or len(self.teachers.models) == 1:
            return self.teachers.log_probs(ids, temperature), {}
        each = self.teachers.each_log_probs(ids, temperature)
        student = student_log_probs.detach()
        gaps = [losses.forward_kl(student, teacher, mask).item() for teacher in each]
        weights = adaptive.gap_weights(self.teachers.weights, gaps)
        report = {f"teacher{k}_weight": w for k, w in enumerate(weights)}
        report.update({f"teacher{k}_gap": gap for k, gap in enumerate(gaps)})
        return losses.mix_distributions(each, weights), report

    def _logit_parts(self, student_log_probs, teacher_log_probs, mask, temperature, weights) -> dict:
        scale = temperature**2  # Hinton et al.: keeps gradient magnitudes independent of τ
        parts = {}
        if weights["kl"] > 0:
            parts["kl"] = scale * losses.forward_kl(student_log_probs, teacher_log_probs, mask)
        if weights["reverse_kl"] > 0:
            parts["reverse_kl"] = scale * losses.reverse_kl(student_log_probs, teacher_log_probs, mask)
        if weights["jsd"] > 0:
            parts["jsd"] = scale * losses.generalized_jsd(student_log_probs, teacher_log_probs, self.jsd_beta, mask)
        return parts
