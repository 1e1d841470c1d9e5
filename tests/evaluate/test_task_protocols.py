"""Task protocols (chat template, few-shot), lm-eval's TriviaQA scoring and chance levels, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import lm_eval
import pytest
import yaml
from lm_eval.api.registry import get_filter
from lm_eval.api.task import ConfigurableTask
from lm_eval.models.huggingface import HFLM

from conftest import build_tiny_llama, build_tokenizer, load_task_hooks
from slimlm.errors import SlimlmError
from slimlm.evaluate.records import Record, at_chance
from slimlm.evaluate.suite import evaluate_model
from slimlm.evaluate.tasks import BUILTIN_TASKS, DEFAULT_PROTOCOLS, TASKS_DIR, TaskProtocol, run_tasks
from slimlm.paths import shared_data_dir

# Renders each turn as <<role>>content, so a test can count the turns in the prompt the model was given.
CHAT_TEMPLATE = (
    "{% for message in messages %}<<{{ message.role }}>>{{ message.content }}{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>>{% endif %}"
)
TRIVIAQA_FILE = "triviaqa/triviaqa_validation_3000.jsonl"


hooks = load_task_hooks()


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_tokenizer()  # our own copy: the session's tiny_tokenizer must stay without a template
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def model(chat_tokenizer):
    return build_tiny_llama(len(chat_tokenizer))


@pytest.fixture()
def prompts(monkeypatch):
    """Every context lm-eval hands the model, per request type."""
    seen = {"generate_until": [], "loglikelihood": []}
    for kind in seen:
        original = getattr(HFLM, kind)

        def spy(self, requests, *args, _original=original, _kind=kind, **kwargs):
            seen[_kind] += [request.args[0] for request in requests]
            return _original(self, requests, *args, **kwargs)

        monkeypatch.setattr(HFLM, kind, spy)
    return seen


def _triviaqa_rows():
    path = shared_data_dir() / TRIVIAQA_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").removesuffix("\n").split("\n")]


# --- the protocol reaches lm-eval ------------------------------------------------------------------------------


def test_plain_protocol_sends_plain_prompts(model, chat_tokenizer, prompts):
    records = run_tasks(model, chat_tokenizer, ["sst2"], limit=2, protocols={"sst2": TaskProtocol()})
    assert prompts["loglikelihood"] and not any("<<" in context for context in prompts["loglikelihood"])
    assert all(context.endswith("positive or negative?\nAnswer:") for context in prompts["loglikelihood"])
    assert all(record.protocol["chat_template"] is False for record in records)


def test_chat_template_wraps_the_prompt_when_asked(model, chat_tokenizer, prompts):
    records = run_tasks(model, chat_tokenizer, ["sst2"], limit=2, protocols={"sst2": {"chat_template": True}})
    assert prompts["loglikelihood"]
    for context in prompts["loglikelihood"]:
        assert context.startswith("<<user>>") and context.endswith("positive or negative?\nAnswer:<<assistant>>")
    assert {record.metric for record in records} == {"acc", "f1"}
    assert all(record.protocol["chat_template"] is True and record.protocol["docs"] == 2 for record in records)


def test_prompt_variant_swaps_the_template_and_keeps_the_task(model, chat_tokenizer, prompts):
    records = run_tasks(model, chat_tokenizer, ["sst2"], limit=2, protocols={"sst2": {"prompt": "review"}})
    first = "it 's a charming and often affecting journey . "
    assert prompts["loglikelihood"][:2] == [f"Review: {first}\nSentiment:"] * 2
    assert {record.task for record in records} == {"sst2"} and {record.metric for record in records} == {"acc", "f1"}
    assert all(record.protocol["prompt"] == "review" and record.protocol["chance"] == 0.5 for record in records)


def test_fewshot_examples_come_from_the_held_out_pool(model, chat_tokenizer, prompts):
    records = run_tasks(model, chat_tokenizer, ["triviaqa"], limit=2, protocols={"triviaqa": {"num_fewshot": 3}})
    rows = _triviaqa_rows()
    pool = {row["question"].rstrip("?") for row in rows[-100:]}
    evaluated = [row["question"].rstrip("?") for row in rows[:2]]
    assert len(prompts["generate_until"]) == 2
    for context, question in zip(sorted(prompts["generate_until"]), sorted(evaluated)):
        turns = context.split("\n\n")
        assert len(turns) == 4 and turns[-1] == f"Question: {question}?\nAnswer:"
        shots = [turn.removeprefix("Question: ").split("?\nAnswer: ")[0] for turn in turns[:-1]]
        assert set(shots) <= pool
    protocol = records[0].protocol
    assert protocol["num_fewshot"] == 3 and protocol["fewshot_split"] == "train"


@pytest.mark.parametrize("multiturn, user_turns", [(True, 3), (False, 1)])
def test_fewshot_as_multiturn_gives_each_example_its_turn(model, chat_tokenizer, prompts, multiturn, user_turns):
    protocol = {"chat_template": True, "num_fewshot": 2, "fewshot_as_multiturn": multiturn}
    records = run_tasks(model, chat_tokenizer, ["triviaqa"], limit=1, protocols={"triviaqa": protocol})
    (context,) = prompts["generate_until"]
    assert context.count("<<user>>") == user_turns
    assert context.count("<<assistant>>") == user_turns  # the examples' answers, then the generation prompt
    assert records[0].protocol["fewshot_as_multiturn"] is multiturn


def test_records_name_the_default_protocol_of_each_task(model, chat_tokenizer):
    records = run_tasks(model, chat_tokenizer, ["sst2", "piqa"], limit=2)
    for record in records:
        expected = DEFAULT_PROTOCOLS[record.task]
        assert record.protocol["chat_template"] is expected.chat_template
        assert record.protocol["prompt"] == expected.prompt
        assert record.protocol["num_fewshot"] == expected.num_fewshot


def test_suite_passes_the_recipe_protocols(model, chat_tokenizer, prompts):
    config = SimpleNamespace(
        tasks=["sst2"], task_limit=1, speed=False, task_protocols={"sst2": {"chat_template": True}}
    )
    records = evaluate_model(model, chat_tokenizer, config, footprint=False)
    assert all(context.startswith("<<user>>") for context in prompts["loglikelihood"])
    assert records and all(record.protocol["chat_template"] is True for record in records)


# --- bad protocols: one line naming the field ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, words",
    [
        ({"fewshot_as_multiturn": True, "num_fewshot": 2}, ["fewshot_as_multiturn", "chat_template"]),
        ({"chat_template": True, "fewshot_as_multiturn": True}, ["fewshot_as_multiturn", "num_fewshot"]),
        ({"num_fewshot": -1}, ["num_fewshot", "-1"]),
        ({"num_fewshot": True}, ["num_fewshot"]),
        ({"chat_template": "yes"}, ["chat_template", "'yes'"]),
        ({"shots": 5}, ["shots", "num_fewshot"]),
        ({"prompt": "fancy"}, ["prompt", "'fancy'", "lm-eval", "review"]),
    ],
)
def test_bad_protocol_is_one_line_naming_the_field(model, chat_tokenizer, options, words):
    with pytest.raises(SlimlmError) as raised:
        run_tasks(model, chat_tokenizer, ["sst2"], limit=1, protocols={"sst2": options})
    message = str(raised.value)
    assert "\n" not in message and "sst2" in message
    assert all(word in message for word in words)


def test_chat_template_without_one_in_the_tokenizer_is_refused(model):
    with pytest.raises(SlimlmError, match=r"sst2.*no chat template"):
        run_tasks(model, build_tokenizer(), ["sst2"], limit=1, protocols={"sst2": {"chat_template": True}})


def test_protocol_for_a_task_not_run_is_refused(model, chat_tokenizer):
    with pytest.raises(SlimlmError, match="boolq"):
        run_tasks(model, chat_tokenizer, ["sst2"], limit=1, protocols={"boolq": {}})


# --- TriviaQA scored as lm-eval's triviaqa task scores it ------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_triviaqa():
    """lm-eval's own triviaqa task (its default.yaml) over one document, its data given in memory."""
    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/triviaqa/default.yaml").read_text())
    del config["dataset_path"], config["dataset_name"]
    docs = datasets.Dataset.from_list([{"question": "q", "answer": {"aliases": ["placeholder"]}}])
    config["custom_dataset"] = lambda **_: datasets.DatasetDict({"train": docs, "validation": docs})
    return ConfigurableTask(config=config)


