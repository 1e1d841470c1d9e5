"""Scores shared between `slimlm auto` runs through their work folder (`--work`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from slimlm.pipeline import write_json_atomic


class SharedScores:
    """Scores kept in the shared work folder (`--work`), so that runs at other budgets reuse the rows they have in
    common (the uniform and llama.cpp baselines): keyed by the row and the settings its score depends on, kept only
    while the scored file or folder exists. Without `--work`: nothing kept."""

    SCORED_BY = ("model", "target", "calib_data", "fit_samples", "fit_seq_len", "eval_chunks", "recover")

    def __init__(self, settings):  # run.AutoSettings
        self.path = Path(settings.work) / "scores.json" if settings.work else None
        self.settings = {name: getattr(settings, name) for name in self.SCORED_BY}
        self.scores = json.loads(self.path.read_text()) if self.path and self.path.is_file() else {}

    def _key(self, row: dict) -> str:
        return hashlib.sha256(json.dumps([self.settings, row], sort_keys=True).encode()).hexdigest()[:16]

    def get(self, row: dict) -> dict | None:
        found = self.scores.get(self._key(row))
        return found if found and Path(found["path"]).exists() else None

    def put(self, row: dict, figures: dict) -> dict:
        if self.path is not None:
            self.scores[self._key(row)] = figures
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.scores)
        return figures
