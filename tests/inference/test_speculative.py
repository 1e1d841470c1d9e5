"""Speculative decoding: greedy text equal to the target's own, sampled text following the target's distribution."""

import copy
import json

import pytest
import torch
from scipy.stats import chisquare
from test_decode import prompt, varied_model
from transformers import DynamicCache, StaticCache
from typer.testing import CliRunner

from conftest import build_tiny_llama
from slimlm.cli import app
from slimlm.errors import SlimlmError
from slimlm.inference.decode import COMPILED, Decoder
from slimlm.inference.generate import Sampling, generate, sampling_probabilities
from slimlm.inference.speculative import (
    SpeculativeStats,
    _Rejection,
    assisted_generate,
    rewind,
    speculative_generate,
    verifier_for,
)
from slimlm.models import save_model

NEW_TOKENS = 30


def plain(model) -> Decoder:
    return Decoder(model, compile=False)


def noisy_copy(model, scale: float, seed: int = 1):
    """The target with noise on its matrices: a draft that agrees with it on some tokens, not all."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in draft.parameters():
            if parameter.dim() == 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return draft


@pytest.fixture()
def target(tiny_tokenizer):
    model = varied_model(len(tiny_tokenizer))
    model.generation_config.eos_token_id = None  # the full length, so every round is checked
    return model


def _speculative(target, draft, tokenizer, k, **options):
    return speculative_generate(
        target, draft, tokenizer, prompt(len(tokenizer)), NEW_TOKENS, k=k, decoder=plain(target),
        draft_decoder=plain(draft), **options,
    )  # fmt: skip


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_greedy_with_a_draft_that_often_disagrees_is_the_target_greedy_text(tiny_tokenizer, target, k):
    expected = generate(target, tiny_tokenizer, prompt(len(tiny_tokenizer)), NEW_TOKENS, decoder=plain(target))
    result = _speculative(target, noisy_copy(target, 0.01), tiny_tokenizer, k)
    assert len(set(expected.token_ids)) > NEW_TOKENS // 3  # a continuation that moves
    assert result.token_ids == expected.token_ids and result.text == expected.text
    stats = result.stats
    assert isinstance(stats, SpeculativeStats) and stats.new_tokens == NEW_TOKENS and stats.stop == "length"
    assert 0.1 < stats.acceptance_rate < 0.9  # rejections happen, and so do acceptances
    assert stats.tokens_per_target_forward == pytest.approx((NEW_TOKENS - 1) / stats.target_forwards)
    assert stats.tokens_per_target_forward <= k + 1
    assert "acceptance" in stats.line() and "tokens per target forward" in stats.line()


def test_the_target_as_its_own_draft_is_always_accepted(tiny_tokenizer, target):
    result = _speculative(target, target, tiny_tokenizer, k=4)
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.tokens_per_target_forward > 4  # k + 1 per forward but the last, shorter round


def test_greedy_on_the_compiled_path_is_the_target_greedy_text(tiny_tokenizer, target):
    draft = noisy_copy(target, 0.01)
    expected = generate(target, tiny_tokenizer, prompt(len(tiny_tokenizer)), NEW_TOKENS, decoder=plain(target))
    decoders = {"decoder": Decoder(target, backend="eager"), "draft_decoder": Decoder(draft, backend="eager")}
    verifier = verifier_for(decoders["decoder"], backend="eager")  # the verifying forward compiled too
    result = speculative_generate(
        target, draft, tiny_tokenizer, prompt(len(tiny_tokenizer)), NEW_TOKENS, k=3, **decoders
    )
    assert result.stats.path == COMPILED and result.token_ids == expected.token_ids
    assert verifier.compile_seconds > 0 and verifier.note == ""


def test_a_verifying_forward_that_fails_to_compile_runs_eagerly_with_a_note(tiny_tokenizer, target):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler found")

    expected = generate(target, tiny_tokenizer, prompt(len(tiny_tokenizer)), NEW_TOKENS, decoder=plain(target))
    decoder = Decoder(target, backend="eager")
    verifier_for(decoder, backend=broken_backend)
    result = speculative_generate(
        target, target, tiny_tokenizer, prompt(len(tiny_tokenizer)), NEW_TOKENS, k=3, decoder=decoder,
        draft_decoder=plain(target),
    )  # fmt: skip
    assert result.token_ids == expected.token_ids
    assert "verifying forward not compiled (RuntimeError" in result.stats.note


def test_transformers_assisted_generation_gives_the_same_greedy_text(tiny_tokenizer, target):
    expected = generate(target, tiny_tokenizer, prompt(len(tiny_tokenizer)), NEW_TOKENS, decoder=plain(target))
    result = assisted_generate(
        target, noisy_copy(target, 0.01), tiny_tokenizer, prompt(len(tiny_tokenizer)), NEW_TOKENS
    )
    assert result.token_ids == expected.token_ids and result.stats.tokens_per_target_forward > 1


def test_generation_stops_at_the_end_token_inside_an_accepted_run(tiny_tokenizer, target):
    third = generate(target, tiny_tokenizer, prompt(len(tiny_tokenizer)), 3, decoder=plain(target)).token_ids[2]
    target.generation_config.eos_token_id = third
    result = _speculative(target, target, tiny_tokenizer, k=6)  # the end token arrives among accepted proposals
    assert len(result.token_ids) == 2 and result.stats.stop == "eos" and result.stats.new_tokens == 3


@pytest.mark.parametrize("kind", [StaticCache, DynamicCache])
def test_rewind_drops_the_positions_after_the_length(tiny_tokenizer, kind):
    model = build_tiny_llama(len(tiny_tokenizer))
    ids = prompt(len(tiny_tokenizer))
    cache = StaticCache(config=model.config, max_cache_len=32) if kind is StaticCache else DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache)
        rewind(cache, 5)
        rewound = model(input_ids=ids[:, 5:6], past_key_values=cache).logits
        fresh_cache = DynamicCache()
        model(input_ids=ids[:, :5], past_key_values=fresh_cache)
        fresh = model(input_ids=ids[:, 5:6], past_key_values=fresh_cache).logits
    assert int(cache.get_seq_length()) == 6
    torch.testing.assert_close(rewound, fresh, atol=1e-5, rtol=1e-5)


def _rule_outputs(p_logits, q_logits, sampling, draws):
    """The first token the rejection rule emits for one proposal (k 1), `draws` times."""
    rule = _Rejection(sampling, "cpu")
    target_logits = torch.stack([p_logits, p_logits])  # after the proposal: any, only a full acceptance uses it
    counts = torch.zeros(p_logits.numel())
    for _ in range(draws):
        token, q = rule.propose(q_logits)
        kept, chosen = rule.verify(target_logits, [token], [q])
        counts[token if kept else chosen] += 1
    return counts


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.7, top_p=0.8, seed=5)])
def test_the_rejection_rule_outputs_the_target_distribution(sampling):
    p_logits = torch.tensor([2.0, 1.5, 0.0, -1.0, 1.0, 0.5])
    q_logits = torch.tensor([0.0, 2.0, 1.0, 0.0, -1.0, 1.5])  # far from p: a wrong rule shows
    draws = 6000
    counts = _rule_outputs(p_logits, q_logits, sampling, draws)
    p = sampling_probabilities(sampling)(p_logits.view(1, -1))[0]
    support = p > 0
    assert counts[~support].sum() == 0  # never a token top-p cut from the target
    assert chisquare(counts[support], p[support] * draws).pvalue > 1e-3
    q = sampling_probabilities(sampling)(q_logits.view(1, -1))[0]
    assert (counts / draws - q).abs().sum() / 2 > 0.2  # the draft's own distribution is far off: the test can tell


class _Digits:
    """A tokenizer for a six-token model: no end token, ids as text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _next_token_marginals(model, start: torch.Tensor, vocab: int, positions: int) -> list[torch.Tensor]:
    """The exact distribution of each of the next `positions` sampled tokens (temperature 1), over all paths."""
    paths, weights, marginals = start, torch.ones(1), []
    with torch.no_grad():
        for _ in range(positions):
            p = torch.softmax(model(paths).logits[:, -1], -1) * weights.view(-1, 1)  # [paths, vocab]: joint
            marginals.append(p.sum(0))
            paths = torch.cat(
                [paths.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(len(paths)).view(-1, 1)], 1
            )
            weights = p.flatten()
    return marginals


