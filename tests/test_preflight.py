"""Checks that need the model's shape run from its config before any weight is loaded (slimlm/preflight.py)."""

import pytest

from slimlm.errors import SlimlmError
from slimlm.recipe import check_recipe, parse_recipe


def _check(model_dir, stages, **extra) -> None:
    check_recipe(parse_recipe({"model": str(model_dir), "stages": stages, **extra}))


@pytest.mark.parametrize(
    "stages, message",
    [
        (
            [{"quantize": {"group_size": 48}}],
            "stages[0].quantize.group_size: 48 does not divide the 64 input features of q_proj",
        ),
        (
            [{"prune_width": {"mlp_keep": 96}}, {"quantize": {"group_size": 64, "targets": ["down_proj"]}}],
            "stages[1].quantize.group_size: 64 does not divide the 96 input features of down_proj",
        ),
        (
            [{"quantize": {"group_size": 32, "per_projection": {"down_proj": {"bits": 4, "group_size": 48}}}}],
            "stages[0].quantize.per_projection.down_proj.group_size: 48 does not divide the 128 input features of "
            "down_proj",
        ),
        ([{"prune_depth": {"remove": 2}}], "stages[0].prune_depth.remove: 2 would leave no layer of the model's 2"),
        (
            [{"prune_depth": {"remove": 1}}, {"prune_depth": {"remove": 1}}],
            "stages[1].prune_depth.remove: 1 would leave no layer of the model's 1",
        ),
        (
            [{"prune_depth": {"layers": [1]}}, {"prune_depth": {"layers": [1]}}],
            "stages[1].prune_depth.layers: [1] must name layers of the model's 1 (0-0)",
        ),
        ([{"prune_width": {"mlp_keep": 500}}], "stages[0].prune_width.mlp_keep: 500 is more than the model's 128 MLP"),
        ([{"prune_width": {"heads_keep": 5}}], "stages[0].prune_width.heads_keep: 5 is more than the model's 4 query"),
        (
            [{"share": {"granularity": "row_group", "rows_per_codebook": 48}}],
            "stages[0].share.rows_per_codebook: 48 does not divide the 64 output rows of q_proj",
        ),
    ],
)
def test_a_shape_the_model_cannot_take_is_refused_from_its_config(tiny_model_dir, stages, message):
    with pytest.raises(SlimlmError) as err:
        _check(tiny_model_dir, stages)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_fraction_kept_leaves_later_widths_to_the_stage(tiny_model_dir):
    _check(tiny_model_dir, [{"prune_width": {"mlp_keep": 0.6}}, {"quantize": {"group_size": 64}}])


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"calibration": {"data": "missing.jsonl"}}, "calibration.data: no such file: missing.jsonl"),
        ({"calibration": {"data": "c5"}}, "calibration.data: 'c5' is not a named set"),
        ({"evaluate": {"tasks": ["wikitext2", "notes.txt"]}}, "evaluate.tasks[1]: no such file: notes.txt"),
    ],
)
def test_missing_data_is_refused_before_the_run(tiny_model_dir, extra, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SlimlmError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _check(tiny_model_dir, [{"prune": {}}], **extra)


def test_an_empty_calibration_file_is_refused(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SlimlmError, match=r"calibration\.data: .*empty\.txt is empty"):
        _check(tiny_model_dir, [{"prune": {}}], calibration={"data": str(empty)})


def test_an_unknown_task_is_refused_before_the_run(tiny_model_dir):
    with pytest.raises(SlimlmError, match=r"evaluate\.tasks: unknown task 'no_such_task'"):
        _check(tiny_model_dir, [{"prune": {}}], evaluate={"tasks": ["no_such_task"]})


def test_a_missing_model_is_named(tmp_path):
    with pytest.raises(SlimlmError, match=r"^model: "):
        _check(tmp_path / "nowhere", [{"prune": {}}])
