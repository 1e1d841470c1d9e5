import pytest
import torch

from slimlm.data import calibration_windows, eval_windows, load_text, sample_from_model, tokenize_joined
from slimlm.errors import SlimlmError


def test_wikitext2_test_split_has_the_hub_rows():
    source = load_text("wikitext2")
    assert len(source.documents) == 4358
    assert source.sha256.startswith("173c87a5")
    assert source.joined().startswith("\n\n = Robert Boulter = \n\n\n")


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(SlimlmError, match=r"d\.jsonl:2: expected one JSON object per line"):
        load_text(str(path))


def test_jsonl_without_text_field_is_explained(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"content": "x"}\n')
    with pytest.raises(SlimlmError, match="string field 'text'"):
        load_text(str(path))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SlimlmError, match="file not found"):
        load_text(str(tmp_path / "nope.txt"))


def test_unknown_source_lists_named_sets():
    with pytest.raises(SlimlmError, match="wikitext2"):
        load_text("imagenet")


def test_parquet_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b", "c d"]}), tmp_path / "t.parquet")
    assert load_text(str(tmp_path / "t.parquet")).documents == ["a b", "c d"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "u.parquet")
    with pytest.raises(SlimlmError, match="expected a 'text' column, found body"):
        load_text(str(tmp_path / "u.parquet"))


def test_calibration_windows_are_seeded_and_come_from_the_text(tiny_tokenizer):
    source = load_text("c4")
    first = calibration_windows(tiny_tokenizer, source, samples=4, seq_len=32, seed=3)
    again = calibration_windows(tiny_tokenizer, source, samples=4, seq_len=32, seed=3)
    other = calibration_windows(tiny_tokenizer, source, samples=4, seq_len=32, seed=4)
    assert first.shape == (4, 32) and torch.equal(first, again) and not torch.equal(first, other)
    stream = tokenize_joined(tiny_tokenizer, source).tolist()
    row = first[0].tolist()
    assert any(stream[i : i + 32] == row for i in range(len(stream) - 31))


def test_eval_windows_drop_the_tail_and_respect_limit():
    tokens = torch.arange(10)
    assert eval_windows(tokens, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert eval_windows(tokens, 3, limit=2).shape == (2, 3)
    with pytest.raises(SlimlmError, match="fewer than one window"):
        eval_windows(tokens, 11)


def test_data_free_samples_are_seeded(tiny_model):
    a = sample_from_model(tiny_model, samples=3, seq_len=8, seed=1, batch_size=2)
    b = sample_from_model(tiny_model, samples=3, seq_len=8, seed=1, batch_size=2)
    assert a.shape == (3, 8) and torch.equal(a, b)
