"""`slimlm export` and a recipe's `export` list: deployable files written from a model or at the end of a run, and
targets the final model could not be written to refused before the run starts."""

import json
import subprocess
import sys

import gguf
import pytest
from transformers import AutoModelForCausalLM

from slimlm.errors import SlimlmError
from slimlm.pipeline import run_recipe
from slimlm.recipe import check_recipe, parse_recipe


def _slimlm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimlm.cli", *args], capture_output=True, text=True, timeout=600)


def test_the_command_writes_a_gguf_and_refuses_an_unknown_format(tiny_model_dir, tmp_path):
    done = _slimlm(
        "export", str(tiny_model_dir), "--format", "gguf", "--output", str(tmp_path / "m.gguf"), "--pre", "gpt-2"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ALL_F32" in done.stdout and len(gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors) > 0
    refused = _slimlm("export", str(tiny_model_dir), "--format", "onnx", "--output", str(tmp_path / "x"))
    assert refused.returncode != 0 and refused.stderr.startswith("error: export") and "'gguf'" in refused.stderr
    assert not (tmp_path / "x").exists()


def _recipe(model_dir, out, quantize: dict, export: list) -> dict:
    return {
        "model": str(model_dir),
        "calibration": {"data": "self", "samples": 2, "seq_len": 16},
        "evaluate": {"tasks": ["wikitext2"], "seq_len": 32, "limit": 1, "speed": False},
        "stages": [{"quantize": quantize}],
        "export": export,
        "output": str(out),
    }


def test_a_recipe_ends_in_deployable_files(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    spec = _recipe(
        tiny_model_dir,
        out,
        {"method": "rtn", "bits": 4, "group_size": 32},
        [{"format": "gguf", "embeddings": "q8_0", "pre": "gpt-2"}, {"format": "hf"}],
    )
    summary = run_recipe(parse_recipe(spec))
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out / "export" / "model.gguf")).tensors}
    assert {"Q4_0", "Q8_0", "F32"} == types
    AutoModelForCausalLM.from_pretrained(out / "export" / "hf")  # plain transformers loads the dequantized copy
    assert [entry["format"] for entry in summary["exports"]] == ["gguf", "hf"]
    report = (out / "report.md").read_text()
    assert "## Exports" in report and "model.gguf" in report
    assert (
        json.loads((out / "report.json").read_text())["exports"][0]["bytes"]
        == (out / "export" / "model.gguf").stat().st_size
    )


@pytest.mark.parametrize(
    "quantize, export, message",
    [
        (
            {"method": "rtn", "bits": 4, "group_size": 64},
            {"format": "gguf"},
            "export[0].gguf: stages[0].quantize leaves modules it cannot write exactly (4-bit group 64 has no GGUF "
            "block type); quantize symmetric with group_size: 32",
        ),
        (
            {"method": "rtn", "bits": 4, "group_size": 32, "per_projection": {"q_proj": {"bits": 3, "group_size": 32}}},
            {"format": "gguf"},
            "export[0].gguf: stages[0].quantize leaves modules it cannot write exactly (3-bit group 32 has no GGUF "
            "block type)",
        ),
        (
            {"method": "smoothquant", "bits": 8, "group_size": None},
            {"format": "compressed-tensors"},
            "export[0].compressed-tensors: stages[0].quantize leaves modules it cannot write exactly (its smoothquant",
        ),
    ],
)
def test_an_export_the_final_model_cannot_take_fails_before_the_run(
    tiny_model_dir, tmp_path, quantize, export, message
):
    recipe = parse_recipe(_recipe(tiny_model_dir, tmp_path / "run", quantize, [export]))
    with pytest.raises(SlimlmError) as err:
        check_recipe(recipe)
    assert str(err.value).startswith(message)
    check_recipe(parse_recipe(_recipe(tiny_model_dir, tmp_path / "run", quantize, [{**export, "dequantize": True}])))
