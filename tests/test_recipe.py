import pytest

from slimlm.errors import SlimlmError
from slimlm.recipe import load_recipe, parse_recipe


def _error(data) -> str:
    with pytest.raises(SlimlmError) as err:
        parse_recipe(data)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "stage, expected",
    [
        ({"prune": {"sparsity": 1.0}}, "stages[0].prune.sparsity: Input should be less than 1"),
        ({"prune": {"sparsity": -0.1}}, "stages[0].prune.sparsity: Input should be greater than or equal to 0"),
        ({"prune": {"pattern": "4:4"}}, "stages[0].prune.pattern: N:M needs 0 < N < M, got 4:4"),
        ({"prune": {"pattern": "dense"}}, "stages[0].prune.pattern: must be 'unstructured' or N:M"),
        ({"prune": {"method": "nope"}}, "stages[0].prune.method: unknown method 'nope'"),
        ({"prune": {"sparsityy": 0.5}}, "stages[0].prune.sparsityy: unknown option"),
        ({"prnue": {}}, "stages[0]: unknown stage 'prnue'; known stages: "),
    ],
)
def test_bad_stage_fields_name_their_yaml_path(stage, expected):
    assert expected in _error({"model": "smollm2-135m", "stages": [stage]})


def test_bad_top_level_fields():
    assert "calibration.samples:" in _error({"model": "m", "calibration": {"samples": 0}})
    assert "outptu: unknown option" in _error({"model": "m", "outptu": "x"})
    assert "dtype: must be one of" in _error({"model": "m", "dtype": "int3"})
    assert "model: Field required" in _error({"stages": []})


def test_pattern_sets_the_sparsity():
    recipe = parse_recipe({"model": "m", "stages": [{"prune": {"pattern": "2:4"}}]})
    assert recipe.stages[0].options.sparsity == 0.5


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nstages: [\n")
    with pytest.raises(SlimlmError, match=r"r\.yaml:\d+: not valid YAML"):
        load_recipe(path)


def test_missing_recipe_file():
    with pytest.raises(SlimlmError, match="recipe file not found"):
        load_recipe("/nonexistent/recipe.yaml")


def test_fingerprint_ignores_output_but_not_options():
    a = parse_recipe({"model": "m", "output": "a", "stages": [{"prune": {"sparsity": 0.5}}]})
    b = parse_recipe({"model": "m", "output": "b", "stages": [{"prune": {"sparsity": 0.5}}]})
    c = parse_recipe({"model": "m", "output": "a", "stages": [{"prune": {"sparsity": 0.6}}]})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_quickstart_recipe_validates():
    from pathlib import Path

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")
    assert recipe.model == "smollm2-135m" and [stage.name for stage in recipe.stages] == ["quantize"]
    assert recipe.stages[0].options.group_size == 32 and recipe.export[0].format == "gguf"
