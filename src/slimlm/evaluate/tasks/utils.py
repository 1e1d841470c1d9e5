"""lm-eval hooks (`!function utils.*`) for slimlm's builtin tasks: local data loaders and metrics.

Loaders are lm-eval `custom_dataset` functions: lm-eval calls them with the task's `metadata` (our `data_file`,
the `data_dir` that slimlm passes to its TaskManager, and lm-eval's own keys). Each one turns the shared file,
whatever its layout (see SOURCE.md beside it), into the fields lm-eval's own task of that name reads, so the
prompt templates in the YAMLs stay identical to lm-eval's.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import datasets

from slimlm.errors import SlimlmError


def _read_lines(data_dir: str, data_file: str) -> list[str]:
    path = Path(data_dir) / data_file
    if not path.is_file():
        raise SlimlmError(f"evaluation data {path} is missing; the shared data folder should hold {data_file}")
    # Not splitlines(): that also splits at U+2028 and friends, which occur inside TriviaQA's JSON strings.
    return path.read_text(encoding="utf-8").removesuffix("\n").split("\n")


def _read_jsonl(data_dir: str, data_file: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _read_lines(data_dir, data_file) if line.strip()]


def _split(name: str, rows: list[dict[str, Any]]) -> datasets.DatasetDict:
    # In memory: nothing is written to the datasets cache, and the data never leaves the shared folder.
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows)})


def _strip_prefix(text: str, prefix: str, data_file: str) -> str:
    if not text.startswith(prefix):
        raise SlimlmError(f"{data_file}: expected a query starting with {prefix!r}, got {text[:40]!r}")
    return text[len(prefix) :]


def load_piqa(data_dir: str, data_file: str, **_lm_eval_metadata: Any) -> datasets.DatasetDict:
    """LLM Foundry rows `{"query": "Question: <goal>\\n", "choices": [sol1, sol2], "gold"}` as PIQA's fields."""
    rows = [
        {
            "goal": _strip_prefix(row["query"], "Question: ", data_file).removesuffix("\n"),
            "sol1": row["choices"][0],
            "sol2": row["choices"][1],
            "label": row["gold"],
        }
        for row in _read_jsonl(data_dir, data_file)
    ]
    return _split("validation", rows)


def load_arc_easy(data_dir: str, data_file: str, **_lm_eval_metadata: Any) -> datasets.DatasetDict:
    """LLM Foundry rows `{"query": "Question: <q>", "choices": [...], "gold"}` (ARC-Easy test split)."""
    rows = [
        {
            "question": _strip_prefix(row["query"], "Question: ", data_file),
            "choices": row["choices"],
            "gold": row["gold"],
        }
        for row in _read_jsonl(data_dir, data_file)
    ]
    return _split("test", rows)


def load_boolq(data_dir: str, data_file: str, **_lm_eval_metadata: Any) -> datasets.DatasetDict:
    """LLM Foundry rows `{"query": "Passage: <p>\\nQuestion: <q>?", "gold": 0|1}` as BoolQ's fields (1 = yes)."""
    rows = []
    for row in _read_jsonl(data_dir, data_file):
        # The last "\nQuestion: ": one passage (the sea-snake one) itself contains that string.
        passage, _, question = _strip_prefix(row["query"], "Passage: ", data_file).rpartition("\nQuestion: ")
        # lm-eval's template appends the "?" itself.
        rows.append({"passage": passage, "question": question.removesuffix("?"), "label": row["gold"]})
    return _split("validation", rows)


def load_hellaswag(data_dir: str, data_file: str, **_lm_eval_metadata: Any) -> datasets.DatasetDict:
    """Original HellaSwag rows; lm-eval's own `process_docs` builds query and choices from them."""
    return _split("validation", _read_jsonl(data_dir, data_file))


def load_sst2(data_dir: str, data_file: str, **_lm_eval_metadata: Any) -> datasets.DatasetDict:
    """GLUE `dev.tsv` (header `sentence\\tlabel`). Sentences keep their trailing space, as in HF `glue/sst2`."""
    header, *lines = _read_lines(data_dir, data_file)
    if header != "sentence\tlabel":
        raise SlimlmError(f"{data_file}: expected the GLUE header 'sentence<TAB>label', got {header!r}")
    rows = []
    for line in lines:
        sentence, label = line.split("\t")
        rows.append({"sentence": sentence, "label": int(label)})
    return _split("validation", rows)


def load_triviaqa(data_dir: str, data_file: str, fewshot_pool: int, **_lm_eval_metadata: Any) -> datasets.DatasetDict:
    """Rows `{"idx", "question", "answer", "aliases"}`; `answer` is always one of `aliases`.

    The shared file is all validation questions and TriviaQA's training set is not there, so its last
    `fewshot_pool` rows become the "train" split few-shot examples are drawn from, and are never scored.
    """
    rows = [{"question": row["question"], "aliases": row["aliases"]} for row in _read_jsonl(data_dir, data_file)]
    return datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_list(rows[:-fewshot_pool]),
            "train": datasets.Dataset.from_list(rows[-fewshot_pool:]),
        }
    )


# --- metrics ---------------------------------------------------------------------------------------------------

_TRIVIAQA_PUNCTUATION = set(string.punctuation + "‘’´`")


def normalize_answer(text: str) -> str:
    """The official TriviaQA normalisation (triviaqa/utils/dataset_utils.py): lower case, underscores and
    punctuation to spaces, articles a/an/the dropped, whitespace collapsed."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _TRIVIAQA_PUNCTUATION else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD/TriviaQA token F1 between two answers, after normalisation."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def triviaqa_exact_match(answer: str, aliases: list[str]) -> float:
    """Exact match as lm-eval's triviaqa task scores it: its `remove_whitespace` filter strips the answer, then
    its `exact_match` metric (ignore_case, ignore_punctuation) compares it with each alias; right if any is equal."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    matches = exact_match_hf_evaluate(
        predictions=[answer.strip()] * len(aliases), references=aliases, ignore_case=True, ignore_punctuation=True
    )
    return float(matches["exact_match"] > 0)


def triviaqa_scores(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval `process_results`: lm-eval's exact match, and token F1 best over the aliases."""
    aliases = doc["aliases"]
    return {
        "exact_match": triviaqa_exact_match(results[0], aliases),
        "f1": max(token_f1(results[0], alias) for alias in aliases),
    }


def macro_f1(items: list[tuple[int, int]]) -> float:
    """lm-eval aggregation over `(gold, pred)` pairs: unweighted mean of each class's F1.

    lm-eval's own `f1` aggregation is sklearn's default, the binary F1 of class 1 only.
    """
    from sklearn.metrics import f1_score

    golds, preds = zip(*items)
    return float(f1_score(golds, preds, average="macro", zero_division=0))
