"""Progress on stderr (stdout stays clean for --json), with elapsed time and ETA: a bar on a terminal, one plain
line per step otherwise (a log file or CI, where a live bar shows nothing until it ends)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


def _disabled() -> bool:
    return bool(os.environ.get("SLIMLM_NO_PROGRESS"))


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """``with progress_bar("layers", 30) as advance: ... advance()``; ``advance(description=...)`` relabels."""
    if _disabled():
        yield lambda *args, **kwargs: None
        return
    if not _console.is_terminal:
        yield _plain_lines(description, total)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console, transient=False) as progress:
        task = progress.add_task(description, total=total)

        def advance(steps: int = 1, description: str | None = None) -> None:
            progress.update(task, advance=steps, **({"description": description} if description else {}))

        yield advance


def _plain_lines(description: str, total: int | None) -> Callable[..., None]:
    started, done, label = time.perf_counter(), 0, description

    def advance(steps: int = 1, description: str | None = None) -> None:
        nonlocal done, label
        done, label = done + steps, description or label
        elapsed = time.perf_counter() - started
        eta = f", ETA {elapsed / done * (total - done):.0f} s" if total and done else ""
        # one write per line: a Ctrl-C between text and newline would glue the next message onto it
        sys.stderr.write(f"{label}: {done}/{total or '?'} ({elapsed:.0f} s{eta})\n")
        sys.stderr.flush()

    return advance
