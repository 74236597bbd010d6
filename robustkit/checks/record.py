"""The record every check returns, and the one rule that turns a measurement into a status."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pandas as pd

from robustkit.vocabulary import STATUSES, Status

#: The columns of ``checks.csv`` (and of :func:`checks_frame`); ``measurements`` is not one.
CHECK_COLUMNS = ["name", "status", "value", "threshold", "detail"]


@dataclass(frozen=True)
class Check:
    """The outcome of one sanity check.

    ``value`` is the number graded against ``threshold``; ``detail`` explains the outcome to a
    person. ``measurements`` holds the numbers behind both by name (accuracies, counts, ε), for
    code that needs them: they are not written to ``checks.csv``.
    """

    name: str
    status: Status
    value: float | None
    threshold: str
    detail: str
    measurements: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def grade(value: float, warn_above: float, fail_above: float, *,
          fail_at_limit: bool = False) -> Status:
    """``pass`` up to ``warn_above``, ``warn`` up to ``fail_above``, ``fail`` beyond it (and at
    it when ``fail_at_limit``). A NaN value passes: checks whose measurement can be NaN decide
    that case themselves."""
    if value > fail_above or (fail_at_limit and value >= fail_above):
        return "fail"
    if value > warn_above:
        return "warn"
    return "pass"


def checks_frame(checks: Iterable[Check]) -> pd.DataFrame:
    """Checks as a frame with the columns of ``checks.csv``: name, status, value, threshold,
    detail."""
    rows = [{column: getattr(check, column) for column in CHECK_COLUMNS} for check in checks]
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


def worst_status(frame: pd.DataFrame) -> Status:
    """The worst status of a checks frame: fail > warn > pass."""
    statuses = set(frame["status"]) if len(frame) else set()
    if "fail" in statuses:
        return "fail"
    return "warn" if "warn" in statuses else "pass"
