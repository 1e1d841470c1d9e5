"""Training checkpoints that are either whole or absent: accelerate's save_state into a temporary folder, renamed.

`accelerator.save_state` writes the prepared models (FSDP/DeepSpeed shards included), optimizers, schedulers, every
rank's RNG states (python, numpy, torch, CUDA) and registered objects (the data position), but writes in place:
a ``kill -9`` during a save would leave a half-written folder that ``load_state`` might read. Here every rank saves
into ``.tmp-step-NNNNNNNN`` (a name all ranks agree on), then the main process adds a marker file and renames the
folder to ``step-NNNNNNNN``. A folder without the marker, or a leftover temporary folder, is never loaded.
Checkpoints are on a filesystem all ranks share (as accelerate's save_state assumes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "slimlm_checkpoint.json"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_path(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def completed_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _NAME.match(folder.name)
        if match and (folder / MARKER).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = completed_checkpoints(root)
    return found[-1][1] if found else None


def remove_incomplete(root: Path) -> None:
    """Temporary folders left by a process killed mid-save (main process only)."""
    root = Path(root)
    if root.is_dir():
        for folder in root.glob(".tmp-step-*"):
            shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(accelerator, root: Path, step: int, info: dict, keep: int) -> Path:
    """Save the accelerator's whole training state for `step` atomically; keep the newest `keep` checkpoints.

    Every rank must call this (save_state gathers sharded states and writes per-rank RNG files)."""
    root = Path(root)
    final = checkpoint_path(root, step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MARKER).write_text(json.dumps({"step": step, **info}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in completed_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(accelerator, root: Path, **load_kwargs) -> Path | None:
    """Restore the newest complete checkpoint into the prepared objects; None when there is none."""
    if accelerator.is_main_process:
        remove_incomplete(root)
    accelerator.wait_for_everyone()
    folder = latest_checkpoint(root)
    if folder is not None:
        accelerator.load_state(str(folder), **load_kwargs)
    return folder


def remove_checkpoints_from(root: Path, step: int) -> None:
    """Checkpoints of `step` and later (main process only): weights known to be bad."""
    for saved, folder in completed_checkpoints(root):
        if saved >= step:
            shutil.rmtree(folder, ignore_errors=True)


def remove_checkpoints(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
