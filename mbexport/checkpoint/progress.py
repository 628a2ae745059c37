"""Progress on stderr for the slow steps (reading shards, writing weights); silent when stderr is no terminal."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from mbexport.terminal import err as _console  # the one stderr console: nests with build's stage display


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(bytes)`` for a transient byte-count bar."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=True, disable=not _console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@contextlib.contextmanager
def status(description: str) -> Iterator[None]:
    """A spinner while one opaque step (e.g. unpickling a shard) runs."""
    if not _console.is_terminal:
        yield
        return
    with _console.status(description):
        yield
