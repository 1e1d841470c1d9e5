"""Result records: every number slimlm prints travels with the settings that produced it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Record:
    """One measured figure.

    `task` groups figures (``wikitext2``, ``speed``, ``size``, ``piqa``...), `metric` names the figure inside
    the task (``perplexity``, ``kl_divergence``, ``decode_tokens_per_s``...). `protocol` holds every setting
    needed to reproduce it (data file and sha256, seq_len, windows, tokens, threads, dtype...).
    `value` is None when the figure could not be measured; `note` then says why (e.g. "no energy counter").
    `spread` is [min, max] over the runs a median `value` was taken from (speed figures), None otherwise.
    """

    task: str
    metric: str
    value: float | None
    unit: str = ""
    higher_is_better: bool | None = None
    protocol: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    spread: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        return cls(**data)

    def protocol_line(self) -> str:
        """The protocol as one human-readable line, printed beside the number."""
        return ", ".join(f"{k}={v}" for k, v in self.protocol.items())


# How many standard errors above chance a figure must be to count as better than guessing.
CHANCE_MARGIN_STDERRS = 2.0


def at_chance(record: Record) -> bool | None:
    """Whether a task figure is indistinguishable from guessing: within two standard errors of the chance level its
    protocol records (SST-2 0.5, a multiple-choice task 1/choices, TriviaQA 0). None where no chance level is known
    or there is no value. A figure at chance says nothing about the model's quality and should be shown as such."""
    chance = record.protocol.get("chance")
    if chance is None or record.value is None or record.higher_is_better is not True:
        return None
    stderr = record.protocol.get("stderr") or 0.0
    return record.value <= chance + CHANCE_MARGIN_STDERRS * stderr
