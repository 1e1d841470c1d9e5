"""Teacher-generated training text: black-box and task-specific distillation (distill's `teacher_text` option).

Black-box distillation (sequence-level KD, Kim & Rush 2016) needs only the teacher's generations: the teacher
continues prompts (batched, seeded sampling or greedy), and the student trains on that text with the LM loss, where
only the teacher's tokens are targets (the prompt tokens are context). No teacher logits enter the loss, so a teacher
reachable only through generation would do.

Task-specific distillation uses the same machinery with a task's prompts: SST-2 sentences or TriviaQA questions,
formatted with the template the evaluation protocol uses (slimlm.evaluate.tasks: SST-2 "Review: …\\nSentiment:",
TriviaQA "Question: …?\\nAnswer:"), and answered by the teacher as the evaluation reads an answer: TriviaQA continued
up to where the evaluation stops reading (TASK_STOPS), SST-2 with the choice (" negative" / " positive") the teacher
finds more likely (TASK_CHOICES). The shared files hold only evaluation splits, so training reads a held-apart
slice: rows from `HELD_APART[task]` on (TriviaQA: up to its last 100 rows, the evaluation's few-shot pool).
Evaluations must score fewer rows than that (benchmarks/recovery.py checks it; tests/recover/test_teacher_text.py
checks disjointness).
With logit losses (loss.kl …) the student also matches the teacher's distributions on that text.

Generations are cached on disk under slimlm's cache folder (teacher-text/), keyed by a fingerprint of the teacher's
weights, the options and the prompts, written atomically, so every run with the same teacher and settings (other
training seeds included) reuses them.
"""

from __future__ import annotations

import hashlib
import json

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt
from torch import nn

from slimlm.data import load_text
from slimlm.errors import SlimlmError
from slimlm.paths import cache_dir, shared_data_dir
from slimlm.progress import progress_bar
from slimlm.recover.data import pack_documents

TASK_PROMPTS = ("sst2", "triviaqa")
# First row of each task file that training may read; evaluations score rows before it.
HELD_APART = {"sst2": 436, "triviaqa": 1500}
TRIVIAQA_FEWSHOT_POOL = 100  # the file's last rows: the evaluation's few-shot examples, never trained on
# Where the evaluation stops reading an answer (the task YAMLs' `until`; SST-2 scores one choice, so its answer line)
TASK_STOPS = {"sst2": ("\n",), "triviaqa": ("\n", ".", ",")}
# Multiple-choice tasks: the teacher's answer is the choice it scores highest, as the evaluation reads a model's
# answer (free generation after "Sentiment:" is mostly a blank line for SmolLM2), sampled at `temperature` > 0.
TASK_CHOICES = {"sst2": (" negative", " positive")}
_FORMAT = 2  # bump when what is generated for the same options changes: old cache files are then not reused
_TASK_FILES = {"sst2": "sst2/dev.tsv", "triviaqa": "triviaqa/triviaqa_validation_3000.jsonl"}


class TeacherTextOptions(BaseModel):
    """What the teacher writes: prompts, how many continuations, and how they are sampled."""

    model_config = ConfigDict(extra="forbid")
    # c4, wikitext2-valid or a .txt/.jsonl/.parquet file (each document's first prompt_tokens tokens), or a task's
    # held-apart prompts: sst2 | triviaqa
    prompts: str = "c4"
    samples: PositiveInt | None = None  # continuations; prompts repeat (new draws) past their count; null: one each
    prompt_tokens: PositiveInt = 32  # text sources only
    max_new_tokens: PositiveInt = 128
    temperature: NonNegativeFloat = 1.0  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    batch_size: PositiveInt = 16  # prompts generated together

    def is_task(self) -> bool:
        return self.prompts in TASK_PROMPTS


