"""What failed checks mean for an evaluation's numbers; torch-free, so reports read it.

:func:`unreliable_attacks` says which attacks' robust accuracies the failed checks discredit,
:func:`flag_results` marks them in the results table, :func:`checks_from_results` runs the
checks that need only ``results.csv`` and ``settings.json``.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from robustkit.attack_specs import searching_freely
from robustkit.checks.record import checks_frame
from robustkit.checks.results import (
    TRANSFER_CHECK,
    Settings,
    attack_configs,
    attack_kind,
    result_checks,
)
from robustkit.results import ANY, UNRELIABLE_COLUMN

#: Attacks with a gradient-free stage: a failing gradient-free check does not discredit them.
GRADIENT_FREE = searching_freely()
#: Failures that discredit gradient attacks only: attacks with a gradient-free stage stand.
GRADIENT_ONLY = frozenset({"gradient_free_finds_no_more", "input_gradients_usable"})
#: Failures that speak only of the white-box attacks on the evaluated model (its gradients,
#: the attack the checks probe it with, the comparison with transfer): transfer attacks,
#: crafted on another model's gradients, stand. Any other failure (a random or
#: batch-dependent model, outputs that are not logits, PGD steps too short to reach ε, a
#: certified sample broken) discredits them too.
WHITE_BOX_ONLY = GRADIENT_ONLY | {"accuracy_monotone_in_eps", "iterative_beats_single_step",
                                  "accuracy_at_large_eps", "noise_weaker_than_attack",
                                  "attack_converged", TRANSFER_CHECK}
#: The mark put next to a number that a failing check makes unreliable.
UNRELIABLE = "(unreliable)"


def checks_from_results(results: pd.DataFrame, settings: Settings
                        ) -> pd.DataFrame:
    """The checks that need only ``results.csv`` and ``settings.json`` (no model)."""
    return checks_frame(result_checks(results, settings))


def unreliable_attacks(checks: pd.DataFrame | None, settings: Settings,
                       titles: Iterable[str]) -> dict[str, str]:
    """Attack title → why its robust accuracies are unreliable, for a run whose checks failed.

    Every attack of the run is, with two exceptions: when the only failures are about
    gradients (:data:`GRADIENT_ONLY`: the gradient-free check, unusable input gradients),
    attacks that include Square (``square``, ``autoattack``, and the per-sample worst case
    ``any`` over them) already did what those checks ask for, and need no gradient (a model
    whose logits are scaled by 1000 saturates cross-entropy's gradient, not Square); and when
    the only failures speak of the white-box attacks on this model (:data:`WHITE_BOX_ONLY`:
    those two, ``accuracy_at_large_eps``, ``noise_weaker_than_attack``, ``attack_converged``,
    the monotonicity and single-step checks, ``transfer_not_stronger``), transfer attacks
    stand: they followed another model's gradients.
    """
    if checks is None or checks.empty or "status" not in checks:
        return {}
    failed = sorted(str(n) for n in checks.loc[checks["status"] == "fail", "name"])
    if not failed:
        return {}
    reason = f"check{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed"
    configs = attack_configs(settings)
    titles = list(titles)
    free = {t for t in titles if attack_kind(t, configs)[0] in GRADIENT_FREE}
    if set(failed) <= GRADIENT_ONLY and free:
        free.add(ANY)
    else:
        free = set()
    if set(failed) <= WHITE_BOX_ONLY:
        free |= {t for t in titles if t in configs and configs[t].source is not None}
    return {t: reason for t in titles if t not in free}


def flag_results(results: pd.DataFrame, checks: pd.DataFrame | None,
                 settings: Settings) -> pd.DataFrame:
    """``results`` with the column :data:`~robustkit.results.UNRELIABLE_COLUMN` when a failed
    check discredits some of its rows (:func:`unreliable_attacks`): per row the reason, empty
    for the rows it does not discredit (clean accuracy, ε = 0, never is). Unchanged otherwise,
    so the results of an evaluation that passed keep their columns and bytes."""
    marked = unreliable_attacks(checks, settings, results["attack"].unique())
    if not marked:
        return results
    reasons = [marked.get(attack, "") if eps > 0 else ""
               for attack, eps in zip(results["attack"], results["eps"], strict=True)]
    return results.assign(**{UNRELIABLE_COLUMN: reasons})
