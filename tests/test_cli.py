import json
import subprocess
import sys

import pytest


def _slimlm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "slimlm.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_eval_json_prints_only_json_with_the_protocol(tiny_model_dir):
    result = _slimlm(
        "eval", "--model", str(tiny_model_dir), "--task", "wikitext2", "--seq-len", "32", "--limit", "2", "--json"
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    ppl = next(r for r in payload["records"] if r["metric"] == "perplexity")
    assert ppl["value"] > 1 and ppl["protocol"]["seq_len"] == 32 and ppl["protocol"]["windows"].startswith("2 of")
    assert "Loading weights" not in result.stderr  # transformers' own progress bars are silenced


def test_bad_recipe_is_one_line_on_stderr_without_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: smollm2-135m\nstages:\n  - prune: {method: magnitude, sparsity: 1.5}\n")
    result = _slimlm("compress", str(recipe))
    assert result.returncode == 1
    assert result.stderr.strip() == "error: stages[0].prune.sparsity: Input should be less than 1"
    assert result.stdout == ""


def test_missing_model_is_one_line(tmp_path):
    result = _slimlm("info", str(tmp_path / "nothing.gguf"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "GGUF file not found" in lines[0] and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = _slimlm("--debug", "info", str(tmp_path / "nothing.gguf"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_info_shows_per_layer_sparsity(tiny_model_dir):
    result = _slimlm("info", str(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout and "model.layers.1.mlp.down_proj" in result.stdout


@pytest.mark.builtin
def test_eval_on_the_builtin_model_prints_perplexity_with_its_protocol():
    result = _slimlm("eval", "--model", "smollm2-135m", "--task", "wikitext2", "--limit", "1", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    ppl = next(r for r in payload["records"] if r["metric"] == "perplexity")
    assert 10 < ppl["value"] < 40
    assert ppl["protocol"]["seq_len"] == 2048 and ppl["protocol"]["windows"] == "1 of 148"
    assert "Q4_1" in payload["description"]


def test_compress_prints_the_report_unwrapped_with_its_brackets(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from slimlm import report_plots
    from slimlm.cli import main

    monkeypatch.setattr(report_plots, "render_plots", lambda summary: {})  # plots take longer than the rest
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # main() sets these; monkeypatch restores them
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    text = tmp_path / "text.txt"
    text.write_text("Pruning removes weights. The quick brown fox jumps over the lazy dog.\n" * 8)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir}\noutput: {tmp_path / 'run'}\n"
        f"evaluate: {{tasks: [{text}], seq_len: 16, limit: 1, prompt_tokens: 4, new_tokens: 2}}\n"
        "stages:\n  - prune: {sparsity: 0.5}\n"
    )
    main(["compress", str(recipe)])
    out = capsys.readouterr().out
    assert out == "\n".join(out.splitlines()) + "\n"
    decode = next(line for line in out.splitlines() if "decode_tokens_per_s" in line)
    assert decode.startswith("| ") and decode.endswith(" |") and len(decode) > 80  # one table row, not wrapped
    assert "[dense]" in decode  # not swallowed as rich markup
    assert (tmp_path / "run" / "report.md").read_text() in out
