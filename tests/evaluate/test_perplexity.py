import math

import pytest
import torch

from conftest import build_tiny_llama
from slimlm.data import TextSource, eval_windows, tokenize_joined
from slimlm.evaluate.perplexity import ReferenceLogits, perplexity_records

TEXT = TextSource("t", ["Perplexity measures how surprised a model is by text. " * 30], "inline", "0" * 64)


def _by_metric(records):
    return {r.metric: r for r in records}


def test_perplexity_matches_the_transformers_loss(tiny_model, tiny_tokenizer):
    seq_len = 32
    records = _by_metric(perplexity_records(tiny_model, tiny_tokenizer, TEXT, "t", seq_len=seq_len, limit=3))
    windows = eval_windows(tokenize_joined(tiny_tokenizer, TEXT), seq_len, 3)
    with torch.no_grad():
        losses = [tiny_model(w[None], labels=w[None]).loss.item() for w in windows]
    assert records["perplexity"].value == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    protocol = records["perplexity"].protocol
    assert protocol["seq_len"] == 32 and protocol["tokens_scored"] == 3 * 31 and protocol["windows"].startswith("3 of")
    assert "kl_divergence" not in records


def test_kl_against_itself_is_zero_and_against_another_model_positive(tiny_model, tiny_tokenizer):
    same = _by_metric(
        perplexity_records(tiny_model, tiny_tokenizer, TEXT, "t", seq_len=32, limit=2, reference=tiny_model)
    )
    assert same["kl_divergence"].value == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"].value == 1.0
    other = build_tiny_llama(len(tiny_tokenizer), seed=1)
    diff = _by_metric(perplexity_records(tiny_model, tiny_tokenizer, TEXT, "t", seq_len=32, limit=2, reference=other))
    assert diff["kl_divergence"].value > 0.01
    assert diff["top1_agreement"].value < 1.0


def test_kept_reference_logits_give_the_same_kl_with_one_reference_pass(tiny_model, tiny_tokenizer):
    other = build_tiny_llama(len(tiny_tokenizer), seed=1)
    calls = []
    other.register_forward_hook(lambda *_: calls.append(1))
    kept = ReferenceLogits(other, keep=True)
    first = _by_metric(perplexity_records(tiny_model, tiny_tokenizer, TEXT, "t", seq_len=32, limit=2, reference=kept))
    again = _by_metric(perplexity_records(tiny_model, tiny_tokenizer, TEXT, "t", seq_len=32, limit=2, reference=kept))
    plain = _by_metric(perplexity_records(tiny_model, tiny_tokenizer, TEXT, "t", seq_len=32, limit=2, reference=other))
    assert len(calls) == 2 + 2  # two windows for the kept reference (once), two for the plain model
    assert first["kl_divergence"].value == again["kl_divergence"].value == plain["kl_divergence"].value > 0


def test_word_perplexity_and_bits_per_byte_are_consistent(tiny_model, tiny_tokenizer):
    records = _by_metric(perplexity_records(tiny_model, tiny_tokenizer, TEXT, "t", seq_len=32, limit=2))
    tokens = records["perplexity"].protocol["tokens_scored"]
    total_nll = math.log(records["perplexity"].value) * tokens
    # more tokens than words in this text, so word perplexity is the larger
    assert records["word_perplexity"].value > records["perplexity"].value
    assert records["bits_per_byte"].value > 0 and math.isfinite(total_nll)
