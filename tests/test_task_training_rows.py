"""A recipe that distils on a task's held-apart rows may not evaluate those rows (preflight.check_data)."""

import pytest

from slimlm.errors import SlimlmError
from slimlm.preflight import check_data
from slimlm.recipe import parse_recipe


def _recipe(task_limit):
    distill = {"loss": {"kl": 1}, "teacher_text": {"prompts": "sst2"}, "steps": 1}
    evaluate = {"tasks": ["wikitext2", "sst2"], "task_limit": task_limit}
    return parse_recipe({"model": "m", "evaluate": evaluate, "stages": [{"distill": distill}]})


@pytest.mark.parametrize("task_limit,shown", [(None, "all"), (437, "437")])
def test_evaluating_rows_the_distillation_trains_on_is_refused(task_limit, shown):
    with pytest.raises(SlimlmError) as error:
        check_data(_recipe(task_limit))
    message = str(error.value)
    assert message.startswith(f"evaluate.task_limit: {shown} sst2 documents would score rows that stages[0].distill")
    assert "set task_limit to at most 436" in message and "\n" not in message


def test_an_evaluation_that_stops_before_the_trained_rows_passes():
    check_data(_recipe(436))
