"""Stages declare what they accept and produce: a chain that cannot work fails when the recipe is parsed (before any
model is loaded), naming both stages; chains that do work run end to end on a tiny model and reload."""

import pytest
import torch

from conftest import write_documents
from slimlm.errors import SlimlmError
from slimlm.models import load_model
from slimlm.pipeline import run_recipe
from slimlm.recipe import parse_recipe
from slimlm.storage import stored_modules

G32 = {"bits": 4, "group_size": 32}


def _chain_error(stages: list[dict]) -> str:
    with pytest.raises(SlimlmError) as err:
        parse_recipe({"model": "does/not/exist", "stages": stages})
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "stages, first, second",
    [
        ([{"quantize": {}}, {"prune": {}}], "stages[0].quantize (rtn)", "stages[1].prune"),
        (
            [{"lowrank": {"method": "svd", "rank": 4}}, {"prune_width": {"mlp_keep": 0.5}}],
            "stages[0].lowrank (svd)",
            "stages[1].prune_width",
        ),
        ([{"quantize": {}}, {"quantize": {"method": "gptq"}}], "stages[0].quantize (rtn)", "stages[1].quantize"),
        ([{"quantize": {"pack": False}}, {"quantize": {}}], "stages[0].quantize (rtn)", "stages[1].quantize"),
        (
            [{"prune_depth": {"remove": 1}}, {"lowrank": {"method": "eora", "rank": 4}}],
            "stages[0].prune_depth",
            "stages[1].lowrank",
        ),
        (
            [{"prune_width": {"mlp_keep": 0.5}}, {"lowrank": {"method": "eora", "rank": 4}}],
            "stages[0].prune_width",
            "stages[1].lowrank",
        ),
        (
            [{"share": {"method": "tie_layers", "count": 2}}, {"quantize": {"method": "gptq"}}],
            "stages[0].share",
            "stages[1].quantize",
        ),
        (
            [{"share": {"method": "tie_layers", "count": 2}}, {"prune_depth": {"remove": 1}}],
            "stages[0].share",
            "stages[1].prune_depth",
        ),
        ([{"share": {"method": "kmeans"}}, {"quantize": {}}], "stages[0].share (kmeans)", "stages[1].quantize"),
        (
            [{"quantize": {"method": "smoothquant", "bits": 8, "group_size": None}}, {"distill": {}}],
            "stages[0].quantize (smoothquant)",
            "stages[1].distill",
        ),
        ([{"quantize": {}}, {"lora": {}}], "stages[0].quantize (rtn)", "stages[1].lora"),
        (
            [{"prune": {}}, {"lowrank": {"method": "eora", "rank": 4}}, {"lowrank": {"method": "eora", "rank": 4}}],
            "stages[1].lowrank (eora)",
            "stages[2].lowrank",
        ),
    ],
)
def test_an_impossible_chain_fails_at_validation_naming_both_stages(stages, first, second):
    message = _chain_error(stages)
    assert message.startswith(second + ":") and f"cannot follow {first}" in message


def test_disjoint_targets_may_be_quantized_in_two_stages():
    parse_recipe(
        {
            "model": "m",
            "stages": [
                {"quantize": {"targets": ["q_proj", "k_proj"]}},
                {"quantize": {"bits": 8, "group_size": None, "targets": ["up_proj"]}},
            ],
        }
    )
    assert "which leaves q_proj as packed" in _chain_error(
        [{"quantize": {"targets": ["q_proj"]}}, {"quantize": {"targets": ["q_proj", "up_proj"]}}]
    )


def _run(model_dir, out, data, stages) -> dict:
    recipe = parse_recipe(
        {
            "model": str(model_dir),
            "calibration": {"data": data, "samples": 2, "seq_len": 32},
            "evaluate": {"tasks": ["wikitext2"], "seq_len": 32, "limit": 1, "speed": False},
            "stages": stages,
            "output": str(out),
        }
    )
    return run_recipe(recipe)


DISTILL = {"steps": 2, "batch_size": 1, "grad_accum": 1, "seq_len": 32, "warmup": 0, "checkpoint_every": 100}


@pytest.mark.parametrize(
    "stages, kinds",
    [
        (
            [
                {"prune": {"sparsity": 0.5}},
                {"distill": DISTILL},
                {"quantize": {"method": "gptq", **G32}},
                {"lowrank": {"method": "eora", "rank": 4}},
            ],
            {"packed", "eora"},
        ),
        (
            [
                {"prune_depth": {"remove": 1}},
                {"prune_width": {"mlp_keep": 0.5}},
                {"distill": DISTILL},
                {"quantize": {"method": "rtn", **G32}},
            ],
            {"packed"},
        ),
    ],
    ids=["prune-distill-gptq-eora", "depth-width-distill-rtn"],
)
def test_a_working_chain_runs_end_to_end_and_reloads(stages, kinds, tiny_model_dir, tmp_path):
    data = write_documents(tmp_path)
    for stage in stages:
        if "distill" in stage:
            stage["distill"] = {**stage["distill"], "data": data}
    summary = _run(tiny_model_dir, tmp_path / "run", data, stages)
    assert len(summary["stages"]) == len(stages)
    model = load_model(str(tmp_path / "run" / "model")).model
    assert {module.kind for _, module in stored_modules(model)} == kinds
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 4]])).logits).all()
