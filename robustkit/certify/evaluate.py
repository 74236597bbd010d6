"""Certified accuracy over an ε sweep: the lower end of the bracket certified ≤ true robust
accuracy ≤ attacked (the attacks give the upper end).

For each bound method and each swept ε the margins' lower bounds are computed on every sample
(:func:`~robustkit.certify.bounds.step_bounds`). Then, per sample:

* **Nesting.** The ε-balls nest (``B(ε') ⊂ B(ε)`` for ``ε' < ε``), so a certificate at ε is one
  at every smaller ε: a sample counts as certified at every ε up to the largest one at which it
  was certified. (IBP's bounds are monotone in ε by themselves; CROWN's need not be, since its
  ReLU relaxation changes with the box, so without this rule its curve could rise.)
* **Certified radius** ``r``: the largest ε with a certificate, found by bisection inside the
  bracket of the sweep: with ``ε_k`` the largest swept ε certified and ``ε_{k+1}`` the next one
  (``0`` and the smallest ε when none is), bisect until ``ε_hi − ε_lo ≤ tolerance`` and keep
  ``ε_lo``, a value at which the bound did certify (``ε_hi`` is one at which it did not). A
  sample certified at the largest swept ε keeps that ε (``r`` is at least it); a
  clean-misclassified sample has no radius (NaN) and is never certified.
* **Best.** The better of the methods run: ``r_best = max_method r_method``.

The per-ε table is then read off the radii: certified at ε ⇔ ``r ≥ ε``, with its 95% Wilson
interval. ``width`` is how far the bounds fall below the clean margins, per sample
``mean_j (m_j(x) − m̲_j)`` (0 for an exact bound; a looser bound is wider), summarised by its
mean and median over the samples; ``seconds`` is the time of the bounds at that ε (the
bisection's is kept per method in :attr:`Certification.bisection_seconds`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from robustkit.certify.bounds import (
    BoundNorm,
    Method,
    check_norm,
    network_steps,
    specification,
    step_bounds,
)
from robustkit.data import Split
from robustkit.evaluation import wilson_interval

#: The ``method`` of the rows and the column of the better of the methods run, per sample.
BEST = "best"
#: The columns of a certification table, one row per (method, ε), the ``best`` rows last.
CERTIFY_COLUMNS = ["method", "norm", "eps", "n", "certified", "accuracy", "ci_low", "ci_high",
                   "width_mean", "width_median", "seconds"]
#: Bisection stops when the bracket of the certified radius is this narrow (in ε units).
TOLERANCE = 1e-3


@dataclass(frozen=True)
class Certification:
    """The outcome of :func:`certify_sweep`.

    ``table``: :data:`CERTIFY_COLUMNS`, one row per (method, ε) and the ``best`` rows (when
    several methods ran). ``per_sample``: ``index``, ``label``, ``clean_pred`` and one column
    ``<method>_eps`` per method plus ``best_eps``: the certified radius (NaN for a
    clean-misclassified sample). ``bisection_seconds``: the bisection's time per method.
    """

    norm: BoundNorm
    eps: tuple[float, ...]
    methods: tuple[Method, ...]
    tolerance: float
    table: pd.DataFrame
    per_sample: pd.DataFrame
    bisection_seconds: dict[str, float]

    def radius(self, method: str = BEST) -> np.ndarray[Any, np.dtype[np.float64]]:
        """Per sample: the certified radius by ``method`` (or the best), NaN where none."""
        column = f"{method}_eps"
        if column not in self.per_sample:
            raise KeyError(f"no certified radius for {method!r}: ran {', '.join(self.methods)}")
        return self.per_sample[column].to_numpy(float)

    def certified_at(self, eps: float, method: str = BEST) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Per sample: certified at ``eps`` (its radius is at least ``eps``)."""
        radius = self.radius(method)
        return np.where(np.isnan(radius), False, radius >= eps)

    def to_json(self) -> dict[str, Any]:
        """The whole result as plain JSON values (NaN as null): what ``certify --json``
        prints."""
        def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
            clean = frame.astype(object).where(frame.notna(), None)
            return [{str(k): _plain(v) for k, v in row.items()} for row in clean.to_dict("records")]

        return {"norm": self.norm, "eps": list(self.eps), "methods": list(self.methods),
                "tolerance": self.tolerance, "table": records(self.table),
                "per_sample": records(self.per_sample),
                "bisection_seconds": dict(self.bisection_seconds)}


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value JSON writes."""
    return value.item() if isinstance(value, np.generic) else value


# ------------------------------------------------------------------------------ the bounds


def _margins(steps: Sequence[nn.Module], x: Tensor, y: Tensor) -> Tensor:
    """The margins ``z_y − z_j`` (``j ≠ y``) at ``x``, in float64 as the bounds compute."""
    h = x.double()
    for step in steps:
        h = step(h)
    spec = specification(h.shape[1], y.to(h.device))
    return (spec @ h.unsqueeze(2)).squeeze(2)


def _bound_all(steps: Sequence[nn.Module], split: Split, eps: Tensor, method: Method,
               norm: BoundNorm, batch_size: int) -> tuple[Tensor, Tensor]:
    """Per sample, at radius ``eps`` ``[N]``: (certified by the bounds, width
    ``mean_j (m_j(x) − m̲_j)``)."""
    certified, widths = [], []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            x = split.images[start:start + batch_size]
            y = split.labels[start:start + batch_size]
            bounds = step_bounds(steps, x, y, eps[start:start + batch_size], method, norm)
            certified.append(bounds.certified.cpu())
            widths.append((_margins(steps, x, y) - bounds.margins).mean(1).cpu())
    return torch.cat(certified), torch.cat(widths)


def _clean_predictions(model: nn.Module, split: Split, batch_size: int) -> Tensor:
    """The model's own predictions (as the attacks judge them), on the CPU."""
    with torch.no_grad():
        return torch.cat([model(split.images[i:i + batch_size]).argmax(1).cpu()
                          for i in range(0, len(split), batch_size)])


