"""Running the checks on an evaluation, and what their failures mean for its numbers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

# the checks that probe the model, by module (robustkit.checks lists them by name)
import robustkit.checks.model as probes
from robustkit.attack_specs import SPECS, attack_spec, names_in
from robustkit.attacks import attack_mode
from robustkit.attacks.losses import logits_problem
from robustkit.checks.record import Check, checks_frame
from robustkit.checks.results import (
    ITERATIVE,
    TRANSFER_CHECK,
    Settings,
    attack_configs,
    check_transfer_not_stronger,
    result_checks,
    transfer_titles,
)
from robustkit.config import AttackConfig
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.models.randomness import Spread, output_spread
from robustkit.progress import Bar, counting_rows
from robustkit.records import RunSettings
from robustkit.vocabulary import ChecksLevel


def main_attack(results: pd.DataFrame, settings: Settings, default_steps: int = 40
                ) -> AttackConfig:
    """The attack the model checks use: the evaluation's strongest untargeted PGD or APGD.

    Strongest = lowest mean accuracy in ``results``; without either in the settings, the default
    PGD (L∞, ``default_steps`` steps, step 2.5·ε/steps, one random start), APGD in a norm PGD
    does not run in (L1: a sweep of APGD-T or FAB-T alone). Transfer attacks (crafted on
    another model) are not the evaluation's attacks on this one: never chosen.
    """
    own = [c for c in attack_configs(settings).values() if c.source is None]
    configs = [c for c in own if c.name in ITERATIVE]
    ensembles = [c for c in own if attack_spec(c.name).family == "ensemble"]
    if not configs and ensembles:  # the ensemble's first stage: APGD with the CE loss
        return AttackConfig(name="apgd", norm=ensembles[0].norm, steps=ensembles[0].steps)
    if not configs:
        norms = {c.norm for c in own} or {"linf"}
        norm = norms.pop() if len(norms) == 1 else "linf"
        fallback = "pgd" if norm in attack_spec("pgd").norms else "apgd"  # L1: APGD
        return AttackConfig(name=fallback, norm=norm, steps=default_steps)
    untargeted = [c for c in configs if not c.targeted] or configs

    def strength(config: AttackConfig) -> tuple[float, int]:
        rows = results[results["attack"] == config.title] if "attack" in results else results
        mean = float(rows["accuracy"].mean()) if len(rows) else math.inf
        return (mean, -config.steps * config.restarts)

    return dataclasses.replace(min(untargeted, key=strength), targeted=False)


def _sweep_eps(results: pd.DataFrame, settings: Settings) -> list[float]:
    values = RunSettings.of(settings).eps or (
        results["eps"].unique().tolist() if "eps" in results else [])
    return sorted({float(e) for e in values if float(e) > 0})


def convergence_eps(results: pd.DataFrame, attack: AttackConfig, eps: Sequence[float]) -> float:
    """The swept ε where ``attack``'s accuracy is nearest half the clean accuracy: there more
    steps or restarts would show (at ε where accuracy is already 0 they cannot)."""
    if not eps:
        return 0.3
    rows = results[results["attack"] == attack.title]
    if rows.empty:
        return float(eps[len(eps) // 2])
    by_eps = rows.groupby("eps")["accuracy"].mean()
    clean = float(by_eps.get(0.0, by_eps.max()))
    candidates = [e for e in eps if e in by_eps.index] or list(eps)
    return float(min(candidates, key=lambda e: abs(float(by_eps.get(e, clean)) - clean / 2)))


def _device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return fallback


@dataclass(frozen=True)
class Budgets:
    """How much the model checks may attack (``full``: each check's own budget)."""

    #: samples the model checks run on (at most)
    samples: int = 200
    #: steps of PGD at ε = 0.5 and 1
    large_eps_steps: int = 50
    #: steps of the from-scratch re-attack at every ε (None: the evaluation's attack as it is)
    monotone_steps: int | None = None
    #: Square's queries on the samples the gradient attacks left robust
    square_queries: int = 1000
    #: samples of the noise, convergence and gradient-free checks (None: all of ``samples``)
    probe_samples: int | None = None
    #: steps of the checks' attack when the evaluation ran no PGD or APGD
    default_steps: int = 40
    #: use the evaluation's per-sample outcomes instead of re-running its attacks
    reuse: bool = False


#: ``quick``: every check that can discredit a number, at budgets scaled to the evaluation:
#: the attacks the sweep ran are not run again (their per-sample outcomes are reused); on the
#: first 50 samples the convergence check runs one APGD with the evaluation's steps (20 to 100)
#: on what the sweep left robust, and Square twice as many queries (100 to 500) on what the
#: gradient attacks left.
QUICK = Budgets(samples=100, large_eps_steps=10, monotone_steps=10, square_queries=500,
                probe_samples=50, default_steps=20, reuse=True)
LEVELS: dict[ChecksLevel, Budgets] = {"full": Budgets(), "quick": QUICK}
#: The sweep's attacks whose per-sample worst case is "the strongest gradient evaluation" that
#: the gradient-free check compares Square with (FGSM is too weak to stand for it).
GRADIENT = names_in("iterative")
#: The stronger APGD of the quick convergence check: the evaluation's steps, within these.
CONVERGE_STEPS = (20, 100)
#: The fewest queries of the quick gradient-free check.
SQUARE_QUERIES = 100


def run_checks(
    model: nn.Module,
    split: Split,
    results: pd.DataFrame,
    settings: Settings,
    *,
    n: int = 200,
    seed: int = 0,
    shortcuts: bool = True,
    progress: bool = False,
    level: ChecksLevel = "full",
    per_sample: pd.DataFrame | None = None,
    done: dict[str, Check] | None = None,
    on_check: Callable[[Check], None] | None = None,
) -> pd.DataFrame:
    """Every check: the results-table ones and the model ones on the first ``n`` samples.

    Returns a frame with the columns name, status, value, threshold, detail; the attacks run on
    the model's device. ``level``: ``full`` runs each check at its own budget (several PGD and
    APGD-100 runs, restarts, a re-attack at every ε, Square with 1,000 queries); ``quick`` runs
    the same checks at budgets scaled to the evaluation (:data:`QUICK`) and reuses the sweep's
    per-sample outcomes (``per_sample``, rows in split order) instead of re-running its attacks;
    ``off`` is not a level of this function (nothing runs). With transfer attacks in the
    settings, ``transfer_not_stronger`` joins the model checks at either level, read from
    ``per_sample`` (it does not run without it).
    ``shortcuts``: the results come from the shortcut engine (ε-monotone reuse, the default of
    :func:`~robustkit.evaluation.evaluate`), so the monotonicity check re-attacks the samples
    from scratch at each ε (:func:`~robustkit.checks.model.
    check_accuracy_monotone_in_eps_from_scratch`) instead of reading a curve that is monotone
    by construction. Without logits ``[N, K]`` only ``outputs_are_logits`` joins the
    results-table checks: the model checks cannot run.
    ``done``: checks finished by an interrupted earlier call (by name), not run again;
    ``on_check`` is called after each model check that runs. ``progress`` shows a bar.
    """
    budgets = LEVELS[level]
    n = min(n, budgets.samples)
    checks = result_checks(results, settings)
    if n < 1 or len(split) == 0:
        raise RobustkitError(f"run_checks needs at least one sample, got n={n} of {len(split)}")
    device = _device(model, split.images.device)
    x = split.images[:n].to(device)
    y = split.labels[:n].to(device)
    checks.append(probes.check_outputs_are_logits(model, x))
    with attack_mode(model), torch.no_grad():
        if logits_problem(model(x[:2]), len(x[:2])):
            return checks_frame(checks)
    with attack_mode(model):
        spread = output_spread(model, x)
    randomness = _Randomness.of(settings, spread)
    strongest = main_attack(results, settings, default_steps=budgets.default_steps)
    attack = dataclasses.replace(strongest, eot_samples=randomness.samples)
    eps = _sweep_eps(results, settings)
    model_checks = _model_checks(model, x, y, attack, eps, results, settings, seed=seed,
                                 budgets=budgets, shortcuts=shortcuts, randomness=randomness,
                                 per_sample=per_sample if budgets.reuse else None)
    if transfer_titles(settings) and per_sample is not None:  # read from the sweep's table
        model_checks.append((TRANSFER_CHECK, lambda: check_transfer_not_stronger(
            per_sample, settings)))
    finished = dict(done or {})
    probed: list[Check] = []
    with Bar("sanity checks", len(model_checks), progress) as bar, \
            counting_rows(model, lambda rows: bar.pulse()):
        for name, run_check in model_checks:
            bar.advance(0, name)  # the check now running
            check = finished.get(name) or run_check()
            if name not in finished and on_check is not None:
                on_check(check)
            probed.append(check)
            bar.advance(1)
            bar.note(f"check {name}: {check.status}"
                     + (" (kept from the interrupted run)" if name in finished else ""))
    if shortcuts and eps:  # the from-scratch re-attack replaces the table's monotone check
        checks[0] = probed.pop(0)
    return checks_frame(checks + probed)


#: The name under which the from-scratch monotonicity check runs among the model checks.
MONOTONE_FROM_SCRATCH = "accuracy_monotone_in_eps"
#: The gradient-free check runs at every swept ε where the gradient attacks leave at least this
#: share of the checked samples robust (and at least :data:`FEWEST_ROBUST`): where fewer are
#: left, one sample Square breaks is a large share of them, and the evaluation's figure is
#: already small.
ROBUST_SHARE = 0.2
FEWEST_ROBUST = 5


@dataclass(frozen=True)
class _Randomness:
    """How the checks meet the model: ``spread`` of two passes over the same batch; for a
    random model that the evaluation attacks with EOT, the checks' EOT draws ``samples`` (the
    largest K of the evaluation's), its EOT attacks (title → K) and its gradient attacks that
    ran without EOT (``plain``). ``samples`` is None for a deterministic model: the checks
    probe the plain model then, even when the evaluation's EOT averaged over a
    transformation (that is robustness under transformation, not the model's)."""

    spread: Spread
    eot: dict[str, int]
    plain: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings, spread: Spread) -> _Randomness:
        configs = attack_configs(settings)
        eot = {t: c.eot_samples for t, c in configs.items() if c.eot_samples is not None}
        plain = tuple(t for t, c in configs.items() if c.eot_samples is None
                      and c.source is None and attack_spec(c.name).uses_gradients)
        return cls(spread, eot, plain)

    @property
    def samples(self) -> int | None:
        return max(self.eot.values()) if self.spread.random and self.eot else None

    def sweep_uses_eot(self, settings: Settings) -> bool:
        """Whether the sweep's EOT attacks attacked the model itself (a random model, no
        transformation), so that their per-sample outcomes are the evaluation's figures."""
        return self.samples is not None and not RunSettings.of(settings).transforms


