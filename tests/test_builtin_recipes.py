"""Every shipped recipe runs through `slimlm compress` on the built-in model (calibration and evaluation shrunk so
the test takes minutes, not hours); every stage's saved model reloads through slimlm, and plain from_pretrained loads
it too or refuses it (a folder of slimlm's own modules)."""

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
    return spec


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
