import pytest

from slimlm.auto.budget import parse_budget
from slimlm.errors import SlimlmError


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("70MB", "size", 70e6),
        ("88.2 MiB", "size", 88.2 * 2**20),
        ("91726624B", "size", 91726624),
        ("1.5GB", "size", 1.5e9),
        ("3.5bpw", "bpw", 3.5),
        ("5ms/token", "latency", 5.0),
    ],
)
def test_budgets_parse_to_their_kind_and_value(text, kind, value):
    budget = parse_budget(text)
    assert (budget.kind, budget.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("text", ["70", "seventy MB", "70 parsecs", "0MB", "40bpw", "-3bpw", ""])
def test_bad_budgets_are_one_line_naming_the_value(text):
    with pytest.raises(SlimlmError) as err:
        parse_budget(text)
    message = str(err.value)
    assert "\n" not in message and f"{text!r}" in message


def test_bits_per_weight_become_bytes_of_the_model():
    assert parse_budget("4bpw").bytes(1000) == 500
    assert parse_budget("70MB").bytes(10**9) == 70_000_000


def test_budgets_limit_bytes_or_milliseconds_per_token():
    assert (parse_budget("3.5bpw").resource, parse_budget("3.5bpw").amount(1000)) == ("bytes", 437)
    assert (parse_budget("5ms/token").resource, parse_budget("5ms/token").amount(1000)) == ("ms_per_token", 5.0)
    with pytest.raises(SlimlmError, match="a decode latency, not a size"):
        parse_budget("5ms/token").bytes(1000)
