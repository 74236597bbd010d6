"""Attack budgets in pixel units: the ε each norm allows and PGD's default step.

Images are in [0, 1], so an L∞ budget above 1 (the box's width), an L2 budget above √d (its
diameter, d = values per image) or an L1 budget above d (its L1 diameter) allows nothing more.
This module imports nothing of robustkit (nor torch), so the config can check its ε before any
data is loaded, and the attacks, the sweep and the command line share the one rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from torch import Tensor

#: PGD's default step is this many ε per ``steps`` steps: ``α = 2.5·ε/steps``.
STEP_FACTOR = 2.5


def eps_bound(norm: str, pixels: int | None = None) -> float:
    """The largest meaningful ε in ``norm``: 1 in L∞, √d in L2 and d in L1 for images of
    ``pixels`` = d values (∞ while d is not known, such as before the data is loaded)."""
    if norm == "linf":
        return 1.0
    if pixels is None:
        return math.inf
    return float(pixels) if norm == "l1" else math.sqrt(pixels)


def sweep_eps_bound(norms: Iterable[str], pixels: int | None = None) -> float:
    """The largest ε a sweep whose attacks use ``norms`` may list: the loosest norm's bound
    (1 with no attack); each attack is held to its own bound when it runs."""
    return max((eps_bound(norm, pixels) for norm in norms), default=eps_bound("linf"))


@overload
def default_step_size(eps: float, steps: int) -> float: ...


@overload
def default_step_size(eps: Tensor, steps: int) -> Tensor: ...


def default_step_size(eps: float | Tensor, steps: int) -> float | Tensor:
    """PGD's step when none is given: ``α = 2.5·ε/steps`` (one ε, or a tensor of them)."""
    return STEP_FACTOR * eps / steps