# ---------------------------------------------------------------------- radius by bisection


def grid_radius(certified: dict[float, Tensor], correct: Tensor) -> Tensor:
    """Per sample: the largest swept ε > 0 at which it is certified, 0 for a correct sample
    certified at none, NaN for a misclassified one."""
    radius = torch.where(correct, 0.0, math.nan).double()
    for eps in sorted(certified):
        radius = torch.where(certified[eps] & correct, eps, radius)
    return radius


def bracket_above(radius: Tensor, eps: Sequence[float]) -> Tensor:
    """Per sample: the smallest swept ε above its radius (inf above the largest; NaN where
    the radius is NaN)."""
    above = torch.full_like(radius, math.inf)
    for e in sorted(eps, reverse=True):
        above = torch.where(radius < e, e, above)
    return torch.where(radius.isnan(), math.nan, above)


def bisect_radius(certifies: Any, low: Tensor, high: Tensor, tolerance: float) -> Tensor:
    """Per sample: the largest ε in ``[low, high)`` found certified by bisection, where
    ``low`` is certified (or 0) and ``high`` is not: each round tests the midpoint of the
    brackets still wider than ``tolerance`` (``certifies(active, eps) -> [len(active)]``) and
    keeps the half whose ends differ. Samples with a NaN or infinite ``high`` keep ``low``."""
    low, high = low.clone(), high.clone()
    while True:
        active = torch.nonzero(high.isfinite() & (high - low > tolerance)).flatten()
        if len(active) == 0:
            return low
        middle = (low[active] + high[active]) / 2
        passed = certifies(active, middle)
        low[active] = torch.where(passed, middle, low[active])
        high[active] = torch.where(passed, high[active], middle)


# ---------------------------------------------------------------------------- the sweep


def _rows(method: str, norm: BoundNorm, eps: Sequence[float], radius: Tensor,
          widths: dict[float, Tensor], seconds: dict[float, float]) -> list[dict[str, Any]]:
    """One table row per ε, read off the per-sample radii."""
    rows = []
    n = len(radius)
    for e in eps:
        count = int((radius >= e).sum())  # NaN compares False: never certified
        low, high = wilson_interval(count, n)
        width = widths[e]
        rows.append({"method": method, "norm": norm, "eps": e, "n": n, "certified": count,
                     "accuracy": count / n if n else math.nan, "ci_low": low, "ci_high": high,
                     "width_mean": float(width.mean()) if n else math.nan,
                     "width_median": float(width.median()) if n else math.nan,
                     "seconds": seconds[e]})
    return rows


