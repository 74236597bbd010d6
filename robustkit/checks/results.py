"""Checks that read an evaluation's tables (``results.csv`` and ``settings.json``), no model.

Each fails on a sign that the numbers come from a mis-configured or masked attack: accuracy
that rises with ε, an iterative attack weaker than one gradient step, PGD steps too short to
reach ε.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from robustkit.attack_specs import SPECS, attack_spec, probing
from robustkit.budgets import STEP_FACTOR
from robustkit.checks.record import Check, grade
from robustkit.config import AttackConfig, config_from_dict
from robustkit.errors import RobustkitError
from robustkit.records import RunSettings
from robustkit.results import ANY

#: Settings as read from ``settings.json``, or as a job builds them before writing them.
Settings = RunSettings | Mapping[str, Any]
#: Attacks that take many gradient steps (the ones the model checks probe).
ITERATIVE = probing()
#: A rise of accuracy this small is float noise, not a rise.
RISE_TOLERANCE = 1e-12


def attack_configs(settings: Settings) -> dict[str, AttackConfig]:
    """The attacks listed in ``settings.json``, keyed by their title (as in results.csv)."""
    raw = RunSettings.of(settings).attacks
    try:
        configs = config_from_dict({"attacks": list(raw)}).attacks
    except RobustkitError:
        return {}
    return {c.title: c for c in configs}


def transfer_titles(settings: Settings) -> list[str]:
    """The titles of the evaluation's transfer attacks (crafted on another model)."""
    return [t for t, c in attack_configs(settings).items() if c.source is not None]


def attack_kind(title: str, configs: dict[str, AttackConfig]) -> tuple[str, bool]:
    """(name, targeted) of an attack title: from the settings, else guessed from the title."""
    if title in configs:
        return configs[title].name, configs[title].targeted
    longest_first = sorted(SPECS, key=len, reverse=True)  # apgd-t before apgd before pgd
    name = next((n for n in longest_first if title.startswith(n)), title)
    return name, "targeted" in title


def _family(name: str) -> str | None:
    """The family of a declared attack, None for a name the table does not know."""
    spec = SPECS.get(name)
    return spec.family if spec else None


def require_results_columns(results: pd.DataFrame) -> None:
    """Raise :class:`RobustkitError` unless ``results`` has the columns the checks read."""
    missing = {"model", "attack", "norm", "eps", "accuracy"} - set(results.columns)
    if missing:
        raise RobustkitError(
            f"results frame lacks the columns {sorted(missing)}: pass the "
            "frame of results.csv written by robustkit attack"
        )


# ------------------------------------------------------------------ accuracy_monotone_in_eps


class Rise(NamedTuple):
    """Accuracy going up between two neighbouring ε of one curve."""

    curve: str
    eps_before: float
    eps_after: float
    accuracy_before: float
    accuracy_after: float

    @property
    def size(self) -> float:
        return self.accuracy_after - self.accuracy_before

    def __str__(self) -> str:
        return (f"{self.curve}: {self.accuracy_before:.3f} at ε={self.eps_before:g} rises to "
                f"{self.accuracy_after:.3f} at ε={self.eps_after:g}")


def largest_rise(curves: Iterable[tuple[str, Sequence[float], Sequence[float]]]) -> Rise | None:
    """The largest rise of accuracy between neighbouring ε over ``(name, eps, accuracy)``
    curves (ε ascending); None when accuracy never rises."""
    worst: Rise | None = None
    for name, eps, acc in curves:
        for i in range(len(acc) - 1):
            rise = Rise(name, eps[i], eps[i + 1], acc[i], acc[i + 1])
            if rise.size > (worst.size if worst else 0.0) + RISE_TOLERANCE:
                worst = rise
    return worst