def _lm_eval_exact_match(task, answer: str, aliases: list[str]) -> float:
    """The answer through the task's filter chain (remove_whitespace, take_first), then its process_results."""
    doc = {"question": "q", "answer": {"aliases": aliases}}
    responses = [[answer]]
    for step in task.config.filter_list[0]["filter"]:
        responses = list(get_filter(step["function"])().apply(responses, [doc]))
    return task.process_results(doc, [responses[0]])["exact_match"]


CASES = [
    (" the Beatles", ["The Beatles", "Beatles"]),
    ("Beatles", ["The Beatles"]),  # lm-eval keeps articles: no match (the official TriviaQA script drops them)
    ("  BEATLES!  ", ["The Beatles", "beatles"]),
    ("Tom Hanks, Jr.", ["tom hanks jr"]),
    ("Paris France", ["Paris"]),
    ("", [".a", "Static library"]),
    ("a", [".a", "Static library"]),
    ("Static  library", ["Static library"]),  # whitespace inside the answer is kept
]


@pytest.mark.parametrize("answer, aliases", CASES)
def test_triviaqa_exact_match_is_lm_evals(lm_eval_triviaqa, answer, aliases):
    ours = hooks.triviaqa_scores({"aliases": aliases}, [answer])["exact_match"]
    assert ours == _lm_eval_exact_match(lm_eval_triviaqa, answer, aliases)