@dataclass
class _MethodOutcome:
    radius: Tensor
    widths: dict[float, Tensor]
    seconds: dict[float, float]
    bisection: float


def _certify_method(steps: Sequence[nn.Module], split: Split, eps: Sequence[float],
                    correct: Tensor, method: Method, norm: BoundNorm, tolerance: float,
                    batch_size: int) -> _MethodOutcome:
    """One method over the sweep: bounds at every ε, then the radius by bisection."""
    n = len(split)
    certified: dict[float, Tensor] = {}
    widths: dict[float, Tensor] = {0.0: torch.zeros(n, dtype=torch.float64)}
    seconds: dict[float, float] = {0.0: 0.0}
    for e in (v for v in eps if v > 0):
        started = time.perf_counter()
        certified[e], widths[e] = _bound_all(steps, split, torch.full((n,), e,
                                             dtype=torch.float64), method, norm, batch_size)
        seconds[e] = time.perf_counter() - started
    started = time.perf_counter()
    low = grid_radius(certified, correct)
    high = bracket_above(low, list(certified))

    def certifies(active: Tensor, middle: Tensor) -> Tensor:
        part = Split(split.images[active.to(split.images.device)],
                     split.labels[active.to(split.labels.device)])
        return _bound_all(steps, part, middle, method, norm, batch_size)[0] & correct[active]

    radius = bisect_radius(certifies, low, high, tolerance)
    return _MethodOutcome(radius, widths, seconds, time.perf_counter() - started)


def certify_sweep(model: nn.Module, split: Split, eps: Sequence[float],
                  methods: Sequence[Method], batch_size: int = 100, norm: str = "linf",
                  tolerance: float = TOLERANCE) -> Certification:
    """Certified accuracy of ``model`` on ``split`` at every ε of ``norm`` and by every method
    (with its 95% Wilson interval, bound widths and time), each sample's certified radius by
    bisection to ``tolerance``, and the better of the methods per sample (see the module
    docstring). ε = 0 is clean accuracy."""
    bound_norm = check_norm(norm)
    grid = sorted({0.0, *(float(v) for v in eps)})
    steps = network_steps(model)
    clean = _clean_predictions(model, split, batch_size)
    correct = clean == split.labels.cpu()
    outcomes = {m: _certify_method(steps, split, grid, correct, m, bound_norm, tolerance,
                                   batch_size) for m in dict.fromkeys(methods)}
    rows = [row for m, o in outcomes.items()
            for row in _rows(m, bound_norm, _swept(eps, grid), o.radius, o.widths, o.seconds)]
    best = torch.stack([o.radius for o in outcomes.values()]).amax(0)
    if len(outcomes) > 1:
        widths = {e: torch.stack([o.widths[e] for o in outcomes.values()]).amin(0) for e in grid}
        seconds = {e: sum(o.seconds[e] for o in outcomes.values()) for e in grid}
        rows += _rows(BEST, bound_norm, _swept(eps, grid), best, widths, seconds)
    per_sample = pd.DataFrame({"index": np.arange(len(split)),
                               "label": split.labels.cpu().numpy(),
                               "clean_pred": clean.numpy()}
                              | {f"{m}_eps": o.radius.numpy() for m, o in outcomes.items()}
                              | {f"{BEST}_eps": best.numpy()})
    return Certification(bound_norm, tuple(_swept(eps, grid)), tuple(outcomes), tolerance,
                         pd.DataFrame(rows, columns=CERTIFY_COLUMNS), per_sample,
                         {m: o.bisection for m, o in outcomes.items()})


def _swept(eps: Sequence[float], grid: Sequence[float]) -> list[float]:
    """The ε the caller asked for, ascending (the grid without the 0 it adds for itself)."""
    asked = {float(v) for v in eps}
    return [e for e in grid if e in asked]