def monotone_check(rise: Rise | None, fail_above: float, passed: str, where: str = "") -> Check:
    """``accuracy_monotone_in_eps`` from the largest rise: any rise warns, one above
    ``fail_above`` fails. ``passed`` explains a curve that never rises; ``where`` is appended
    to the description of a rise."""
    size = rise.size if rise else 0.0
    measurements = {"rise": size}
    if rise:
        measurements |= {"eps_before": rise.eps_before, "eps_after": rise.eps_after,
                         "accuracy_before": rise.accuracy_before,
                         "accuracy_after": rise.accuracy_after}
    return Check("accuracy_monotone_in_eps", grade(size, RISE_TOLERANCE, fail_above), size,
                 f"rise = 0 (fail > {fail_above:g})", f"{rise}{where}" if rise else passed,
                 measurements)


def check_accuracy_monotone_in_eps(results: pd.DataFrame, fail_above: float = 0.02) -> Check:
    """Robust accuracy must never rise with ε: an adversarial example at ε is one at every ε' > ε.

    Value: the largest rise between neighbouring ε of any model × attack; a rise up to
    ``fail_above`` warns (it can be one unlucky random start), a larger one fails. On results
    of the shortcut engine (ε-monotone reuse) this holds by construction and cannot fail;
    :func:`~robustkit.checks.runner.run_checks` then uses
    :func:`~robustkit.checks.model.check_accuracy_monotone_in_eps_from_scratch` instead.
    """
    curves = []
    for (model, attack, _), rows in results.groupby(["model", "attack", "norm"], sort=False):
        rows = rows.sort_values("eps")
        curves.append((f"{model}/{attack}", rows["eps"].to_numpy(float).tolist(),
                       rows["accuracy"].to_numpy(float).tolist()))
    return monotone_check(largest_rise(curves), fail_above,
                          "accuracy never rises with ε for any model and attack")


# --------------------------------------------------------------- iterative_beats_single_step


class Gap(NamedTuple):
    """An iterative attack's accuracy above a single-step attack's at one ε."""

    model: str
    iterative: str
    single_step: str
    eps: float
    iterative_accuracy: float
    single_step_accuracy: float


def _comparable_pairs(frame: pd.DataFrame, configs: dict[str, AttackConfig]
                      ) -> Iterator[tuple[str, str]]:
    """(FGSM title, iterative title) pairs of one model's rows with the same norm and
    targeting."""
    kinds = {
        str(t): (*attack_kind(str(t), configs), n)
        for t, n in frame.groupby("attack", sort=False)["norm"].first().items()
    }
    singles = [t for t, k in kinds.items() if _family(k[0]) == "single-step"]
    iteratives = [t for t, k in kinds.items() if _family(k[0]) in ("iterative", "ensemble")]
    for single in singles:
        for iterative in iteratives:
            if kinds[single][1:] == kinds[iterative][1:]:
                yield single, iterative


def _widest_gap(model: str, frame: pd.DataFrame, single: str, iterative: str) -> Gap | None:
    """The ε where ``iterative`` is furthest above ``single`` (None without a common ε)."""
    a = frame[frame["attack"] == single].set_index("eps")["accuracy"]
    b = frame[frame["attack"] == iterative].set_index("eps")["accuracy"]
    diff = (b - a).dropna()
    if diff.empty:
        return None
    eps = float(diff.index[int(np.argmax(diff.to_numpy()))])
    return Gap(model, iterative, single, eps, float(b[eps]), float(a[eps]))


def _gap_size(gap: Gap) -> float:
    """How far the iterative attack's accuracy lies above the single-step attack's."""
    return gap.iterative_accuracy - gap.single_step_accuracy


