"""The sanity checks as a stage: ``checks.csv``, and the numbers a failed check discredits
flagged in ``results.csv`` (:func:`robustkit.checks.flag_results`)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from robustkit.checks import flag_results, run_checks
from robustkit.runs import load_checks, save_check, settings_fingerprint, write_frame
from robustkit.stages.base import SweepDone
from robustkit.vocabulary import ChecksLevel


@dataclass(frozen=True)
class SanityChecks:
    """Every check at ``level`` (``quick`` or ``full``; ``off`` runs nothing). Each finished
    check is kept in the folder's sweep state as it ends, so an interrupted job resumes from
    it."""

    level: ChecksLevel
    title: str = "the sanity checks"

    def run(self, done: SweepDone) -> SweepDone:
        if self.level == "off":
            return done
        started = time.perf_counter()
        fingerprint = settings_fingerprint(done.settings)
        checks = run_checks(
            done.model, done.split, done.evaluation.results, done.settings, seed=done.seed,
            progress=done.progress, level=self.level, per_sample=done.evaluation.per_sample,
            done=load_checks(done.folder, fingerprint, self.level),
            on_check=lambda check: save_check(done.folder, fingerprint, self.level, check))
        write_frame(done.folder / "checks.csv", checks)
        done.log(f"sanity checks ({self.level}, {time.perf_counter() - started:.1f} s) written "
                 f"to {done.shown / 'checks.csv'}")
        return discredit(done.with_(checks=checks))


def discredit(done: SweepDone) -> SweepDone:
    """The record with its results flagged where failed checks discredit them, and
    ``results.csv`` rewritten to match; unchanged when nothing is discredited (so the results
    of an evaluation that passed keep their columns and bytes)."""
    results = done.evaluation.results
    flagged = flag_results(results, done.checks, done.settings)
    if flagged is results:
        return done
    write_frame(done.folder / "results.csv", flagged)
    return done.with_(evaluation=dataclasses.replace(done.evaluation, results=flagged))
