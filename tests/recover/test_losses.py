import math

import pytest
import torch
import torch.nn.functional as F

from slimlm.recover import losses


def _logits(seed: int, shape=(2, 5, 7)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


def _log_probs(seed: int) -> torch.Tensor:
    return F.log_softmax(_logits(seed), dim=-1)


def test_kl_of_identical_distributions_is_zero():
    logits = _logits(0)
    for kind in ("forward", "reverse", "jsd"):
        assert losses.logit_distillation(logits, logits.clone(), 2.0, kind).item() == pytest.approx(0, abs=1e-6)


def test_forward_kl_matches_a_hand_computation():
    p = torch.tensor([0.7, 0.2, 0.1])  # teacher
    q = torch.tensor([0.5, 0.3, 0.2])  # student
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    got = losses.forward_kl(q.log().view(1, 1, 3), p.log().view(1, 1, 3))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    reverse = sum(qi * math.log(qi / pi) for pi, qi in zip(p.tolist(), q.tolist()))
    assert losses.reverse_kl(q.log().view(1, 1, 3), p.log().view(1, 1, 3)).item() == pytest.approx(reverse, rel=1e-5)


def test_temperature_squared_scaling():
    student, teacher, tau = _logits(1), _logits(2), 3.0
    soft = losses.forward_kl(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1))
    assert losses.logit_distillation(student, teacher, tau).item() == pytest.approx(tau**2 * soft.item(), rel=1e-5)


def test_reverse_kl_is_asymmetric_and_swaps_with_forward():
    student, teacher = _log_probs(3), _log_probs(4)
    forward = losses.forward_kl(student, teacher)
    reverse = losses.reverse_kl(student, teacher)
    assert abs(forward.item() - reverse.item()) > 1e-3
    assert losses.reverse_kl(teacher, student).item() == pytest.approx(forward.item(), rel=1e-6)


def test_jsd_endpoints_relate_to_kl():
    student, teacher = _log_probs(5), _log_probs(6)
    forward = losses.forward_kl(student, teacher).item()
    reverse = losses.reverse_kl(student, teacher).item()
    eps = 1e-4
    assert losses.generalized_jsd(student, teacher, eps).item() / eps == pytest.approx(forward, rel=1e-2)
    assert losses.generalized_jsd(student, teacher, 1 - eps).item() / eps == pytest.approx(reverse, rel=1e-2)
    assert losses.generalized_jsd(student, teacher, 0.0).item() == pytest.approx(forward, rel=1e-6)
    assert losses.generalized_jsd(student, teacher, 1.0).item() == pytest.approx(reverse, rel=1e-6)


def test_symmetric_jsd_is_symmetric_and_bounded_by_log2():
    student, teacher = _log_probs(7), _log_probs(8)
    half = losses.generalized_jsd(student, teacher, 0.5).item()
    assert half == pytest.approx(losses.generalized_jsd(teacher, student, 0.5).item(), rel=1e-5)
    assert 0 < half < math.log(2)


def test_mask_averages_only_kept_tokens():
    student, teacher = _log_probs(9), _log_probs(10)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2] = True
    mask[1, 4] = True
    per_token = losses.kl_per_token(teacher, student)
    expected = (per_token[0, 2] + per_token[1, 4]) / 2
    assert losses.forward_kl(student, teacher, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_kl_ignores_zero_probability_tokens():
    p_log = torch.tensor([[[0.0, -math.inf]]])  # all mass on token 0
    q_log = torch.log(torch.tensor([[[0.5, 0.5]]]))
    assert losses.forward_kl(q_log, p_log).item() == pytest.approx(math.log(2), rel=1e-6)


def test_mixture_of_teachers_is_the_weighted_average_of_probabilities():
    a, b = _log_probs(11), _log_probs(12)
    mixed = losses.mix_distributions([a, b], [3.0, 1.0]).exp()
    assert torch.allclose(mixed, 0.75 * a.exp() + 0.25 * b.exp(), atol=1e-6)


def test_next_token_loss_matches_cross_entropy_on_shifted_targets():
    logits = _logits(13, (2, 5, 7))
    ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    assert losses.next_token_loss(logits, ids).item() == pytest.approx(expected.item(), rel=1e-6)


def test_hidden_state_losses():
    s = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    t = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    assert losses.hidden_state_loss([s], [s.clone()]).item() == pytest.approx(0, abs=1e-7)
    assert losses.hidden_state_loss([s], [t]).item() == pytest.approx((s - t).pow(2).mean().item(), rel=1e-6)
    assert losses.hidden_state_loss([s], [3 * s], metric="cosine").item() == pytest.approx(0, abs=1e-6)
    projection = torch.nn.Linear(4, 6, bias=False)
    wide = torch.randn(2, 5, 6)
    value = losses.hidden_state_loss([s], [wide], projection)
    value.backward()
    assert projection.weight.grad is not None and value.item() > 0


def test_attention_transfer_is_zero_for_equal_maps_and_positive_otherwise():
    scores = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    teacher = scores.masked_fill(~causal, -math.inf).softmax(-1)
    student = (scores * 0.3).masked_fill(~causal, -math.inf).softmax(-1)
    assert losses.attention_transfer_loss([teacher], [teacher.clone()]).item() == pytest.approx(0, abs=1e-6)
    per_row = (teacher * (teacher.clamp_min(1e-30).log() - student.clamp_min(1e-12).log())).sum(-1)
    expected = per_row.mean().item()
    assert losses.attention_transfer_loss([student], [teacher]).item() == pytest.approx(expected, rel=1e-5)