def check_iterative_beats_single_step(
    results: pd.DataFrame, settings: Settings, fail_above: float = 0.02
) -> Check:
    """An iterative attack (PGD, APGD, APGD-T, the ensemble) must be at least as strong as FGSM
    at every ε.

    Value: the largest ``acc(PGD) − acc(FGSM)`` over ε and comparable pairs (same model, norm and
    targeting); positive means PGD missed examples that one gradient step found. Up to
    ``fail_above`` warns, more fails.
    """
    configs = attack_configs(settings)
    gaps: list[Gap] = []
    own = ~results["attack"].isin([ANY, *transfer_titles(settings)])  # white-box rows
    for model, frame in results[own].groupby("model", sort=False):
        for single, iterative in _comparable_pairs(frame, configs):
            gap = _widest_gap(str(model), frame, single, iterative)
            if gap is not None:
                gaps.append(gap)
    threshold = f"acc(PGD) − acc(FGSM) ≤ 0 (fail > {fail_above:g})"
    if not gaps:
        return Check("iterative_beats_single_step", "pass", None, threshold,
                     "no FGSM/PGD pair with the same norm to compare")
    worst = max(gaps, key=_gap_size)  # the first of the widest
    size = _gap_size(worst)
    status = grade(size, RISE_TOLERANCE, fail_above)
    pairs = [f"{gap.iterative} vs {gap.single_step}" for gap in gaps]
    detail = (
        f"{worst.model}: {worst.iterative} {worst.iterative_accuracy:.3f} vs "
        f"{worst.single_step} {worst.single_step_accuracy:.3f} at ε={worst.eps:g}"
        if status != "pass"
        else f"{', '.join(sorted(set(pairs)))}: the iterative attack at least as strong as FGSM "
        "at every ε"
    )
    return Check("iterative_beats_single_step", status, size, threshold, detail,
                 {"gap": size, "eps": worst.eps,
                  "iterative_accuracy": worst.iterative_accuracy,
                  "single_step_accuracy": worst.single_step_accuracy})


# --------------------------------------------------------------------------- pgd_step_budget


def check_pgd_step_budget(settings: Settings) -> Check:
    """PGD's ``step_size × steps`` must be at least ε, or iterates cannot reach the ball's edge.

    Value: the smallest ``step_size·steps / ε_max`` over the PGD attacks (the default step
    ``2.5·ε/steps`` gives 2.5); below 1 fails.
    """
    eps_values = [e for e in RunSettings.of(settings).eps or () if e > 0]
    threshold = "step_size·steps ≥ ε_max"
    pgds = [c for c in attack_configs(settings).values()
            if "step_size" in attack_spec(c.name).options]
    if not pgds or not eps_values:
        return Check("pgd_step_budget", "pass", None, threshold, "no PGD attack with ε > 0")
    eps_max = max(eps_values)
    ratios = {
        c.title: STEP_FACTOR if c.step_size is None else c.step_size * c.steps / eps_max
        for c in pgds
    }
    title = min(ratios, key=lambda t: ratios[t])
    ratio = ratios[title]
    config = next(c for c in pgds if c.title == title)
    reach = (
        f"default step {STEP_FACTOR:g}·ε/{config.steps}"
        if config.step_size is None
        else f"{config.steps} steps of {config.step_size:g} travel "
        f"{config.step_size * config.steps:g}"
    )
    measurements = {"ratio": ratio, "eps_max": eps_max, "steps": config.steps}
    if ratio < 1:
        detail = f"{title}: {reach} < ε_max = {eps_max:g}; raise steps or step_size"
        return Check("pgd_step_budget", "fail", ratio, threshold, detail, measurements)
    return Check("pgd_step_budget", "pass", ratio, threshold,
                 f"{title}: {reach}, enough for ε_max = {eps_max:g}", measurements)


def result_checks(results: pd.DataFrame, settings: Settings) -> list[Check]:
    """The checks of this module, in the order reports list them."""
    require_results_columns(results)
    return [
        check_accuracy_monotone_in_eps(results),
        check_iterative_beats_single_step(results, settings),
        check_pgd_step_budget(settings),
    ]


# ----------------------------------------------------------------------- transfer_not_stronger

#: The check that compares transfer attacks with the white-box ones, and its fail limit: the
#: share of the samples the white-box attacks left robust at some ε that a transfer attack
#: broke there (any such sample warns).
TRANSFER_CHECK = "transfer_not_stronger"
TRANSFER_FAIL_ABOVE = 0.05
#: ε where the white-box attacks left fewer samples robust are not judged by share (one
#: sample would be a large share of them).
TRANSFER_FEWEST_ROBUST = 5


