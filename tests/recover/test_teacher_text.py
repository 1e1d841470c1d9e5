"""Teacher-generated training text (black-box and task-specific distillation, recover/teacher_text.py)."""

import jinja2
import pytest
import torch
import yaml

from conftest import build_tiny_llama, load_task_hooks, write_documents
from slimlm.calibration import Calibration
from slimlm.evaluate.tasks import TASKS_DIR
from slimlm.paths import shared_data_dir
from slimlm.recipe import parse_recipe
from slimlm.recover import teacher_text
from slimlm.recover.teacher_text import HELD_APART, TeacherTextOptions
from slimlm.registry import StageContext, get_stage

hooks = load_task_hooks()


def test_packed_teacher_text_scores_only_the_teachers_tokens():
    documents = [{"prompt": [5, 6], "continuation": [7, 8, 9]}, {"prompt": [10], "continuation": [11]}]
    windows, mask = teacher_text.teacher_text_windows(documents, 4, eos_id=2)
    assert windows.tolist() == [[5, 6, 7, 8], [9, 2, 10, 11]]  # EOS between documents, the 1-token tail dropped
    # position t is scored when token t+1 is the teacher's (6→7, 7→8; 10→11); prompts and EOS are context only
    assert mask.tolist() == [[False, True, True, False], [False, False, True, False]]


def _yaml_template(name: str) -> str:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    return yaml.load((TASKS_DIR / name).read_text(), Loader=Loader)["doc_to_text"]


@pytest.mark.parametrize("task, yaml_file", [("sst2", "sst2_review.yaml"), ("triviaqa", "triviaqa.yaml")])
def test_task_prompts_use_the_evaluation_template_on_rows_never_evaluated(task, yaml_file):
    data = str(shared_data_dir())
    if task == "sst2":
        splits = hooks.load_sst2(data, "sst2/dev.tsv")
        evaluated, never_trained = list(splits["validation"]), []
    else:
        splits = hooks.load_triviaqa(data, "triviaqa/triviaqa_validation_3000.jsonl", fewshot_pool=100)
        evaluated, never_trained = list(splits["validation"]), list(splits["train"])  # train: the few-shot pool
    template = jinja2.Template(_yaml_template(yaml_file))
    rows = teacher_text.task_rows(task)
    trained = [teacher_text.task_prompt(task, rows[i]) for i in teacher_text.held_apart_indices(task)]
    # the same rows in the same file order, formatted exactly as lm-eval formats them
    assert trained == [template.render(**doc) for doc in evaluated[HELD_APART[task] :]]
    scored = {template.render(**doc) for doc in evaluated[: HELD_APART[task]]}  # any limit <= HELD_APART
    assert not scored & set(trained)
    assert not {template.render(**doc) for doc in never_trained} & set(trained)
    assert len(trained) == len(evaluated) - HELD_APART[task] > 300


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer))
    options = TeacherTextOptions(max_new_tokens=6, temperature=0.0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    together = teacher_text.generate_batch(model, prompts, options, pad_id=2, seed=0, device="cpu")
    alone = [teacher_text.generate_batch(model, [p], options, pad_id=2, seed=0, device="cpu")[0] for p in prompts]
    assert together == alone


def test_generations_are_seeded_cached_and_reused(tiny_tokenizer, tmp_path):
    model = build_tiny_llama(len(tiny_tokenizer))
    source = write_documents(tmp_path)
    options = TeacherTextOptions(prompts=source, samples=6, prompt_tokens=4, max_new_tokens=5, batch_size=4)
    notes: list[str] = []
    first = teacher_text.cached_documents(model, tiny_tokenizer, options, notes)
    assert len(first) == 6 and all(len(doc["prompt"]) == 4 for doc in first)
    assert "teacher wrote 6 continuations" in notes[-1]
    torch.manual_seed(123)  # the caller's random state does not change what is generated
    assert teacher_text.cached_documents(model, tiny_tokenizer, options, notes) == first
    assert "teacher text reused" in notes[-1]
    fresh = teacher_text.generate_documents(
        model, tiny_tokenizer, teacher_text.prompt_ids(tiny_tokenizer, options)[0], options
    )
    assert fresh == first
    reseeded = teacher_text.cached_documents(model, tiny_tokenizer, options.model_copy(update={"seed": 1}), notes)
    assert "teacher wrote" in notes[-1] and reseeded != first
    other_teacher = build_tiny_llama(len(tiny_tokenizer), seed=5)
    teacher_text.cached_documents(other_teacher, tiny_tokenizer, options, notes)
    assert "teacher wrote" in notes[-1]


def test_black_box_distillation_stage_trains_on_teacher_text_only(tiny_tokenizer, tmp_path):
    teacher = build_tiny_llama(len(tiny_tokenizer), layers=2)
    student = build_tiny_llama(len(tiny_tokenizer), seed=1, layers=1)
    options = {
        "steps": 2,
        "batch_size": 2,
        "seq_len": 32,
        "lr": 1e-3,
        "loss": {"kl": 0.0, "lm": 1.0},
        "teacher_text": {"prompts": write_documents(tmp_path), "samples": 12, "prompt_tokens": 4, "max_new_tokens": 12},
    }
    recipe = parse_recipe({"model": "m", "stages": [{"distill": options}]})
    context = StageContext(tiny_tokenizer, Calibration(recipe.calibration, tiny_tokenizer), tmp_path, lambda: teacher)
    before = [p.clone() for p in student.parameters()]
    model = get_stage("distill").apply(student, recipe.stages[0].options, context)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert any("teacher wrote 12 continuations" in note for note in context.notes)
    assert any("from teacher text from" in note and "losses {'lm': 1.0}" in note for note in context.notes)


def test_task_answers_end_where_the_evaluation_stops_reading(tiny_tokenizer):
    ids = tiny_tokenizer("fox jumps. The dog", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    cut = teacher_text._cut([*ids, eos, eos], tiny_tokenizer, {eos}, teacher_text.TASK_STOPS["triviaqa"])
    assert tiny_tokenizer.decode(cut) == "fox jumps"
    whole = teacher_text._cut([*ids, eos, 7], tiny_tokenizer, {eos}, ())  # text prompts: up to the end token only
    assert whole == ids


def test_choice_answers_are_the_teachers_likelier_choice(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer))
    prompts, choices = [[5, 6, 7, 8, 9], [10, 11]], [[20], [30, 31]]
    scores = teacher_text.choice_log_likelihoods(model, prompts, choices, pad_id=2, device="cpu")
    for row, prompt in enumerate(prompts):  # right padding changes nothing: one sequence at a time agrees
        for c, choice in enumerate(choices):
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt + choice])).logits[0], dim=-1)
            expected = sum(log_probs[len(prompt) - 1 + i, token].item() for i, token in enumerate(choice))
            assert scores[row, c].item() == pytest.approx(expected, abs=1e-4)
    options = TeacherTextOptions(prompts="sst2", temperature=0)
    answers = teacher_text._answer_choices(model, tiny_tokenizer, prompts, options, 2, 0, "cpu")
    encoded = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in teacher_text.TASK_CHOICES["sst2"]]
    best = teacher_text.choice_log_likelihoods(model, prompts, encoded, 2, "cpu").argmax(dim=1)
    assert answers == [encoded[int(k)] for k in best]
