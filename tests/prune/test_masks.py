import pytest
import torch

from slimlm.prune.masks import nm_mask, parse_pattern, unstructured_mask


def test_unstructured_whole_matrix_drops_the_smallest():
    scores = torch.tensor([[1.0, 5.0], [3.0, 0.5]])
    assert unstructured_mask(scores, 0.5).tolist() == [[False, True], [True, False]]


def test_unstructured_per_row_keeps_the_same_count_in_every_row():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    mask = unstructured_mask(scores, 0.5, per_row=True)
    assert mask.tolist() == [[False, False, True, True], [True, True, False, False]]


def test_zero_sparsity_keeps_everything():
    assert unstructured_mask(torch.rand(3, 4), 0.0).all()


def test_two_four_keeps_the_two_largest_of_every_four():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    mask = nm_mask(scores, 2, 4)
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]
    big = nm_mask(torch.rand(16, 64), 2, 4)
    assert (big.view(16, 16, 4).sum(-1) == 2).all()


def test_nm_needs_a_divisible_input_dimension():
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("4:8") == (4, 8)