def test_triviaqa_exact_match_examples():
    assert hooks.triviaqa_exact_match(" the Beatles\n", ["The Beatles"]) == 1.0
    assert hooks.triviaqa_exact_match("Beatles", ["The Beatles"]) == 0.0
    assert hooks.triviaqa_exact_match("tom hanks jr", ["Tom Hanks, Jr."]) == 1.0
    assert hooks.triviaqa_exact_match("Rolling Stones", ["The Beatles", "Beatles"]) == 0.0


def test_triviaqa_scores_the_first_2900_and_keeps_the_last_100_for_examples():
    split = hooks.load_triviaqa(str(shared_data_dir()), TRIVIAQA_FILE, fewshot_pool=100)
    rows = _triviaqa_rows()
    assert split["validation"]["question"] == [row["question"] for row in rows[:2900]]
    assert split["train"]["question"] == [row["question"] for row in rows[2900:]]


# --- chance levels ---------------------------------------------------------------------------------------------


def test_records_carry_their_tasks_chance_level(model, chat_tokenizer):
    records = run_tasks(model, chat_tokenizer, ["sst2", "triviaqa", "arc_easy"], limit=1)
    chance = {record.task: record.protocol["chance"] for record in records}
    assert chance == {"sst2": 0.5, "triviaqa": 0.0, "arc_easy": 0.25}


def test_chance_of_each_multiple_choice_task_is_one_over_its_choices():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(shared_data_dir())}
    )
    tasks = manager.load([f"slimlm_{name}" for name in BUILTIN_TASKS])["tasks"]
    for name in BUILTIN_TASKS:
        task = tasks[f"slimlm_{name}"]
        if task.OUTPUT_TYPE != "multiple_choice":
            continue
        docs = list(task.eval_docs)
        uniform_guess = sum(1 / len(task.doc_to_choice(doc)) for doc in docs) / len(docs)
        assert task.config.metadata["chance"] == pytest.approx(uniform_guess), name


def _record(value, chance=0.5, stderr=0.02, higher_is_better=True):
    protocol = {"stderr": stderr} if stderr is not None else {}
    if chance is not None:
        protocol["chance"] = chance
    return Record("sst2", "acc", value, "fraction", higher_is_better, protocol)


def test_at_chance_within_two_standard_errors():
    assert at_chance(_record(0.53)) is True  # 0.53 <= 0.5 + 2 x 0.02
    assert at_chance(_record(0.55)) is False
    assert at_chance(_record(0.0, chance=0.0, stderr=0.0)) is True  # TriviaQA with no right answer
    assert at_chance(_record(0.51, stderr=None)) is False  # no stderr (macro-F1): only the value counts
    assert at_chance(_record(0.9, chance=None)) is None
    assert at_chance(_record(None)) is None
    assert at_chance(_record(0.4, higher_is_better=False)) is None
