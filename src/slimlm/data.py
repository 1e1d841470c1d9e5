"""Text for evaluation and calibration: named sets from the shared data folder (or the hub), or any file.

Named sources: ``wikitext2`` (test split), ``wikitext2-valid``, ``c4`` (the 1,000-document C4 train prefix).
Files: ``.txt`` (read as is), ``.jsonl`` (one JSON object per line with a ``text`` field), ``.parquet`` (a ``text``
column). Every loader names the file and what it expected when something is off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from slimlm.errors import SlimlmError
from slimlm.paths import file_sha256, shared_data_dir

_WIKITEXT_FILES = {"wikitext2": "wiki.test.raw", "wikitext2-valid": "wiki.valid.raw"}
_WIKITEXT_HUB_SPLITS = {"wikitext2": "test", "wikitext2-valid": "validation"}
_C4_FILE = "c4/c4_en_train_first1000.jsonl"
NAMED_SOURCES = (*_WIKITEXT_FILES, "c4")


@dataclass
class TextSource:
    """Documents plus what a report needs to name them: the file and its content hash."""

    name: str
    documents: list[str]
    path: str
    sha256: str

    def joined(self) -> str:
        # GPTQ/SparseGPT/Wanda evaluation code joins the split's rows with blank lines; we pin the same join.
        return "\n\n".join(self.documents)


def load_text(source: str) -> TextSource:
    if source in _WIKITEXT_FILES:
        return _load_wikitext(source)
    if source == "c4":
        return _load_file(_shared_file(_C4_FILE), name="c4")
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".raw", ".jsonl", ".parquet"):
        return _load_file(path, name=path.name)
    raise SlimlmError(
        f"data '{source}': not a named set ({', '.join(NAMED_SOURCES)}) nor a .txt, .jsonl or .parquet file"
    )


def _shared_file(relative: str) -> Path:
    path = shared_data_dir() / relative
    if not path.is_file():
        raise SlimlmError(f"{path}: missing from the shared data folder")
    return path


def _load_wikitext(name: str) -> TextSource:
    try:
        path = _shared_file(f"wikitext-2-raw-v1/{_WIKITEXT_FILES[name]}")
    except SlimlmError:
        return _load_wikitext_from_hub(name)
    with open(path, encoding="utf-8", newline="") as handle:
        # Same rows as the hub's `wikitext-2-raw-v1` split: blank lines become empty rows.
        rows = [line if line.strip() else "" for line in handle]
    return TextSource(name, rows, str(path), file_sha256(path))


def _load_wikitext_from_hub(name: str) -> TextSource:
    import datasets

    split = _WIKITEXT_HUB_SPLITS[name]
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as err:
        raise SlimlmError(
            f"{name}: not in the shared data folder and the hub is unreachable ({type(err).__name__}); "
            "set $SLIMLM_DATA_DIR or pass a local file"
        ) from err
    return TextSource(name, list(rows), f"hub:wikitext/wikitext-2-raw-v1/{split}", "hub")


def _load_file(path: Path, name: str) -> TextSource:
    if not path.is_file():
        raise SlimlmError(f"{path}: file not found")
    readers = {".jsonl": _read_jsonl, ".parquet": _read_parquet}
    documents = readers.get(path.suffix, _read_plain)(path)
    if not any(doc.strip() for doc in documents):
        raise SlimlmError(f"{path}: no text found")
    return TextSource(name, documents, str(path), file_sha256(path))


def _read_plain(path: Path) -> list[str]:
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as err:
        raise SlimlmError(f"{path}: expected UTF-8 text ({err.reason} at byte {err.start})") from err


def _read_jsonl(path: Path) -> list[str]:
    documents = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SlimlmError(f"{path}:{number}: expected one JSON object per line ({err.msg})") from err
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SlimlmError(f"{path}:{number}: expected an object with a string field 'text'")
            documents.append(row["text"])
    return documents


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise SlimlmError(f"{path}: not a readable parquet file ({type(err).__name__})") from err
    if "text" not in table.column_names:
        raise SlimlmError(f"{path}: expected a 'text' column, found {', '.join(table.column_names)}")
    return [str(t) for t in table.column("text").to_pylist() if t is not None]


def tokenize_joined(tokenizer, source: TextSource) -> torch.Tensor:
    """The whole source as one token stream (no special tokens added), as the GPTQ evaluation code does."""
    ids = tokenizer(source.joined(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


def eval_windows(tokens: torch.Tensor, seq_len: int, limit: int | None = None, where: str = "the text") -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens; the tail shorter than a window is dropped. `where` names the
    text in the error."""
    count = tokens.numel() // seq_len
    if count == 0:
        raise SlimlmError(f"{where}: has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    if limit is not None:
        count = min(count, limit)
    return tokens[: count * seq_len].view(count, seq_len)


def calibration_windows(tokenizer, source: TextSource, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets into the joined documents.

    Sampling from the joined stream rather than from single long documents (GPTQ's loop) lets short-document sets
    like the C4 sample serve long windows; the same seed always gives the same windows.
    """
    tokens = tokenize_joined(tokenizer, source)
    if tokens.numel() <= seq_len:
        raise SlimlmError(f"{source.path}: {tokens.numel()} tokens, fewer than one calibration window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (samples,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def sample_from_model(model, samples: int, seq_len: int, seed: int, batch_size: int = 8) -> torch.Tensor:
    """Data-free calibration: sequences the model writes itself from a random first token (as in LLM-QAT).

    Costs `seq_len` decode steps per batch: slow on a CPU for long windows; use it when no data set is at hand.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    batches = []
    for start in range(0, samples, batch_size):
        count = min(batch_size, samples - start)
        first = torch.randint(0, vocab, (count, 1), generator=generator).to(device)
        out = model.generate(
            first,
            attention_mask=torch.ones_like(first),
            do_sample=True,
            top_p=0.95,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,
            pad_token_id=_first_id(model.config.eos_token_id),
        )
        batches.append(out[:, :seq_len].cpu())
    return torch.cat(batches)


def _first_id(token_id) -> int:
    if isinstance(token_id, (list, tuple)):
        return token_id[0]
    return 0 if token_id is None else token_id
