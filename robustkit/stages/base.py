"""The stage interface: the work that follows an evaluation's sweep.

A sweep ends with results, per-sample worst cases and examples in a folder. What comes after
(the sanity checks, the example pictures' probabilities, a paper's reference figure, robustness
under transformation, certified bounds) is a **stage**: an object with a ``title`` and a
``run(done) -> done`` that reads the :class:`SweepDone` record, writes its own files into
``done.folder`` and returns the record, with the checks or the evaluation changed where the stage
changes them (the checks flag unreliable numbers). Its report section is read from those files
by :mod:`robustkit.reporting`. The jobs (:mod:`robustkit.jobs`) build the list of stages from
the settings and run them in order, on rank 0 only, through :func:`run_stages`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pandas as pd
from torch import nn

from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.evaluation import Evaluation

_T = TypeVar("_T")


@dataclass(frozen=True)
class SweepDone:
    """Everything a stage may read: the model and the split it was evaluated on, the sweep
    (``evaluation``), the checks so far (None until the checks stage has run, or when the level
    is off), the settings the numbers depend on, the folder to write (``folder``, perhaps a
    staging folder; ``shown`` is the folder it becomes, for messages), the evaluation's seed
    and batch size, whether to show progress, and where to log; ``certified``, the certified
    bounds once that stage has run (``certified.csv``)."""

    model: nn.Module
    split: Split
    evaluation: Evaluation
    checks: pd.DataFrame | None
    settings: dict[str, Any]
    folder: Path
    shown: Path
    seed: int
    batch_size: int
    progress: bool
    log: Callable[[str], None]
    certified: pd.DataFrame | None = None

    def with_(self, **changes: Any) -> SweepDone:
        """This record with ``changes`` (the evaluation, the checks)."""
        return dataclasses.replace(self, **changes)


class Stage(Protocol):
    """One piece of post-sweep work (see the module docstring)."""

    @property
    def title(self) -> str:
        """What the stage does, as messages name it: ``the sanity checks``."""

    def run(self, done: SweepDone) -> SweepDone:
        """Do the work, write its files into ``done.folder``, return the record."""


def run_stages(stages: Sequence[Stage], done: SweepDone, model: str) -> SweepDone:
    """Run ``stages`` in order, each on the record the one before returned. An error that is
    not robustkit's own, the disk's or memory's is ``model`` (the user's model, as they named
    it) failing during that stage, reported as one line (:func:`as_model_failure`)."""
    for stage in stages:
        done = as_model_failure(model, stage.title, done.folder,
                                functools.partial(stage.run, done))
    return done


def as_model_failure(model: str, during: str, work: Path, run: Callable[[], _T]) -> _T:
    """Run ``run``; any error but robustkit's own, the disk's or memory's is the user's model
    failing on some batch or its gradient ``during`` a step, reported as such (the finished
    cells stay in ``work``, so the same command resumes)."""
    try:
        return run()
    except (RobustkitError, OSError, MemoryError):
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RobustkitError(
            f"the model {model} failed during {during} ({type(exc).__name__}: {first}); "
            f"finished (attack, ε) cells are kept in {work}: fix the model and run the same "
            "command again"
        ) from None
