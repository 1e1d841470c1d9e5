"""Where slimlm finds shared data and keeps its cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from slimlm.errors import SlimlmError

_DATA_ENV = "SLIMLM_DATA_DIR"
_CACHE_ENV = "SLIMLM_CACHE_DIR"


def shared_data_dir() -> Path:
    """The folder holding the offline evaluation data (``../shared/data`` beside the checkout).

    Looked up in this order: $SLIMLM_DATA_DIR, ``../shared/data`` from the working directory, then
    ``../shared/data`` beside the source checkout this package was imported from.
    """
    if os.environ.get(_DATA_ENV):
        path = Path(os.environ[_DATA_ENV]).expanduser()
        if not path.is_dir():
            raise SlimlmError(f"${_DATA_ENV}={path} is not a folder; point it at the shared data folder")
        return path
    candidates = [Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise SlimlmError(f"shared data folder not found (tried {tried}); set ${_DATA_ENV}")


def cache_dir() -> Path:
    """slimlm's cache (converted models, evaluation results of originals): $SLIMLM_CACHE_DIR or ~/.cache/slimlm."""
    path = Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "slimlm").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
