"""What mbexport prints, and how: one stdout and one stderr console, and build's live stage display.

Both consoles print text literally (no rich markup, no highlighting): messages carry user data such as
``ckpt[v2].zip`` and hints such as ``pip install 'mbexport[bench]'``, which markup would eat. Styles are
given as arguments, never inside the text. Everything that draws on the terminal uses ``err``, so live
displays nest instead of fighting over the cursor.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)


def error(message: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)


def line(message: str) -> None:
    """One plain line on stderr (a warning, a finished stage); above the live display when one is running."""
    err.print(message, soft_wrap=True)


class Fitted:
    """A table where the terminal is wide enough for it, else the same content as plain lines: a table that
    does not fit would cut cells with an ellipsis or break paths mid-word. Every column of ``wide`` that must
    not be cut is ``no_wrap``, so its minimum width says whether it fits."""

    def __init__(self, wide: RenderableType, narrow: RenderableType):
        self.wide, self.narrow = wide, narrow

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        needed = Measurement.get(console, options.update(max_width=1 << 16), self.wide).minimum
        yield self.wide if needed <= options.max_width else self.narrow


class StageDisplay:
    """``build``'s progress: while a stage works, a spinner line with the stage, what it is doing and the
    time so far; the stage's one-line result replaces it. Silent when stderr is no terminal, so logs and
    pipes get only the result lines."""

    def __init__(self, console: Console = err):
        self.console = console

    @contextlib.contextmanager
    def busy(self, stage: str, doing: str) -> Iterator[None]:
        if not self.console.is_terminal:
            yield
            return
        columns = (SpinnerColumn(), TextColumn("{task.description}", markup=False, style="bold"),
                   TextColumn("{task.fields[doing]}", markup=False,
                              table_column=Column(ratio=1)),  # wraps between words: nothing cut
                   TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True, expand=True) as progress:
            progress.add_task(stage, doing=doing)
            yield
