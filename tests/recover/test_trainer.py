import json

import pytest
import torch

from conftest import build_tiny_llama
from slimlm.modules import named_decoder_linears
from slimlm.quantize.grid import QuantGrid, fake_quantize
from slimlm.recover import constraints, losses
from slimlm.recover.metrics import read_metrics
from slimlm.recover.objectives import DistillObjective, LanguageModelObjective, LossWeights, sample_continuation
from slimlm.recover.teacher import Teachers, TopKCache, frozen
from slimlm.recover.trainer import TrainConfig, train

VOCAB = 64


def _teacher():
    """A teacher with confident predictions (a scaled LM head), so there is something to learn."""
    teacher = build_tiny_llama(VOCAB, seed=0, layers=2, tie=False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40)
    return teacher


def _windows(count=32, seq_len=16, seed=0):
    return torch.randint(0, VOCAB, (count, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _kl(student, teacher, windows) -> float:
    return losses.logit_distillation(student(windows).logits, teacher(windows).logits).item()


def _distill(student, teacher, tmp_path, steps=25, **kwargs):
    weights = kwargs.pop("weights", LossWeights(kl=1.0))
    objective = DistillObjective(Teachers([teacher], [1.0]), weights, **kwargs)
    config = TrainConfig(steps=steps, batch_size=4, lr=5e-3, warmup=2, checkpoint_every=0)
    with frozen([teacher]):
        return train(student, _windows(), objective, config, tmp_path / "run")


def test_distillation_reduces_kl_to_the_teacher(tmp_path):
    teacher, student = _teacher(), build_tiny_llama(VOCAB, seed=1, layers=1)
    seen = _windows()[:8]  # a 1-layer student cannot learn a random teacher in general; its training data it can
    before = _kl(student, teacher, seen)
    result = _distill(student, teacher, tmp_path)
    assert _kl(result.model, teacher, seen) < 0.8 * before
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == list(range(1, 26))
    assert records[-1]["kl"] < records[0]["kl"] and all(r["tokens_per_s"] > 0 for r in records)
    assert not result.model.training


def test_teacher_is_frozen_during_training_and_restored_after():
    teacher = _teacher().train()
    with frozen([teacher], eager_attention=True):
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert teacher.config._attn_implementation == "eager"
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert teacher.config._attn_implementation != "eager"


def test_hidden_attention_and_on_policy_losses_train_with_a_projection(tmp_path):
    teacher = _teacher()
    student = build_tiny_llama(VOCAB, seed=1, layers=1)
    projection = torch.nn.Linear(64, 64, bias=False)
    initial = projection.weight.detach().clone()
    teacher.set_attn_implementation("eager")
    student.set_attn_implementation("eager")
    result = _distill(
        student,
        teacher,
        tmp_path,
        steps=4,
        weights=LossWeights(kl=1, hidden=0.5, attention=0.5, lm=0.1, jsd=0.5, reverse_kl=0.5),
        temperature=2.0,
        layer_pairs=[(0, 1)],
        attention_pairs=[(0, 1)],
        projection=projection,
        on_policy=0.5,
        seed=3,
    )
    record = read_metrics(result.metrics_path)[-1]
    assert {"kl", "reverse_kl", "jsd", "hidden", "attention"} <= set(record)
    assert not torch.equal(projection.weight, initial)  # the projection trained with the student
    assert any(r["on_policy"] > 0 for r in read_metrics(result.metrics_path))


def test_sampling_is_seeded():
    model = build_tiny_llama(VOCAB, seed=1, layers=1)
    prompt = _windows(2)[:, :3]
    first = sample_continuation(model, prompt, 10, torch.Generator().manual_seed(0))
    again = sample_continuation(model, prompt, 10, torch.Generator().manual_seed(0))
    assert first.shape == (2, 10) and torch.equal(first, again) and torch.equal(first[:, :3], prompt)


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path):
    student = build_tiny_llama(VOCAB, seed=1, layers=1)
    config = TrainConfig(steps=3, batch_size=2, grad_accum=2, lr=1e-3, precision="bf16", gradient_checkpointing=True)
    result = train(student, _windows(), LanguageModelObjective(), config, tmp_path / "bf16")
    assert result.steps == 3 and result.last_loss is not None
    assert not result.model.is_activation_checkpointing
    assert next(result.model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_qat_leaves_weights_on_the_grid_and_sparsity_is_kept(tmp_path):
    teacher, student = _teacher(), build_tiny_llama(VOCAB, seed=1, layers=1)
    grid = QuantGrid(4, True, 32)
    with torch.no_grad():
        for _, linear in named_decoder_linears(student):
            linear.weight[:, ::2] = 0  # 50% pruned
    linears = constraints.qat_targets(student, None)
    constraints.attach_fake_quantization(linears, grid)
    masks = constraints.SparsityMasks(student)
    assert len(masks) == len(linears)
    objective = DistillObjective(Teachers([teacher], [1.0]), LossWeights(kl=1.0))
    with frozen([teacher]):
        result = train(
            student,
            _windows(),
            objective,
            TrainConfig(steps=5, batch_size=4, lr=1e-2),
            tmp_path / "qat",
            after_step=masks.apply,
        )
    constraints.detach_fake_quantization(linears, grid)
    for _, linear in named_decoder_linears(result.model):
        assert torch.equal(linear.weight, fake_quantize(linear.weight, grid))  # already on the grid
        assert (linear.weight[:, ::2] == 0).all()
        assert torch.equal(linear.slimlm_quantized.dequantize(), linear.weight)


def test_topk_cache_stands_in_for_the_teacher(tmp_path):
    teacher = _teacher()
    windows = _windows(6)
    path = tmp_path / "cache.pt"
    with frozen([teacher]):
        TopKCache.build(path, Teachers([teacher], [1.0]), windows, [1, 4], 2.0, k=VOCAB, batch_size=2, device="cpu")
        exact = losses.tempered_log_probs(teacher(windows[[4, 1]]).logits, 2.0)
    cache = TopKCache(path, VOCAB)
    assert torch.allclose(cache.log_probs([4, 1], "cpu"), exact, atol=1e-5)
    TopKCache.build(tmp_path / "top8.pt", Teachers([teacher], [1.0]), windows, [1], 2.0, 8, 2, "cpu")
    approx = TopKCache(tmp_path / "top8.pt", VOCAB).log_probs([1], "cpu")
    assert torch.allclose(approx.exp().sum(-1), torch.ones(1, 16), atol=1e-5)  # still a distribution


def test_resume_refuses_checkpoints_of_other_settings(tmp_path):
    from slimlm.errors import SlimlmError

    student = build_tiny_llama(VOCAB, seed=1, layers=1)
    train(
        student,
        _windows(),
        LanguageModelObjective(),
        TrainConfig(steps=2, batch_size=2, checkpoint_every=1),
        tmp_path / "run",
    )
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 2
    with pytest.raises(SlimlmError, match="other settings"):
        train(student, _windows(), LanguageModelObjective(), TrainConfig(steps=3, batch_size=2), tmp_path / "run")


class _LossFrom(LanguageModelObjective):
    """The LM loss, multiplied by `factor` from the `at`-th optimizer step on (one micro-batch per step)."""

    def __init__(self, at: int, factor: float):
        self.calls, self.at, self.factor = 0, at, factor

    def __call__(self, student, batch):
        loss, parts = super().__call__(student, batch)
        self.calls += 1
        return (loss * self.factor if self.calls >= self.at else loss), parts


@pytest.mark.parametrize(
    ("factor", "message"),
    [
        (1e3, r"diverged at step 4: loss .* is above .*10× the first"),
        (float("nan"), r"diverged at step 4: the loss became nan"),
    ],
)
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, factor, message):
    from slimlm.recover.checkpoint import completed_checkpoints
    from slimlm.recover.trainer import TrainingDiverged

    student = build_tiny_llama(VOCAB, seed=1, layers=1)
    config = TrainConfig(steps=10, batch_size=2, checkpoint_every=1, keep_checkpoints=5)
    with pytest.raises(TrainingDiverged, match=message) as err:
        train(student, _windows(), _LossFrom(4, factor), config, tmp_path / "run")
    # step 4's loss came from the weights checkpointed after step 3: that checkpoint goes, the older ones stay
    assert [step for step, _ in completed_checkpoints(tmp_path / "run" / "checkpoints")] == [1, 2]
    kept = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert str(err.value).endswith(f"last good checkpoint kept: {kept}")
    assert "\n" not in str(err.value)


def test_a_real_too_high_lr_is_caught(tmp_path):
    """lr 100 on a distillation: the KL explodes within a few steps instead of ending near a uniform guess."""
    from slimlm.recover.trainer import TrainingDiverged

    teacher, student = _teacher(), build_tiny_llama(VOCAB, seed=1, layers=1)
    objective = DistillObjective(Teachers([teacher], [1.0]), LossWeights(kl=1.0))
    with frozen([teacher]), pytest.raises(TrainingDiverged, match="lower lr"):
        train(
            student,
            _windows(),
            objective,
            TrainConfig(steps=25, batch_size=4, lr=100.0, warmup=2, checkpoint_every=0),
            tmp_path / "run",
        )
