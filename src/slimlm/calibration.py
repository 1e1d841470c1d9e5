"""The calibration set: a recipe's `calibration` settings turned into token windows, once per run.

The pipeline builds one `Calibration` and hands it to every stage as ``context.calibration``; a method that needs
data calls ``context.calibration.windows(model, context.notes)`` and gets the windows every other stage got (the
layer-by-layer walk over them is calibrate.py's).
"""

from __future__ import annotations

from typing import Any

import torch

from slimlm import data
from slimlm.errors import SlimlmError


class Calibration:
    """`config` has the recipe's calibration fields (data, samples, seq_len, seed: recipe.CalibrationConfig).
    ``Calibration(config, windows=tensor)`` uses the given windows instead of reading `config.data` (tests,
    benchmarks); `config` may then be None."""

    def __init__(self, config: Any, tokenizer: Any = None, windows: torch.Tensor | None = None):
        self.config, self.tokenizer, self._windows = config, tokenizer, windows

    @property
    def seed(self) -> int:
        return getattr(self.config, "seed", 0)

    def windows(self, model, notes: list[str] | None = None) -> torch.Tensor:
        """Token ids [samples, seq_len], computed on the first call (``data: self`` samples them from `model`);
        `notes` (a stage's context.notes) get one line saying what they are."""
        if self._windows is None:
            self._windows = self._build(model)
        if notes is not None and self.describe() not in notes:
            notes.append(self.describe())
        return self._windows

    def _build(self, model) -> torch.Tensor:
        cfg = self.config
        if cfg is None:
            raise SlimlmError("this stage needs calibration data, and none was configured")
        if cfg.data == "self":
            return data.sample_from_model(model, cfg.samples, cfg.seq_len, cfg.seed)
        return data.calibration_windows(self.tokenizer, data.load_text(cfg.data), cfg.samples, cfg.seq_len, cfg.seed)

    def describe(self) -> str:
        samples, seq_len = self._windows.shape
        source = "given windows" if self.config is None else f"{self.config.data} (seed {self.config.seed})"
        return f"calibration: {samples} windows × {seq_len} tokens of {source}"