def test_sampled_speculative_text_follows_the_target_distribution():
    """Tokens 2 and 3 after a fixed prompt over many seeds against the target's exact marginals: they come out of
    the draft's proposals through the rejection rule (a kept proposal, a residual draw, or the draw after all kept)."""
    vocab, runs = 6, 600
    target, draft = varied_model(vocab, seed=0), varied_model(vocab, seed=5)  # unrelated: q far from p
    for model, scale in ((target, 0.3), (draft, 2.0)):  # a soft p (every token drawn now and then), a peaked q
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    start = torch.tensor([[1, 4, 2]])
    expected = _next_token_marginals(target, start, vocab, 3)
    counts = torch.zeros(3, vocab)
    decoders = {"decoder": plain(target), "draft_decoder": plain(draft)}
    for seed in range(runs):
        result = speculative_generate(target, draft, _Digits(), start, 3, Sampling(1.0, seed=seed), k=2, **decoders)
        counts[torch.arange(3), result.token_ids] += 1
    for position in (1, 2):
        assert chisquare(counts[position], expected[position] * runs).pvalue > 1e-3, position


def test_a_draft_with_another_vocabulary_is_one_clear_error(tiny_tokenizer, target):
    other = build_tiny_llama(len(tiny_tokenizer) + 4)
    with pytest.raises(SlimlmError, match=r"draft: vocabulary of \d+ tokens, the target's has \d+"):
        _speculative(target, other, tiny_tokenizer, k=2)


