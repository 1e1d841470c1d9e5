"""Training metrics: one JSON line per optimizer step (appended, so a resumed run continues the same file), the same
scalars to TensorBoard when it is installed, and a progress bar with the loss, tokens/s and the ETA.

Only the main process writes; other ranks get a MetricsLog that does nothing.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

from slimlm.progress import progress_bar


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the JSONL file holds the same numbers
        return None
    return SummaryWriter(str(folder))


class MetricsLog:
    """``with MetricsLog(path, total_steps, done, enabled) as log: log.step(step, {"loss": ...}, tokens)``."""

    def __init__(self, path: Path, total_steps: int, steps_done: int, enabled: bool, description: str = "train"):
        self.path = Path(path)
        self.total_steps = total_steps
        self.steps_done = steps_done
        self.enabled = enabled
        self.description = description
        self._stack = ExitStack()
        self._advance = None
        self._writer = None
        self._started = time.perf_counter()
        self._tokens = 0

    def __enter__(self) -> MetricsLog:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = _tensorboard_writer(self.path.parent / "tensorboard")
            self._advance = self._stack.enter_context(progress_bar(self.description, self.total_steps))
            self._forget_after(self.steps_done)
            if self.steps_done:
                self._advance(self.steps_done, description=f"{self.description} (resumed at {self.steps_done})")
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()
        self._stack.close()

    def _forget_after(self, step: int) -> None:
        """A run resumed at `step` repeats the steps a killed run logged after its last checkpoint: drop those."""
        records = read_metrics(self.path)
        if any(r["step"] > step for r in records):
            kept = "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(kept)
            tmp.replace(self.path)

    def step(self, step: int, values: dict[str, float], tokens: int) -> dict:
        """Record optimizer step `step` (1-based) that processed `tokens` tokens on all ranks together."""
        self._tokens += tokens
        elapsed = time.perf_counter() - self._started
        record = {
            "step": step,
            **values,
            "tokens_per_s": self._tokens / max(elapsed, 1e-9),
            "elapsed_s": round(elapsed, 3),
            "time": time.time(),
        }
        if not self.enabled:
            return record
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"train/{name}", value, step)
        self._advance(
            1, description=f"{self.description} loss {values['loss']:.4g} · {record['tokens_per_s']:,.0f} tok/s"
        )
        return record


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
    return records
