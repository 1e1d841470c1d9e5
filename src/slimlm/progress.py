"""Progress bars on stderr (stdout stays clean for --json), with elapsed time and ETA."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

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
