"""Every shipped recipe runs through `slimlm compress` on the built-in model (calibration, evaluation, training steps
and the teacher's text shrunk so the test takes minutes, not hours); every stage's saved model reloads through
slimlm, and plain from_pretrained loads it too or refuses it (a folder of slimlm's own modules)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def _shrunk(recipe: Path, output: Path) -> dict:
    spec = yaml.safe_load(recipe.read_text())
    spec["calibration"] = {**spec.get("calibration", {}), "samples": 2, "seq_len": 128}
    spec["evaluate"] = {"tasks": ["wikitext2"], "seq_len": 256, "limit": 1, "speed": False}
    spec["output"] = str(output)
    for stage in spec["stages"]:
        for options in stage.values():
            _shrink_training(options)
    return spec


def _shrink_training(options: dict) -> None:
    """At most 2 steps of 128-token windows; the teacher writes 8 continuations of at most 16 tokens (for task
    prompts, 8 answers): the shipped budgets are what benchmarks/recovery.py measures, not what this test checks."""
    if "steps" in options:
        options["steps"] = min(options["steps"], 2)
        options["seq_len"] = min(options.get("seq_len", 128), 128)
    if options.get("teacher_text") is not None:
        text = options["teacher_text"]
        text["samples"] = 8
        text["max_new_tokens"] = min(text.get("max_new_tokens", 16), 16)


@pytest.mark.builtin
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipe_runs_from_slimlm_compress_on_the_builtin_model(recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimlm.models import load_model
    from slimlm.storage import stored_modules

    shrunk = tmp_path / recipe.name
    shrunk.write_text(yaml.safe_dump(_shrunk(recipe, tmp_path / "run")))
    result = subprocess.run(
        [sys.executable, "-m", "slimlm.cli", "compress", str(shrunk)], capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "report.md").exists()
    stages = sorted((tmp_path / "run" / "stages").iterdir())
    assert len(stages) == len(yaml.safe_load(recipe.read_text())["stages"])
    for folder in stages:
        model = load_model(str(folder)).model
        assert model.config.num_hidden_layers == len(model.model.layers)
        if stored_modules(model):  # packed quantized: plain transformers must refuse, not load random weights
            with pytest.raises(ValueError, match="model type `slimlm`"):
                AutoModelForCausalLM.from_pretrained(folder)
        else:
            AutoModelForCausalLM.from_pretrained(folder)