def task_rows(task: str) -> list[dict]:
    """All rows of a task's shared file as dicts (sst2: sentence, label; triviaqa: question, answer, aliases)."""
    path = shared_data_dir() / _TASK_FILES[task]
    if not path.is_file():
        raise SlimlmError(f"teacher_text.prompts: {task} needs {path}, which is missing from the shared data folder")
    # Not splitlines(): TriviaQA's JSON strings hold U+2028, which splitlines() would cut at.
    lines = path.read_text(encoding="utf-8").removesuffix("\n").split("\n")
    if task == "sst2":
        return [dict(zip(("sentence", "label"), line.split("\t"))) for line in lines[1:]]
    return [json.loads(line) for line in lines if line.strip()]


def task_prompt(task: str, row: dict) -> str:
    """One row in the evaluation's template (src/slimlm/evaluate/tasks/sst2_review.yaml, triviaqa.yaml)."""
    if task == "sst2":
        return f"Review: {row['sentence']}\nSentiment:"
    return f"Question: {row['question'].rstrip('?')}?\nAnswer:"


def held_apart_indices(task: str) -> range:
    """Rows of the task file that task-specific training reads."""
    stop = len(task_rows(task)) - (TRIVIAQA_FEWSHOT_POOL if task == "triviaqa" else 0)
    return range(HELD_APART[task], stop)


def prompt_ids(tokenizer, options: TeacherTextOptions) -> tuple[list[list[int]], str]:
    """Token ids of every prompt and a description of where they came from."""
    if options.is_task():
        rows = task_rows(options.prompts)
        indices = held_apart_indices(options.prompts)
        texts = [task_prompt(options.prompts, rows[i]) for i in indices]
        where = f"{options.prompts} rows {indices.start}–{indices.stop - 1} (held apart from evaluation)"
    else:
        source = load_text(options.prompts)
        texts = [doc for doc in source.documents if doc.strip()]
        where = f"{options.prompts} ({source.sha256[:12]}), first {options.prompt_tokens} tokens of each document"
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if not options.is_task():
        encoded = [ids[: options.prompt_tokens] for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise SlimlmError(f"teacher_text.prompts: {options.prompts} gave no prompts")
    return encoded, where


def teacher_fingerprint(model: nn.Module) -> str:
    """Shapes and per-tensor sums of the teacher's weights: another teacher never reuses these generations."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}{parameter.detach().double().sum().item():.10e}".encode())
    return digest.hexdigest()[:16]


def _cut(continuation: list[int], tokenizer, eos_ids: set[int], stops: tuple[str, ...]) -> list[int]:
    """The generated tokens up to an end token (padding follows it), and up to the first token holding a stop string
    (task prompts: where the evaluation stops reading the answer)."""
    kept = []
    for token in continuation:
        if token in eos_ids or (stops and any(stop in tokenizer.decode([token]) for stop in stops)):
            break
        kept.append(token)
    return kept


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], options: TeacherTextOptions, pad_id: int, seed: int, device):
    """Left-padded batched generation with transformers' generate; sampling seeded per batch (fork_rng: the caller's
    random state is left as it was). Returns the new tokens of each prompt (padding included)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p, "top_k": 0}
    with torch.random.fork_rng(devices=[device] if str(device).startswith("cuda") else []):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=options.max_new_tokens,
            pad_token_id=pad_id,
            **(sampling if options.temperature > 0 else {"do_sample": False}),
        )
    return output[:, width:].tolist()


@torch.no_grad()
def choice_log_likelihoods(model, prompts: list[list[int]], choices: list[list[int]], pad_id: int, device):
    """[len(prompts), len(choices)] summed log-probabilities of each choice's tokens after each prompt."""
    scores = torch.zeros(len(prompts), len(choices))
    for c, choice in enumerate(choices):
        rows = [p + choice for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, prompt in enumerate(prompts):
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(choice), device=device)
            scores[row, c] = log_probs[row, positions, torch.tensor(choice, device=device)].sum().item()
    return scores