def _cli(*args):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def test_cli_generate_with_a_draft_prints_the_same_text_and_the_draft_figures(tmp_path, tiny_tokenizer, target):
    folders = [save_model(model, tiny_tokenizer, tmp_path / name) for model, name in ((target, "t"), (target, "d"))]
    common = ["generate", "--model", str(folders[0]), "--prompt", "The quick brown", "--max-new-tokens", "8"]
    common += ["--no-compile"]
    alone = json.loads(_cli(*common, "--json").stdout)
    drafted = json.loads(_cli(*common, "--json", "--draft", str(folders[1]), "--draft-tokens", "3").stdout)
    assert drafted["token_ids"] == alone["token_ids"] and drafted["text"] == alone["text"]
    assert drafted["stats"]["acceptance_rate"] == 1.0 and drafted["stats"]["k"] == 3
    assert drafted["stats"]["tokens_per_target_forward"] > 1
    streamed = _cli(*common, "--draft", str(folders[1]))
    assert streamed.stdout == alone["text"] + "\n"
    assert "acceptance 100.0%" in streamed.stderr and "tok/s" in streamed.stderr


def test_cli_rejects_a_draft_with_another_tokenizer(tmp_path, tiny_tokenizer, target):
    from conftest import build_tokenizer

    other_tokenizer = build_tokenizer(vocab_size=280)
    folder = save_model(target, tiny_tokenizer, tmp_path / "t")
    other = save_model(build_tiny_llama(len(tiny_tokenizer)), other_tokenizer, tmp_path / "o")
    args = ["generate", "--model", str(folder), "--prompt", "The", "--no-compile", "--draft", str(other)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "draft: its tokenizer's vocabulary differs" in str(result.exception)
