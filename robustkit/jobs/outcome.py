"""What a job reports about one evaluated model, for the terminal and ``--json``
(:mod:`robustkit.terminal`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from robustkit.evaluation import Evaluation
from robustkit.vocabulary import ChecksLevel


@dataclass(frozen=True)
class SweepOutcome:
    """One model's sweep after its stages: the evaluation (results flagged where a failed
    check discredits them), the checks (None when none ran, or on ranks other than 0), the
    level they ran at, which attacks' numbers are unreliable and why (title → reason), and
    how to name what was evaluated (``caption``: "robust accuracy of mnist_cnn on 100 mnist
    test images"); ``certified``, the certified bounds when they were asked for."""

    evaluation: Evaluation
    checks: pd.DataFrame | None
    level: ChecksLevel
    unreliable: dict[str, str] | None
    caption: str
    certified: pd.DataFrame | None = None


@dataclass(frozen=True)
class AttackOutcome:
    """What ``robustkit attack`` produced: the sweep and its checks, the warnings printed, the
    files written (kind → path), the settings and the model's name."""

    sweep: SweepOutcome
    warnings: list[str]
    outputs: dict[str, str]
    settings: dict[str, Any]
    model: str

    @property
    def evaluation(self) -> Evaluation:
        return self.sweep.evaluation

    @property
    def checks(self) -> pd.DataFrame | None:
        return self.sweep.checks

    @property
    def checks_level(self) -> ChecksLevel:
        return self.sweep.level