class TransferGain(NamedTuple):
    """At one ε: the samples the white-box attacks left robust and those of them a transfer
    attack broke."""

    eps: float
    robust: int
    broken: np.ndarray[Any, Any]  # positions (rows of per_sample)

    @property
    def share(self) -> float:
        return len(self.broken) / self.robust if self.robust else 0.0


def transfer_gains(per_sample: pd.DataFrame, white_box: Sequence[str], transfer: Sequence[str],
                   eps: Sequence[float]) -> list[TransferGain]:
    """Per swept ε > 0: the samples no white-box attack broke at any ε' ≤ ε
    (``min_w <w>_eps > ε``) that some transfer attack broke there (``min_t <t>_eps ≤ ε``)."""
    def smallest(titles: Sequence[str]) -> np.ndarray[Any, Any]:
        columns = per_sample[[f"{t}_eps" for t in titles]].to_numpy(dtype=float)
        return columns.min(axis=1) if len(titles) else np.full(len(per_sample), np.inf)

    own, crafted = smallest(white_box), smallest(transfer)
    return [TransferGain(e, int((own > e).sum()), np.flatnonzero((own > e) & (crafted <= e)))
            for e in sorted(e for e in eps if e > 0)]


def check_transfer_not_stronger(per_sample: pd.DataFrame, settings: Settings) -> Check:
    """A transfer attack must not beat the white-box attacks on the same model (Carlini et
    al., 2019, §5): the attacker who sees the model's gradients can find whatever an attacker
    who sees only another model's can. A sample a transfer attack broke at ε that every
    white-box attack left robust at ε is an example the white-box attacks missed inside their
    own ball: their gradients misled them (gradient masking).

    Value: the largest share, over the swept ε where the white-box attacks left at least
    :data:`TRANSFER_FEWEST_ROBUST` samples robust, of those samples a transfer attack broke;
    any such sample warns, a share above :data:`TRANSFER_FAIL_ABOVE` fails.
    """
    configs = attack_configs(settings)
    transfer = [t for t in transfer_titles(settings) if f"{t}_eps" in per_sample]
    white_box = [t for t, c in configs.items() if c.source is None and f"{t}_eps" in per_sample]
    eps = list(RunSettings.of(settings).eps or ())
    threshold = f"share broken by transfer only = 0 (fail > {TRANSFER_FAIL_ABOVE:g})"
    if not transfer or not white_box:
        return Check(TRANSFER_CHECK, "pass", None, threshold,
                     "no transfer and white-box attacks to compare")
    gains = [g for g in transfer_gains(per_sample, white_box, transfer, eps)
             if g.robust >= TRANSFER_FEWEST_ROBUST]
    if not gains:
        return Check(TRANSFER_CHECK, "pass", None, threshold, "the white-box attacks left "
                     f"fewer than {TRANSFER_FEWEST_ROBUST} samples robust at every ε")
    worst = max(gains, key=lambda g: g.share)
    status = grade(worst.share, 0.0, TRANSFER_FAIL_ABOVE)
    return Check(TRANSFER_CHECK, status, worst.share, threshold,
                 _transfer_detail(worst, per_sample, white_box, transfer),
                 {"share": worst.share, "eps": worst.eps, "robust": worst.robust,
                  "broken_by_transfer_only": len(worst.broken)})


def _transfer_detail(worst: TransferGain, per_sample: pd.DataFrame, white_box: Sequence[str],
                     transfer: Sequence[str]) -> str:
    """What the check found, in one line, naming up to ten test images."""
    attacks = f"{' + '.join(transfer)} vs {' + '.join(white_box)}"
    if not len(worst.broken):
        return (f"{attacks}: no sample that the white-box attacks left robust was broken by "
                "transfer at any ε")
    named = ", ".join(str(int(per_sample["index"].iloc[i])) for i in worst.broken[:10])
    more = ", …" if len(worst.broken) > 10 else ""
    return (f"{attacks}: at ε={worst.eps:g} transfer broke {len(worst.broken)} of the "
            f"{worst.robust} samples the white-box attacks left robust (test images {named}"
            f"{more}): the white-box attacks miss examples inside their own ball, gradient "
            "masking suspected")
