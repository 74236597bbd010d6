"""The check that holds the two ends of the bracket to each other: certified ≤ attacked.

A certificate at ε says no input of the ε-ball changes the prediction; an attack that broke the
sample at ε found one that does. Both cannot be true, so a sample that is both means a bug in
the bounds (too loose in the wrong direction: a lower bound above the true minimum) or in the
attack (an example outside the ball or the pixel range, or misjudged), and neither number can
be trusted until it is found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from robustkit.checks.record import Check, grade
from robustkit.errors import RobustkitError

#: The check's name (a post-sweep stage runs it, not :func:`~robustkit.checks.run_checks`).
CERTIFIED_CONSISTENT = "certified_consistent"
#: Where the check is explained, as its detail names it.
DOC = "docs/checks.md#certified_consistent"
#: How many offending samples the detail names.
SHOWN = 10

Flags = Sequence[bool] | np.ndarray[Any, np.dtype[np.bool_]]


def broken_at(per_sample: pd.DataFrame, eps: float, column: str = "any_eps"
              ) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Per sample: broken by an attack at ``eps``, read from an evaluation's per-sample table
    (``column``: the smallest breaking ε, inf where none; clean-misclassified samples count as
    broken at every ε)."""
    if column not in per_sample:
        raise RobustkitError(f"the per-sample table has no column {column!r}: pass the "
                             "smallest-breaking-ε column of the attack to compare with")
    smallest = per_sample[column].to_numpy(float)
    return np.asarray(smallest <= eps)


def _flags(values: Flags, n: int | None, what: str) -> np.ndarray[Any, np.dtype[np.bool_]]:
    array = np.asarray(values, dtype=bool).reshape(-1)
    if n is not None and len(array) != n:
        raise RobustkitError(f"{what} holds {len(array)} flags where {n} samples were expected: "
                             "give one flag per sample, in the same order")
    return array


def check_certified_consistent(certified: Mapping[float, Flags], broken: Mapping[float, Flags],
                               index: Sequence[int] | None = None) -> Check:
    """No sample certified at ε may be broken by any attack at ε.

    ``certified`` and ``broken`` map each ε to per-sample flags (in the same sample order;
    ``index`` names the samples, default 0, 1, …); the ε present in both are compared. Value:
    the number of samples certified and broken at some common ε; any fails, naming them (the
    first :data:`SHOWN`) and saying that the certified and the attacked accuracy are both
    unreliable.
    """
    common = sorted(set(certified) & set(broken))
    threshold = "certified and broken = 0 (fail > 0)"
    if not common:
        return Check(CERTIFIED_CONSISTENT, "pass", None, threshold,
                     "no ε both certified and attacked to compare")
    n = len(index) if index is not None else None
    both: dict[float, np.ndarray[Any, np.dtype[np.bool_]]] = {}
    for eps in common:
        cert = _flags(certified[eps], n, f"certified at ε={eps:g}")
        n = len(cert)
        both[eps] = cert & _flags(broken[eps], n, f"broken at ε={eps:g}")
    names = np.asarray(index if index is not None else np.arange(n or 0))
    offending = np.flatnonzero(np.any(np.stack(list(both.values())), axis=0))
    pairs = int(sum(int(flags.sum()) for flags in both.values()))
    certified_pairs = int(sum(int(_flags(certified[e], n, "").sum()) for e in common))
    measurements = {"samples": float(len(offending)), "pairs": float(pairs),
                    "certified_pairs": float(certified_pairs), "eps_compared": float(len(common))}
    status = grade(float(len(offending)), 0.0, 0.0)
    if status == "pass":
        return Check(CERTIFIED_CONSISTENT, status, 0.0, threshold,
                     f"none of the {certified_pairs} certified (sample, ε) pairs at "
                     f"ε = {', '.join(f'{e:g}' for e in common)} was broken by an attack",
                     measurements)
    shown = [f"#{names[i]} (ε={min(e for e in common if both[e][i]):g})"
             for i in offending[:SHOWN]]
    more = f" and {len(offending) - SHOWN} more" if len(offending) > SHOWN else ""
    return Check(CERTIFIED_CONSISTENT, status, float(len(offending)), threshold,
                 f"{len(offending)} samples certified and yet broken by an attack: "
                 f"{', '.join(shown)}{more}; a bug in the bounds or in the attack, so both the "
                 f"certified and the attacked accuracy are unreliable (see {DOC})",
                 measurements)
