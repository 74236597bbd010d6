"""Progress for long loops: a rich bar on a terminal, plain lines when the output is piped.

On a terminal :class:`Bar` draws one rich bar with rate and time left. When stderr is not a
terminal (a log file, CI, ``2>&1 | tee``) it prints the lines a caller writes with
:meth:`Bar.note` (one per finished cell) and, while work goes on, one line at least every
:data:`HEARTBEAT_SECONDS` saying how far it got. Disabled (``-q``), it prints nothing.

:func:`counting_rows` hooks a model so that every forward pass moves a bar by the rows it
processed: the bar then moves inside an attack, per step, restart, stage and query block,
without any attack knowing about progress.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn

#: Longest silence of a piped bar while work goes on, in seconds.
HEARTBEAT_SECONDS = 60.0


class Bar:
    """``with Bar("epoch 1", total=430) as bar: bar.advance(1, "loss 0.31")``.

    ``counts``: show ``done/total`` (steps a reader counts, such as batches); else a percentage
    (an estimate of the work, such as a sweep's forward passes)."""

    def __init__(self, title: str, total: int, enabled: bool = True, counts: bool = True
                 ) -> None:
        self.counts = counts
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.piped = enabled and not self.live
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self.title, self.total = title, total
        self.done = 0  # steps advanced so far
        self.info = ""
        self._started = self._last_line = time.monotonic()

    def __enter__(self) -> Bar:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}", markup=False), BarColumn(),
                MofNCompleteColumn() if self.counts else TaskProgressColumn(),
                TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}", markup=False),
                console=Console(stderr=True), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total, info="")
        self._started = self._last_line = time.monotonic()
        return self

    def advance(self, steps: int = 1, info: str | None = None) -> None:
        """Move the bar by ``steps`` (clipped to the total); ``info`` replaces the text after it."""
        steps = max(0, min(steps, self.total - self.done))
        self.done += steps
        if info is not None:
            self.info = info
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=steps, info=self.info)
        self.pulse()

    def resize(self, total: int) -> None:
        """A new estimate of the whole work (never below what is done)."""
        self.total = max(total, self.done)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=self.total)

    def note(self, line: str) -> None:
        """A line for the log: printed when piped (a terminal has the bar)."""
        if self.piped:
            self._write(line)

    def pulse(self) -> None:
        """When piped and silent for :data:`HEARTBEAT_SECONDS`, say how far the work got."""
        if self.piped and time.monotonic() - self._last_line >= HEARTBEAT_SECONDS:
            share = self.done / self.total if self.total else 0.0
            elapsed = time.monotonic() - self._started
            self._write(f"{self.title}: {share:.0%} after {elapsed:.0f} s"
                        + (f" ({self.info})" if self.info else ""))

    def _write(self, line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self._last_line = time.monotonic()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()


@contextlib.contextmanager
def counting_rows(model: nn.Module, on_rows: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_rows(n)`` after every forward pass of ``model`` over ``n`` rows.

    A module that takes no hooks (TorchScript) is run unhooked: its bars move per batch only.
    """
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        first = args[0] if args else None
        on_rows(int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else 1)

    try:
        handle = model.register_forward_hook(hook)
    except (RuntimeError, AttributeError, TypeError):  # ScriptModules refuse Python hooks
        yield
        return
    try:
        yield
    finally:
        handle.remove()
