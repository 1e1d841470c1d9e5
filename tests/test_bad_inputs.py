"""Bad input gets one line on stderr naming the option, file or value and what was allowed, a non-zero exit, and
nothing left on disk. Most cases run `slimlm.cli.main` in this process (fast); the ones that depend on what a
fresh interpreter prints (library warnings) run the command in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from slimlm.cli import main
from slimlm.errors import SlimlmError


@pytest.fixture(autouse=True)
def _quiet_library_settings(monkeypatch):
    """What main() arranges in a fresh process, through the environment, before transformers is imported; in this
    process transformers is imported already, so its bars are switched off directly (and back on after)."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # main() would set them; monkeypatch restores them
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if bars:
        hf_logging.enable_progress_bar()


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["eval", "--model", "m", "--limit", "0"], "Invalid value for '--limit'"),
        (["eval", "--model", "m", "--seq-len", "abc"], "Invalid value for '--seq-len'"),
        (["eval", "--model", "m", "--seq-len", "2000000"], "Invalid value for '--seq-len'"),
        (["eval", "--model", "m", "--bogus"], "No such option: --bogus"),
        (["eval"], "Missing option '--model'"),
        (["info"], "Missing argument 'model'"),
        (["bogus"], "No such command 'bogus'"),
    ],
)
def test_usage_errors_name_the_option_with_click_exit_code(capsys, args, expected):
    code, out, err = _cli(capsys, *args)
    line = _one_error_line(err)
    assert code == 2 and expected in line and "slimlm" in line and out == ""
    assert "Error" not in line.removeprefix("error: ")  # the message, not a class name


def test_no_arguments_shows_the_help_and_exits_2(capsys):
    code, out, err = _cli(capsys)
    assert code == 2 and "Usage: slimlm" in out + err and "compress" in out + err


def test_debug_works_anywhere_on_the_command_line(capsys, tmp_path):
    with pytest.raises(SlimlmError, match="GGUF file not found"):  # the traceback of the real error, not a usage error
        main(["info", str(tmp_path / "nothing.gguf"), "--debug"])


def test_ctrl_c_exits_130(capsys, monkeypatch):
    from slimlm import models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupted)
    code, _, err = _cli(capsys, "info", "anything")
    assert code == 130 and err.strip() == "interrupted"


def test_a_real_sigint_exits_130(tiny_model_dir):
    import os
    import signal

    env = {key: value for key, value in os.environ.items() if key != "SLIMLM_NO_PROGRESS"}
    command = [sys.executable, "-m", "slimlm.cli", "eval", "--model", str(tiny_model_dir), "--seq-len", "8"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    first = process.stderr.readline()  # the first progress line: the evaluation loop is running
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=120)[1]
    assert "perplexity: 1/" in first and process.returncode == 130
    assert rest.splitlines()[-1] == "interrupted"


