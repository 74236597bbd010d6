"""The results table (``results.csv``, ``Evaluation.results``): its rows and columns.

One row per (model, attack, ε). With two or more attacks the sweep adds the rows of
:data:`ANY`, the per-sample worst case over them; a sweep with a targeted attack appends the
column :data:`TARGET_HIT`, and an evaluation whose checks failed the column
:data:`UNRELIABLE_COLUMN`. This module imports nothing of robustkit (nor torch), so the config,
which reserves the name :data:`ANY`, can use it as well as the engine, the checks and the reports.
"""

from __future__ import annotations

import typing
from typing import NamedTuple

#: The attack name of the per-sample worst case over all attacks of a sweep: a sample is broken
#: at ε when any attack broke it at some ε' ≤ ε. No attack label may take this name.
ANY = "any"
#: The extra results column of sweeps with a targeted attack: the fraction of all n samples whose
#: kept adversarial example is classified as the target (empty for untargeted rows).
TARGET_HIT = "target_hit"
#: The extra results column of an evaluation whose checks failed: per row, why its robust
#: accuracy is unreliable (the failed checks), empty where the row is not discredited.
UNRELIABLE_COLUMN = "unreliable"


class ResultRow(NamedTuple):
    """One row of ``results.csv``: ``correct`` of the ``n`` samples are not broken by ``attack``
    (in ``norm``) at any ε' ≤ ``eps``; ``accuracy = correct / n`` with its 95% Wilson score
    interval ``[ci_low, ci_high]``; ``grad_evals`` gradient evaluations were spent at ``eps``."""

    model: str
    attack: str
    norm: str
    eps: float
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    grad_evals: int


#: The columns of ``results.csv``, in order (before :data:`TARGET_HIT`).
RESULT_COLUMNS: list[str] = list(ResultRow._fields)


def result_types() -> dict[str, type]:
    """Each results column → the Python type of its values (for documents such as ``--json``)."""
    return typing.get_type_hints(ResultRow)
