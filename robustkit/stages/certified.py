"""Certified bounds as a stage: the lower end of the bracket
certified ≤ true robust accuracy ≤ attacked.

For every method asked for and every ε of the sweep, :func:`robustkit.certify.evaluate.
certify_sweep` says per sample whether its margins are provably positive over the whole ε-ball
(of the attacks' norm, L∞ or L2) clipped to [0, 1] (ε = 0: correctly classified), and bisects
each sample's certified radius. The stage writes

* ``certified.csv``: per method and ε, the certified count, accuracy and its 95% Wilson
  interval, the bounds' width and the seconds they took; with several methods also ``best``,
  a sample counting as certified when any method certifies it (every method's bound is sound,
  so the best of them is too);
* ``per_sample.csv`` gains ``certified_eps``, the sample's certified radius by the best method
  (bisected to 1e-3 between the swept ε; empty for a clean-misclassified sample);
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
from torch import nn

from robustkit.certify.bounds import network_steps
from robustkit.certify.evaluate import certify_sweep
from robustkit.checks import Check
from robustkit.checks.record import checks_frame
from robustkit.errors import RobustkitError
from robustkit.results import ANY, UNRELIABLE_COLUMN
from robustkit.runs import write_frame
from robustkit.stages.base import SweepDone
from robustkit.stages.checks import discredit
from robustkit.vocabulary import CertifyMethod

#: The check this stage adds.
CHECK_NAME = "certified_not_broken"


@dataclass(frozen=True)
class CertifiedBounds:
    """Certified accuracy by each of ``methods`` at every ε of the sweep, in ``norm`` (the
    attacks'), with each sample's certified radius (nothing without methods)."""

    methods: tuple[CertifyMethod, ...]
    norm: str = "linf"
    title: str = "the certified bounds"

    def run(self, done: SweepDone) -> SweepDone:
        if not self.methods:
            return done
        started = time.perf_counter()
        eps = sorted({float(e) for e in done.settings["eps"]})
        certification = certify_sweep(done.model, done.split, eps, self.methods,
                                      batch_size=min(done.batch_size, 100), norm=self.norm)
        table = certification.table.copy()
        radius = certification.radius()  # the best of the methods, per sample
        check = check_certified_not_broken(radius, done.evaluation.per_sample)
        checks = pd.concat([frame for frame in (done.checks, checks_frame([check]))
                            if frame is not None and len(frame)], ignore_index=True)
        if check.status == "fail":
            table[UNRELIABLE_COLUMN] = np.where(table["eps"] > 0, check.detail, "")
        per_sample = done.evaluation.per_sample.assign(certified_eps=radius)
        write_frame(done.folder / "certified.csv", table)
        write_frame(done.folder / "per_sample.csv", per_sample)
        write_frame(done.folder / "checks.csv", checks)
        done.log(f"certified bounds ({', '.join(self.methods)}, {self.norm}, "
                 f"{time.perf_counter() - started:.1f} s) written to "
                 f"{done.shown / 'certified.csv'}")
        evaluation = dataclasses.replace(done.evaluation, per_sample=per_sample)
        return discredit(done.with_(evaluation=evaluation, checks=checks, certified=table))


def check_certifiable(model: nn.Module, methods: Sequence[str], option: str = "--certify"
                      ) -> None:
    """Before any work: one error naming the first layer the bounds do not cover, or max
    pooling under a CROWN method (IBP alone bounds it); ``option`` is the flag that chose the
    methods."""
    steps = network_steps(model)
    if any(isinstance(step, nn.MaxPool2d) for step in steps) and set(methods) - {"ibp"}:
        raise RobustkitError(f"CROWN does not cover MaxPool2d: certify this model with IBP "
                             f"alone ({option} ibp), or pool with AvgPool2d or a strided "
                             "convolution")


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
    attack (``any_eps``) must lie above its certified radius (``certified_eps``, NaN for a
    misclassified sample). Any violation fails: the bounds or the attack is wrong, so neither
    number can be trusted."""
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