def _answer_choices(model, tokenizer, batch, options: TeacherTextOptions, pad_id: int, seed: int, device):
    """The teacher's choice for each prompt: the most likely (temperature 0) or drawn from the choices' softened
    likelihoods with a generator seeded by `seed`."""
    choices = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TASK_CHOICES[options.prompts]]
    scores = choice_log_likelihoods(model, batch, choices, pad_id, device)
    if options.temperature == 0:
        picked = scores.argmax(dim=1)
    else:
        generator = torch.Generator().manual_seed(seed)
        picked = torch.multinomial(torch.softmax(scores / options.temperature, dim=1), 1, generator=generator)[:, 0]
    return [choices[int(k)] for k in picked]


def generate_documents(model, tokenizer, prompts: list[list[int]], options: TeacherTextOptions, device="cpu"):
    """[{"prompt": ids, "continuation": ids}] for `samples` of the prompts (cycled)."""
    count = options.samples or len(prompts)
    chosen = [prompts[i % len(prompts)] for i in range(count)]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    stops, documents = TASK_STOPS.get(options.prompts, ()), []
    starts = range(0, count, options.batch_size)
    with progress_bar(f"teacher text ({options.prompts})", total=len(starts)) as advance:
        for number, start in enumerate(starts):
            batch = chosen[start : start + options.batch_size]
            seed = options.seed * 1_000_003 + number
            if options.prompts in TASK_CHOICES:
                answers = _answer_choices(model, tokenizer, batch, options, pad_id, seed, device)
            else:
                new = generate_batch(model, batch, options, pad_id, seed, device)
                answers = [_cut(tokens, tokenizer, eos_ids, stops) for tokens in new]
            documents += [{"prompt": prompt, "continuation": answer} for prompt, answer in zip(batch, answers)]
            advance()
    return documents


def cached_documents(model, tokenizer, options: TeacherTextOptions, notes: list[str]) -> list[dict]:
    """The teacher's documents for these options, from the cache when an identical request was made before."""
    prompts, where = prompt_ids(tokenizer, options)
    key_payload = [_FORMAT, teacher_fingerprint(model), options.model_dump(mode="json"), prompts]
    key = hashlib.sha256(json.dumps(key_payload).encode()).hexdigest()[:16]
    path = cache_dir() / "teacher-text" / f"{options.prompts if options.is_task() else 'text'}-{key}.jsonl"
    if path.is_file():
        documents = [json.loads(line) for line in path.read_text().splitlines()]
        notes.append(f"distill: teacher text reused ({len(documents)} documents): {path}")
        return documents
    device = next(model.parameters()).device
    documents = generate_documents(model, tokenizer, prompts, options, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(doc) + "\n" for doc in documents))
    tmp.replace(path)
    new_tokens = sum(len(doc["continuation"]) for doc in documents)
    notes.append(
        f"distill: teacher wrote {len(documents)} continuations ({new_tokens:,} tokens) of prompts from {where}; "
        f"cached: {path}"
    )
    return documents


def teacher_text_windows(documents: list[dict], seq_len: int, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + continuation documents packed into [N, seq_len] windows, and the LM-loss mask: position t is true
    where token t+1 is one the teacher wrote (prompt tokens and the separating EOS are context only)."""
    token_lists = [doc["prompt"] + doc["continuation"] for doc in documents]
    flags = [[0] * len(doc["prompt"]) + [1] * len(doc["continuation"]) for doc in documents]
    windows = pack_documents(token_lists, seq_len, eos_id)
    is_teacher = pack_documents(flags, seq_len, 0 if eos_id is not None else None).bool()
    lm_mask = torch.zeros_like(is_teacher)
    lm_mask[:, :-1] = is_teacher[:, 1:]
    if not lm_mask.any():
        raise SlimlmError("teacher_text: the teacher wrote no tokens (every continuation was empty)")
    return windows, lm_mask
