"""`generate` and `slimlm generate`: greedy and sampled text, EOS, streaming, any cache, every slimlm output kind."""

import json

import pytest
import torch
from test_decode import hf_greedy, prompt, varied_model  # the same tiny model and reference as the decode tests
from transformers import DynamicCache
from typer.testing import CliRunner

from conftest import build_tiny_llama, run_stage
from slimlm.cli import app
from slimlm.errors import SlimlmError
from slimlm.inference.decode import COMPILED, PLAIN, Decoder
from slimlm.inference.generate import Sampling, TextStream, generate
from slimlm.models import save_model


def plain(model) -> Decoder:
    return Decoder(model, compile=False)


def test_greedy_generation_equals_transformers_generate_and_streams_its_text(tiny_tokenizer):
    model = varied_model(len(tiny_tokenizer))
    input_ids = prompt(len(tiny_tokenizer))
    pieces = []
    result = generate(model, tiny_tokenizer, input_ids, 16, decoder=plain(model), on_text=pieces.append)
    assert tiny_tokenizer.eos_token_id not in hf_greedy(model, input_ids, 16)  # so no early stop below
    assert result.token_ids == hf_greedy(model, input_ids, 16) and result.stats.stop == "length"
    assert "".join(pieces) == result.text == tiny_tokenizer.decode(result.token_ids, skip_special_tokens=True)
    stats = result.stats
    assert stats.prompt_tokens == 12 and stats.path == PLAIN and stats.kernel == "dense"
    assert stats.prefill_ms > 0 and stats.decode_tokens_per_s > 0
    assert "prefill" in stats.line() and "tok/s" in stats.line() and "kernel: dense" in stats.line()


def test_generation_stops_at_the_end_token(tiny_tokenizer):
    model = varied_model(len(tiny_tokenizer))
    input_ids = prompt(len(tiny_tokenizer))
    third = hf_greedy(model, input_ids, 3)[2]
    model.generation_config.eos_token_id = third
    result = generate(model, tiny_tokenizer, input_ids, 10, decoder=plain(model))
    assert len(result.token_ids) == 2 and result.stats.stop == "eos" and result.stats.new_tokens == 3


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(tiny_tokenizer):
    model = varied_model(len(tiny_tokenizer))
    model.generation_config.eos_token_id = None
    input_ids = prompt(len(tiny_tokenizer))

    def run(**sampling):
        return generate(model, tiny_tokenizer, input_ids, 12, Sampling(**sampling), plain(model)).token_ids

    assert run(temperature=1.5, seed=3) == run(temperature=1.5, seed=3)
    assert run(temperature=1.5, seed=3) != run(temperature=1.5, seed=4)
    assert run(temperature=1.0, top_p=1e-6) == run()
    with pytest.raises(SlimlmError, match="top_p 0"):
        Sampling(top_p=0)


def test_any_transformers_cache_is_accepted_and_decodes_plain(tiny_tokenizer):
    model = varied_model(len(tiny_tokenizer))
    input_ids = prompt(len(tiny_tokenizer))
    decoder = Decoder(model, backend="eager")
    given = generate(model, tiny_tokenizer, input_ids, 8, decoder=decoder, cache=DynamicCache(config=model.config))
    own = generate(model, tiny_tokenizer, input_ids, 8, decoder=decoder)
    assert given.stats.path == PLAIN and own.stats.path == COMPILED
    assert given.token_ids == own.token_ids


def test_text_stream_holds_back_a_character_still_arriving(tiny_tokenizer):
    ids = tiny_tokenizer("é", add_special_tokens=False).input_ids
    assert len(ids) == 2  # byte-level: one token per byte of the two-byte character
    stream = TextStream(tiny_tokenizer)
    assert [stream.put(i) for i in ids] == ["", "é"]


def _cli(*args):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def test_cli_prints_the_text_alone_on_stdout_and_figures_on_stderr(tiny_model_dir):
    common = ["generate", "--model", str(tiny_model_dir), "--prompt", "The quick brown", "--max-new-tokens", "6"]
    streamed = _cli(*common, "--no-compile")
    as_json = json.loads(_cli(*common, "--no-compile", "--json").stdout)
    assert streamed.stdout == as_json["text"] + "\n"
    assert set(as_json["stats"]) >= {"prefill_ms", "decode_tokens_per_s", "kernel", "path", "compile_seconds"}
    figures = streamed.stderr.strip().splitlines()[-1]
    assert figures.startswith("prefill ") and "tok/s" in figures and "path: plain, kernel: dense" in figures


def _saved(folder, tokenizer, stages):
    model = build_tiny_llama(len(tokenizer))
    for name, options in stages:
        run_stage(model, name, original=build_tiny_llama(len(tokenizer)), **options)
    return save_model(model, tokenizer, folder)


@pytest.mark.parametrize(
    ("stages", "kernel"),
    [
        ([("quantize", {"method": "rtn", "bits": 4, "group_size": 32})], "int4pack"),
        ([("quantize", {"method": "smoothquant", "bits": 8, "group_size": None})], "W8A8 int8×int8"),
        ([("lowrank", {"method": "svd", "rank": 8})], "low-rank"),
        ([("prune_depth", {"remove": 1})], "dense"),
        ([("quantize", {"method": "rtn", "bits": 8, "group_size": None})], "int8pack"),
        ([("share", {"method": "kmeans", "bits": 3})], "codebook lookup"),
        (
            [("quantize", {"method": "rtn", "bits": 4, "group_size": 32}), ("lowrank", {"method": "eora", "rank": 4})],
            "EoRA correction",
        ),
    ],
    ids=["packed-W4", "W8A8-smoothquant", "lowrank-svd", "depth-pruned", "packed-W8", "codebook-kmeans", "eora"],
)
def test_every_slimlm_output_generates_compiled_with_its_kernels(tmp_path, tiny_tokenizer, stages, kernel):
    folder = _saved(tmp_path / "model", tiny_tokenizer, stages)
    args = ["generate", "--model", str(folder), "--prompt", "Pruning removes", "--max-new-tokens", "5", "--json"]
    payload = json.loads(_cli(*args).stdout)
    assert payload["stats"]["path"] == COMPILED and payload["stats"]["compile_seconds"] > 0
    assert kernel in payload["stats"]["kernel"]
    assert payload["stats"]["new_tokens"] >= 1
    plain_payload = json.loads(_cli(*args, "--no-compile").stdout)
    assert plain_payload["token_ids"] == payload["token_ids"]


def test_a_bad_prompt_shape_is_one_clear_error(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer))
    with pytest.raises(SlimlmError, match=r"prompt: expected one non-empty sequence"):
        generate(model, tiny_tokenizer, torch.zeros(1, 0, dtype=torch.long), 4, decoder=plain(model))
