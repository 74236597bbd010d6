"""Certified bounds as a stage: the lower end of the bracket
certified ≤ true robust accuracy ≤ attacked.

For every method asked for and every ε of the sweep, :func:`robustkit.certify.bounds.
certified_accuracy` says per sample whether its margins are provably positive over the whole
ε-ball clipped to [0, 1] (ε = 0: correctly classified). The stage writes

* ``certified.csv``: per method and ε, the certified count, accuracy and its 95% Wilson
  interval, and the seconds the bounds took; with several methods also ``best``, a sample
  counting as certified when any method certifies it (every method's bound is sound, so the
  best of them is too);
* ``per_sample.csv`` gains ``certified_eps``, the largest swept ε at which ``best`` certifies
  the sample (empty for a clean-misclassified one);
* the check ``certified_not_broken`` in ``checks.csv``: no sample certified at ε may be broken
  by any attack at ε (its smallest breaking ε, ``any_eps``, at most ε). A violation is a bug in
  the bounds or in the attack; it fails, names the samples, and every number of the run (the
  attacks' and the certified ones) is marked unreliable.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from robustkit.certify.bounds import certified_accuracy, network_steps
from robustkit.checks import Check
from robustkit.checks.record import checks_frame
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.evaluation import wilson_interval
from robustkit.results import ANY, UNRELIABLE_COLUMN
from robustkit.runs import write_frame
from robustkit.stages.base import SweepDone
from robustkit.stages.checks import discredit
from robustkit.vocabulary import CertifyMethod

#: The columns of ``certified.csv``, one row per (method, ε).
CERTIFIED_COLUMNS = ["method", "eps", "n", "certified", "accuracy", "ci_low", "ci_high",
                     "seconds"]
#: The method name of the per-sample best of several methods.
BEST = "best"
#: The check this stage adds.
CHECK_NAME = "certified_not_broken"


@dataclass(frozen=True)
class CertifiedBounds:
    """Certified accuracy by each of ``methods`` at every ε of the sweep (nothing without
    methods)."""

    methods: tuple[CertifyMethod, ...]
    title: str = "the certified bounds"

    def run(self, done: SweepDone) -> SweepDone:
        if not self.methods:
            return done
        started = time.perf_counter()
        eps = sorted({float(e) for e in done.settings["eps"]})
        flags, seconds = certified_flags(done.model, done.split, eps, self.methods,
                                         batch_size=min(done.batch_size, 100))
        table = certified_table(flags, seconds, len(done.split))
        largest = largest_certified(flags[BEST] if BEST in flags else flags[self.methods[0]],
                                    eps)
        check = check_certified_not_broken(largest, done.evaluation.per_sample)
        checks = pd.concat([frame for frame in (done.checks, checks_frame([check]))
                            if frame is not None and len(frame)], ignore_index=True)
        if check.status == "fail":
            table[UNRELIABLE_COLUMN] = np.where(table["eps"] > 0, check.detail, "")
        per_sample = done.evaluation.per_sample.assign(certified_eps=largest)
        write_frame(done.folder / "certified.csv", table)
        write_frame(done.folder / "per_sample.csv", per_sample)
        write_frame(done.folder / "checks.csv", checks)
        done.log(f"certified bounds ({', '.join(self.methods)}, "
                 f"{time.perf_counter() - started:.1f} s) written to "
                 f"{done.shown / 'certified.csv'}")
        evaluation = dataclasses.replace(done.evaluation, per_sample=per_sample)
        return discredit(done.with_(evaluation=evaluation, checks=checks, certified=table))


def check_certifiable(model: nn.Module, methods: Sequence[CertifyMethod]) -> None:
    """Before any work: one error naming the first layer the bounds do not cover, or max
    pooling under a CROWN method (IBP alone bounds it)."""
    steps = network_steps(model)
    if any(isinstance(step, nn.MaxPool2d) for step in steps) and set(methods) - {"ibp"}:
        raise RobustkitError("CROWN does not cover MaxPool2d: certify this model with IBP "
                             "alone (--certify ibp), or pool with AvgPool2d or a strided "
                             "convolution")


def certified_flags(model: nn.Module, split: Split, eps: Sequence[float],
                    methods: Sequence[CertifyMethod], batch_size: int
                    ) -> tuple[dict[str, dict[float, Tensor]], dict[str, dict[float, float]]]:
    """Per method (and ``best`` with several) and ε: which samples are certified ``[N]``, and
    the seconds each took. ε = 0 is clean accuracy, the same for every method."""
    x, y = split.images, split.labels
    with torch.no_grad():
        correct = torch.cat([model(x[i:i + batch_size]).argmax(1).cpu()
                             for i in range(0, len(x), batch_size)]) == y.cpu()
    flags: dict[str, dict[float, Tensor]] = {}
    seconds: dict[str, dict[float, float]] = {}
    for method in methods:
        flags[method], seconds[method] = {}, {}
        for e in eps:
            started = time.perf_counter()
            flags[method][e] = correct if e == 0 else certified_accuracy(
                model, x, y, e, method, batch_size) & correct
            seconds[method][e] = time.perf_counter() - started
    if len(methods) > 1:
        flags[BEST] = {e: torch.stack([flags[m][e] for m in methods]).any(0) for e in eps}
        seconds[BEST] = {e: sum(seconds[m][e] for m in methods) for e in eps}
    return flags, seconds


def certified_table(flags: dict[str, dict[float, Tensor]],
                    seconds: dict[str, dict[float, float]], n: int) -> pd.DataFrame:
    """``certified.csv``: one row per method and ε with the Wilson interval."""
    rows = []
    for method, by_eps in flags.items():
        for e, certified in by_eps.items():
            count = int(certified.sum())
            low, high = wilson_interval(count, n)
            rows.append({"method": method, "eps": e, "n": n, "certified": count,
                         "accuracy": count / n, "ci_low": low, "ci_high": high,
                         "seconds": seconds[method][e]})
    return pd.DataFrame(rows, columns=CERTIFIED_COLUMNS)


def largest_certified(flags: dict[float, Tensor], eps: Sequence[float]) -> np.ndarray:
    """Per sample the largest ε of ``eps`` it is certified at (NaN when not even at 0: the
    sample is misclassified)."""
    largest = np.full(len(next(iter(flags.values()))), np.nan)
    for e in sorted(eps):
        largest[flags[e].numpy()] = e
    return largest


def smallest_breaking_eps(per_sample: pd.DataFrame) -> np.ndarray:
    """Per sample the smallest ε at which any attack broke it (``inf``: none did): the
    ``any_eps`` column, or the one attack's ``<attack>_eps`` when a single attack ran."""
    if f"{ANY}_eps" in per_sample:
        return per_sample[f"{ANY}_eps"].to_numpy(dtype=float)
    columns = [c for c in per_sample.columns if c.endswith("_eps") and c != "certified_eps"]
    smallest: np.ndarray = per_sample[columns].to_numpy(dtype=float).min(axis=1)
    return smallest


def check_certified_not_broken(certified_eps: np.ndarray, per_sample: pd.DataFrame) -> Check:
    """No sample certified at ε is broken at ε: a sample's smallest breaking ε over every
    attack (``any_eps``) must lie above the largest ε it is certified at. Any violation
    fails: the bounds or the attack is wrong, so neither number can be trusted."""
    broken_at = smallest_breaking_eps(per_sample)
    certified = np.nan_to_num(certified_eps, nan=-1.0)
    violated = np.flatnonzero((certified > 0) & (broken_at <= certified))
    count = len(violated)
    if count:
        named = ", ".join(str(int(per_sample["index"].iloc[i])) for i in violated[:10])
        detail = (f"{count} sample(s) certified at an ε where an attack broke them (test "
                  f"images {named}{', …' if count > 10 else ''}): a bound or an attack is "
                  "wrong, so neither the certified nor the attacked numbers can be trusted")
    else:
        detail = (f"none of the {int((certified > 0).sum())} samples certified at some ε > 0 "
                  "was broken by an attack at that ε")
    return Check(CHECK_NAME, "fail" if count else "pass", float(count), "0 samples",
                 detail, {"violations": float(count)})
