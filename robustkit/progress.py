"""One progress bar for long loops (rich), silent when disabled or not on a terminal."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Bar:
    """``with Bar("epoch 1", total=430) as bar: bar.advance(1, "loss 0.31")``."""

    def __init__(self, title: str, total: int, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self.title, self.total = title, total
        self.done = 0  # steps advanced so far

    def __enter__(self) -> Bar:
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}", markup=False), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}", markup=False),
                console=Console(stderr=True), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total, info="")
        return self

    def advance(self, steps: int = 1, info: str | None = None) -> None:
        self.done += steps
        if self._progress is not None and self._task is not None:
            if info is None:
                self._progress.update(self._task, advance=steps)
            else:
                self._progress.update(self._task, advance=steps, info=info)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