def _model_checks(
    model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, eps: list[float],
    results: pd.DataFrame, settings: Settings, *, seed: int, budgets: Budgets,
    shortcuts: bool, per_sample: pd.DataFrame | None, randomness: _Randomness,
) -> list[tuple[str, Callable[[], Check]]]:
    """The model checks in report order, each as (name, how to run it)."""
    eps_max = max(eps) if eps else 0.3
    middle = convergence_eps(results, attack, eps)
    few = slice(None, budgets.probe_samples)
    known = (_Known(model, x[few], y[few], attack, settings, per_sample, seed,
                    with_eot=randomness.sweep_uses_eot(settings))
             if budgets.reuse else None)
    checked = len(y[few])
    least = max(FEWEST_ROBUST, math.ceil(ROBUST_SHARE * checked))
    plain = randomness.plain if randomness.samples else ()
    checks: list[tuple[str, Callable[[], Check]]] = []
    if shortcuts and eps:
        checks.append((MONOTONE_FROM_SCRATCH, lambda: probes.
                       check_accuracy_monotone_in_eps_from_scratch(
                           model, x, y, attack, eps, seed=seed,
                           max_steps=budgets.monotone_steps)))
    checks += [
        ("forward_deterministic", lambda: probes.check_forward_deterministic(
            model, x, eot=randomness.eot, plain=plain, spread=randomness.spread)),
        ("batch_independent", lambda: probes.check_batch_independent(model, x)),
        ("input_gradients_usable", lambda: probes.check_input_gradients_usable(model, x, y)),
        ("accuracy_at_large_eps", lambda: probes.check_accuracy_at_large_eps(
            model, x, y, attack, seed=seed, max_steps=budgets.large_eps_steps)),
        ("noise_weaker_than_attack", lambda: probes.check_noise_weaker_than_attack(
            model, x[few], y[few], attack, eps_max, seed=seed,
            known=known.own(eps_max) if known else None)),
        ("attack_converged", lambda: probes.check_attack_converged(
            model, x[few], y[few], attack, middle, seed=seed,
            known=known.own(middle) if known else None,
            stronger=known.stronger(middle) if known else None)),
        ("gradient_free_finds_no_more", lambda: probes.check_gradient_free_finds_no_more(
            model, x[few], y[few], attack, eps or [middle], seed=seed,
            budget=known.square_queries(budgets.square_queries) if known else
            budgets.square_queries, known=known.gradient if known else None, least=least,
            eot_samples=attack.eot_samples)),
    ]
    return checks


