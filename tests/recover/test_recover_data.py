import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.recover.data import WindowOrder, pack_documents, packed_windows


def test_packing_joins_documents_with_eos_and_drops_the_tail():
    windows = pack_documents([[1, 2, 3], [], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    assert windows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack_documents([[1, 2, 3, 4, 5]], 2, None).tolist() == [[1, 2], [3, 4]]


def test_packing_too_little_text_is_a_one_line_error():
    with pytest.raises(SlimlmError, match="fewer than one window of seq_len=8"):
        pack_documents([[1, 2]], 8, 0)


def test_packed_windows_from_a_text_file(tiny_tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join('{"text": "The quick brown fox jumps over the lazy dog."}\n' for _ in range(10)))
    windows = packed_windows(tiny_tokenizer, str(path), 8)
    assert windows.shape[1] == 8 and windows.shape[0] >= 5
    assert (windows == tiny_tokenizer.eos_token_id).sum() >= 4  # document separators


def test_order_is_seeded_and_covers_every_window_each_epoch():
    order = WindowOrder(num_windows=10, batch_size=3, seed=1)
    assert order.indices(0, 30) == WindowOrder(10, 3, seed=1).indices(0, 30)
    assert order.indices(0, 10) != WindowOrder(10, 3, seed=2).indices(0, 10)
    for epoch in range(3):
        assert sorted(order.indices(epoch * 10, 10)) == list(range(10))
    assert order.indices(0, 10) != order.indices(10, 10)  # a new permutation each epoch


def test_resumed_position_sees_exactly_the_remaining_batches():
    order = WindowOrder(num_windows=7, batch_size=2, seed=0)
    uninterrupted = [order.batch(b) for b in range(12)]
    resumed = [WindowOrder(7, 2, seed=0).batch(b) for b in range(5, 12)]
    assert resumed == uninterrupted[5:]


def test_ranks_read_disjoint_consecutive_slices():
    order = WindowOrder(num_windows=100, batch_size=2, seed=0)
    stream = order.indices(0, 8)
    assert order.batch(0, rank=0, world=2) == stream[0:2]
    assert order.batch(0, rank=1, world=2) == stream[2:4]
    assert order.batch(1, rank=0, world=2) == stream[4:6]
    assert order.windows_visited(2, world=2) == sorted(set(stream))
    assert torch.tensor(stream).unique().numel() == 8
