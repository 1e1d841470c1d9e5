"""Adaptive distillation: temperature schedule, loss-mix schedule and gap-weighted teachers (recover/adaptive.py)."""

import copy
import math

import pytest
import torch

from conftest import build_tiny_llama, write_documents
from slimlm.calibration import Calibration
from slimlm.errors import SlimlmError
from slimlm.recipe import parse_recipe
from slimlm.recover import adaptive, losses
from slimlm.recover.objectives import Batch, DistillObjective, LossWeights
from slimlm.recover.teacher import Teachers
from slimlm.registry import StageContext, get_stage

VOCAB = 64


def test_schedules_start_and_end_where_asked():
    assert adaptive.interpolate(2.0, 1.0, 0.0) == 2.0 and adaptive.interpolate(2.0, 1.0, 1.0) == 1.0
    assert adaptive.interpolate(2.0, 1.0, 0.5) == pytest.approx(1.5)
    assert adaptive.interpolate(2.0, 1.0, 0.5, "cosine") == pytest.approx(1.5)
    assert adaptive.interpolate(2.0, 1.0, 0.1, "cosine") > adaptive.interpolate(2.0, 1.0, 0.1)  # slow start
    assert [adaptive.training_fraction(b, 5) for b in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]


def test_gap_weights_favour_the_teacher_the_student_is_closer_to():
    assert adaptive.gap_weights([1.0, 1.0], [0.3, 0.3]) == pytest.approx([0.5, 0.5])
    near_second = adaptive.gap_weights([1.0, 1.0], [2.0, 0.5])
    assert near_second[1] > near_second[0] and sum(near_second) == pytest.approx(1.0)
    assert near_second[0] / near_second[1] == pytest.approx(math.exp(-1.5))
    assert adaptive.gap_weights([3.0, 1.0], [0.0, 0.0]) == pytest.approx([0.75, 0.25])


def _models():
    teacher = build_tiny_llama(VOCAB, seed=0, layers=2)
    student = build_tiny_llama(VOCAB, seed=1, layers=1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    return teacher, student, ids


def _loss(objective, student, ids, micro_batch=0):
    with torch.no_grad():
        return objective(student, Batch(ids, [0, 1], micro_batch))


def test_a_constant_schedule_equals_the_fixed_setting_and_a_real_one_moves_tau():
    teacher, student, ids = _models()
    teachers = Teachers([teacher], [1.0])
    fixed = DistillObjective(teachers, LossWeights(kl=1.0), 2.0)
    constant = DistillObjective(
        teachers,
        LossWeights(kl=1.0),
        2.0,
        temperature_schedule=adaptive.TemperatureSchedule(start=2.0, end=2.0),
        total_micro_batches=5,
    )
    assert _loss(fixed, student, ids)[0].item() == pytest.approx(_loss(constant, student, ids, 3)[0].item())
    annealed = DistillObjective(
        teachers,
        LossWeights(kl=1.0),
        2.0,
        temperature_schedule=adaptive.TemperatureSchedule(start=2.0, end=1.0),
        total_micro_batches=5,
    )
    end_loss, report = _loss(annealed, student, ids, 4)
    assert report["temperature"] == 1.0
    assert end_loss.item() == pytest.approx(_loss(DistillObjective(teachers, LossWeights(kl=1.0)), student, ids)[0])


def test_loss_mix_goes_from_forward_to_reverse_kl():
    teacher, student, ids = _models()
    teachers = Teachers([teacher], [1.0])
    mixed = DistillObjective(
        teachers, LossWeights(kl=1.0), loss_end=LossWeights(kl=0.0, reverse_kl=1.0), total_micro_batches=11
    )
    student_lp = losses.tempered_log_probs(student(input_ids=ids).logits.detach())
    teacher_lp = losses.tempered_log_probs(teacher(input_ids=ids).logits.detach())
    forward, reverse = losses.forward_kl(student_lp, teacher_lp), losses.reverse_kl(student_lp, teacher_lp)
    assert forward.item() != pytest.approx(reverse.item())
    assert _loss(mixed, student, ids, 0)[0].item() == pytest.approx(forward.item(), rel=1e-5)
    assert _loss(mixed, student, ids, 10)[0].item() == pytest.approx(reverse.item(), rel=1e-5)
    assert _loss(mixed, student, ids, 5)[0].item() == pytest.approx(0.5 * (forward + reverse).item(), rel=1e-5)


def test_gap_weighting_leans_on_the_teacher_the_student_already_matches():
    teacher, student, ids = _models()
    assistant = copy.deepcopy(student)  # the student's gap to it is 0
    objective = DistillObjective(
        Teachers([teacher, assistant], [1.0, 1.0]), LossWeights(kl=1.0), teacher_weighting="gap"
    )
    _, report = _loss(objective, student, ids)
    assert report["teacher1_gap"] == pytest.approx(0.0, abs=1e-6) and report["teacher0_gap"] > 0
    assert report["teacher1_weight"] == pytest.approx(1 / (1 + math.exp(-report["teacher0_gap"])), rel=1e-5)
    fixed = DistillObjective(Teachers([teacher, assistant], [1.0, 1.0]), LossWeights(kl=1.0))
    assert "teacher0_weight" not in _loss(fixed, student, ids)[1]
    # a weight tilted toward the matched teacher means a smaller loss than the fixed half-half mixture
    assert _loss(objective, student, ids)[0].item() < _loss(fixed, student, ids)[0].item()


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"teacher_weighting": "gap"}, "teacher_weighting: gap weighs several teachers"),
        ({"loss_mix": {"end": {"kl": 0}}}, "loss_mix.end: every loss weight is 0"),
        ({"loss_mix": {"end": {"kl": 1, "hidden": 1}}}, "hidden and attention must keep the weights"),
        ({"loss_mix": {"end": {"kl": 1}, "schedule": "step"}}, "Input should be 'linear' or 'cosine'"),
        ({"temperature": {"start": 2, "end": 1}, "teacher_topk": 8}, "teacher_topk: the cache holds one fixed"),
        ({"temperature": {"start": 2}}, "distill.temperature: end: Field required"),
    ],
)
def test_bad_adaptive_options_are_one_line_errors(options, expected):
    with pytest.raises(SlimlmError) as err:
        parse_recipe({"model": "m", "stages": [{"distill": options}]})
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_distill_stage_runs_every_adaptive_option_together(tiny_tokenizer, tmp_path):
    teacher = build_tiny_llama(len(tiny_tokenizer), layers=2)
    options = {
        "steps": 3,
        "batch_size": 2,
        "seq_len": 32,
        "lr": 1e-3,
        "data": write_documents(tmp_path),
        "teacher": ["original", "original"],
        "teacher_weighting": "gap",
        "temperature": {"start": 2.0, "end": 1.0, "schedule": "cosine"},
        "loss_mix": {"end": {"kl": 0.5, "jsd": 0.5}},
    }
    recipe = parse_recipe({"model": "m", "stages": [{"distill": options}]})
    context = StageContext(tiny_tokenizer, Calibration(recipe.calibration, tiny_tokenizer), tmp_path, lambda: teacher)
    get_stage("distill").apply(
        build_tiny_llama(len(tiny_tokenizer), seed=1, layers=1), recipe.stages[0].options, context
    )
    summary = next(note for note in context.notes if note.startswith("distill: 3 steps"))
    assert "τ=2→1 (cosine)" in summary and "→ {'kl': 0.5, 'jsd': 0.5}" in summary and "gap" in summary