class _Known:
    """The outcomes the quick checks start from, each computed at most once per ε.

    ``own``: the checks' attack as the sweep ran it (its per-sample smallest breaking ε), else
    the sweep's ensemble, else whatever attack the sweep ran (FGSM, Square); without the
    sweep's outcomes the attack is run here. ``stronger``: ``own`` with APGD on what it left
    robust (:func:`~robustkit.checks.model.strengthen`). ``gradient``: the worst case over the
    sweep's iterative gradient attacks (:data:`GRADIENT`, the strongest gradient evaluation the
    run contains), else the ensemble's, else ``stronger``.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig,
                 settings: Settings, per_sample: pd.DataFrame | None, seed: int, *,
                 with_eot: bool = False) -> None:
        self.model, self.x, self.y, self.attack, self.seed = model, x, y, attack, seed
        configs = attack_configs(settings)

        def outcome(names: Sequence[str]) -> _Swept | None:
            return _sweep_outcome(per_sample, configs, len(y), names, with_eot=with_eot)

        ensemble = outcome(names_in("ensemble"))
        self.swept = outcome((attack.title,)) or ensemble or outcome(tuple(SPECS))
        self.iterative = outcome(GRADIENT) or ensemble
        steps = max((configs[t].steps if attack_spec(configs[t].name).steps else 1)
                    for t in self.swept[0]) if self.swept else attack.steps
        self.converge_steps = min(max(steps, CONVERGE_STEPS[0]), CONVERGE_STEPS[1])
        self._own: dict[float, probes.Outcome] = {}
        self._stronger: dict[float, probes.Outcome] = {}

    def own(self, eps: float) -> probes.Outcome:
        if eps not in self._own:
            self._own[eps] = (_outcome_at(self.swept, eps) if self.swept is not None
                              else self._fresh(eps))
        return self._own[eps]

    def _fresh(self, eps: float) -> probes.Outcome:
        config = dataclasses.replace(self.attack, targeted=False)
        success = probes.broken(self.model, self.x, self.y, config, eps, self.seed)
        return probes.Outcome(~success.cpu(), f"{config.name.upper()}-{config.steps}")

    def stronger(self, eps: float) -> probes.Outcome:
        if eps not in self._stronger:
            self._stronger[eps] = probes.strengthen(
                self.model, self.x, self.y, self.own(eps), eps, norm=self.attack.norm,
                seed=self.seed, steps=self.converge_steps, eot_samples=self.attack.eot_samples)
        return self._stronger[eps]

    def square_queries(self, most: int) -> int:
        """Square's budget: twice the evaluation's steps per sample, 100 to ``most``."""
        return min(max(2 * self.converge_steps, SQUARE_QUERIES), most)

    def gradient(self, eps: float) -> probes.Outcome:
        if self.iterative is not None:
            return _outcome_at(self.iterative, eps)
        return self.stronger(eps)


#: (titles, per-sample smallest breaking ε) of the sweep's attacks a check reuses.
_Swept = tuple[list[str], "np.ndarray[Any, Any]"]


def _sweep_outcome(per_sample: pd.DataFrame | None, configs: dict[str, AttackConfig], n: int,
                   names: Sequence[str], *, with_eot: bool = False) -> _Swept | None:
    """The sweep's per-sample worst case over its attacks whose name or title is in ``names``
    and that attacked the plain model (no BPDA; no EOT, unless ``with_eot``: a random model,
    whose figures are its EOT attacks'), for the first ``n`` samples: (their titles, smallest
    breaking ε per sample); None when there is none."""
    if per_sample is None or len(per_sample) < n:
        return None
    titles = [t for t, c in configs.items() if (c.name in names or t in names)
              and (c.eot_samples is None or with_eot) and c.bpda is None
              and c.source is None and f"{t}_eps" in per_sample]
    if not titles:
        return None
    columns = per_sample[[f"{t}_eps" for t in titles]].to_numpy(dtype=float)[:n]
    return titles, columns.min(axis=1)


def _outcome_at(swept: _Swept, eps: float) -> probes.Outcome:
    """Which samples the swept attacks leave robust at ``eps``."""
    titles, smallest = swept
    return probes.Outcome(torch.from_numpy(smallest > eps),
                          f"the sweep's {' + '.join(titles)}")