def test_a_recipe_without_stages_is_refused_before_anything_runs(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: smollm2-135m\nstages: []\noutput: {tmp_path / 'run'}\n")
    code, out, err = _cli(capsys, "compress", str(recipe))
    assert code == 1 and _one_error_line(err) == "error: stages: a recipe needs at least one stage, or an export"
    assert not (tmp_path / "run").exists() and out == ""


def test_eval_refuses_non_finite_weights_naming_the_tensor(capsys, tmp_path, tiny_tokenizer):
    from conftest import build_tiny_llama
    from slimlm.models import save_model

    model = build_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    save_model(model, tiny_tokenizer, tmp_path / "nan")
    code, _, err = _cli(capsys, "eval", "--model", str(tmp_path / "nan"), "--seq-len", "16", "--limit", "1")
    assert code == 1
    assert _one_error_line(err) == (
        "error: model.layers.1.mlp.up_proj.weight: 1 of 8192 values are not finite "
        "(NaN/Inf); the model cannot be evaluated"
    )


def test_truncated_safetensors_names_the_file(capsys, tmp_path, tiny_model_dir):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = _cli(capsys, "info", str(folder))
    assert code == 1 and f"{weights}: not a complete safetensors file" in _one_error_line(err)


def _gguf_file(path):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_or_truncated_gguf_is_named(capsys, tmp_path, damage):
    path = _gguf_file(tmp_path / "model.gguf")
    data = path.read_bytes()
    path.write_bytes(b"not a gguf file" * 8 if damage == "garbage" else data[: len(data) - 4096])
    code, _, err = _cli(capsys, "info", str(path))
    assert code == 1 and f"{path}: not a valid GGUF file" in _one_error_line(err)


@pytest.mark.parametrize("spec", ["./typo", "missing/model.safetensors", "a/b/c", "org/name", "{tmp}/typo"])
def test_a_mistyped_path_is_not_sent_to_the_hub(capsys, tmp_path, monkeypatch, spec):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # org/name: offline, the hub cannot have it
    spec = spec.format(tmp=tmp_path)
    code, _, err = _cli(capsys, "info", spec)
    assert code == 1 and _one_error_line(err).startswith(f"error: no such file or folder: {spec}")


def test_an_unsupported_architecture_is_one_line_without_library_warnings(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2's default special token ids lie outside this small vocabulary: transformers warns about them on load
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer))).save_pretrained(
        tmp_path / "gpt2"
    )
    result = subprocess.run(
        [sys.executable, "-m", "slimlm.cli", "info", str(tmp_path / "gpt2")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert _one_error_line(result.stderr).startswith(
        f"error: {tmp_path / 'gpt2' / 'config.json'}: architecture GPT2LMHeadModel is not supported"
    )


def test_dry_run_validates_without_loading_or_writing(capsys, tmp_path, tiny_model_dir, monkeypatch):
    from slimlm import models

    def no_weights(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(models, "load_model", no_weights)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\nstages:\n  - prune: {{sparsity: 0.5}}\noutput: {tmp_path / 'run'}\n")
    code, out, err = _cli(capsys, "compress", str(recipe), "--dry-run")
    assert code == 0 and "valid (1 stages: prune)" in out and err == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("model", "stage", "expected"),
    [
        ("org/name", "prune: {sparsity: 0.5}", "error: model: no such file or folder: org/name"),
        (None, "quantize: {group_size: 48}", "error: stages[0].quantize.group_size: 48 does not divide"),
    ],
)
def test_dry_run_refuses_what_the_run_would_fail_on(
    capsys, tmp_path, tiny_model_dir, monkeypatch, model, stage, expected
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model or tiny_model_dir}\nstages:\n  - {stage}\noutput: {tmp_path / 'run'}\n")
    code, out, err = _cli(capsys, "compress", str(recipe), "--dry-run")
    assert code == 1 and _one_error_line(err).startswith(expected) and out == ""
    assert not (tmp_path / "run").exists()


def test_stages_lists_every_stage_its_methods_and_defaults(capsys):
    from slimlm.registry import get_stage, stage_names

    code, out, _ = _cli(capsys, "stages")
    assert code == 0
    for name in stage_names():
        assert f"\n{name}" in f"\n{out}"  # each stage starts a line
        for option in get_stage(name).options.model_fields:
            assert option in out
    for method in ("magnitude", "wanda", "sparsegpt", "gptq", "awq", "eora", "kmeans", "tie_layers"):
        assert method in out
    assert "block_influence" in out and "0.5" in out


def test_stages_spells_out_union_and_nested_option_types():
    from slimlm.cli import _allowed
    from slimlm.quantize.smoothquant import SmoothQuantOptions
    from slimlm.recover.distill import DistillOptions

    fields = DistillOptions.model_fields
    assert _allowed(fields["temperature"]) == "float, > 0 | {start, end, schedule}"
    assert _allowed(fields["loss_mix"]) == "{end, schedule} | null"
    assert _allowed(fields["on_policy"]) == "float, >= 0, <= 1"
    assert _allowed(SmoothQuantOptions.model_fields["group_size"]) == "null"


def test_rich_markup_in_records_is_printed_as_is():
    from rich.console import Console

    from slimlm.cli import _records_table
    from slimlm.evaluate.records import Record

    record = Record(
        "speed",
        "decode_tokens_per_s",
        41.2,
        "tokens/s",
        True,
        {"kernel": "dense"},
        "[dense] is no speedup; see [kernel]",
        [40.1, 42.0],
    )
    console = Console(record=True, width=200)
    console.print(_records_table("t", [record]))
    text = console.export_text()
    assert "[dense] is no speedup; see [kernel]" in text and "41.2 (40.1–42)" in text


def test_progress_is_one_plain_line_per_step_off_a_terminal(capsys, monkeypatch):
    from slimlm.progress import progress_bar

    monkeypatch.delenv("SLIMLM_NO_PROGRESS", raising=False)
    with progress_bar("layers", 3) as advance:
        for _ in range(3):
            advance()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["layers: 1/3", "layers: 2/3", "layers: 3/3"]
