"""Running the checks on an evaluation, and what their failures mean for its numbers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

# the checks that probe the model, by module (robustkit.checks lists them by name)
import robustkit.checks.model as probes
from robustkit.attacks import attack_mode
from robustkit.attacks.losses import logits_problem
from robustkit.checks.record import Check, checks_frame
from robustkit.checks.results import ITERATIVE, attack_configs, attack_kind, result_checks
from robustkit.config import AttackConfig
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.progress import Bar
from robustkit.results import ANY

#: Attacks with a gradient-free stage: a failing gradient-free check does not discredit them.
GRADIENT_FREE = ("square", "autoattack")
#: The mark put next to a number that a failing check makes unreliable.
UNRELIABLE = "(unreliable)"


def checks_from_results(results: pd.DataFrame, settings: dict[str, Any]) -> pd.DataFrame:
    """The checks that need only ``results.csv`` and ``settings.json`` (no model)."""
    return checks_frame(result_checks(results, settings))


def main_attack(results: pd.DataFrame, settings: dict[str, Any]) -> AttackConfig:
    """The attack the model checks use: the evaluation's strongest untargeted PGD or APGD.

    Strongest = lowest mean accuracy in ``results``; without either in the settings, the default
    PGD (L∞, 40 steps, step 2.5·ε/steps, one random start).
    """
    configs = [c for c in attack_configs(settings).values() if c.name in ITERATIVE]
    ensembles = [c for c in attack_configs(settings).values() if c.name == "autoattack"]
    if not configs and ensembles:  # the ensemble's first stage: APGD with the CE loss
        return AttackConfig(name="apgd", norm=ensembles[0].norm, steps=ensembles[0].steps)
    if not configs:
        norms = {c.norm for c in attack_configs(settings).values()}
        norm = norms.pop() if len(norms) == 1 else "linf"
        return AttackConfig(name="pgd", norm=norm)
    untargeted = [c for c in configs if not c.targeted] or configs

    def strength(config: AttackConfig) -> tuple[float, int]:
        rows = results[results["attack"] == config.title] if "attack" in results else results
        mean = float(rows["accuracy"].mean()) if len(rows) else math.inf
        return (mean, -config.steps * config.restarts)

    return dataclasses.replace(min(untargeted, key=strength), targeted=False)


def _sweep_eps(results: pd.DataFrame, settings: dict[str, Any]) -> list[float]:
    values = settings.get("eps") or (results["eps"].unique().tolist() if "eps" in results else [])
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


def run_checks(
    model: nn.Module,
    split: Split,
    results: pd.DataFrame,
    settings: dict[str, Any],
    *,
    n: int = 200,
    seed: int = 0,
    shortcuts: bool = True,
    progress: bool = False,
) -> pd.DataFrame:
    """Every check: the results-table ones and the model ones on the first ``n`` samples.

    Returns a frame with the columns name, status, value, threshold, detail. Takes a few
    seconds for an MLP on 200 samples on a CPU; the attacks run on the model's device.
    ``shortcuts``: the results come from the shortcut engine (ε-monotone reuse, the default of
    :func:`~robustkit.evaluation.evaluate`), so the monotonicity check re-attacks the samples
    from scratch at each ε (:func:`~robustkit.checks.model.
    check_accuracy_monotone_in_eps_from_scratch`) instead of reading a curve that is monotone
    by construction. Without logits ``[N, K]`` only ``outputs_are_logits`` joins the
    results-table checks: the model checks cannot run.
    ``progress`` shows a bar over the model checks (the slowest phase of a small run).
    """
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
    attack = main_attack(results, settings)
    eps = _sweep_eps(results, settings)
    eps_max = max(eps) if eps else 0.3
    if shortcuts and eps:
        checks[0] = probes.check_accuracy_monotone_in_eps_from_scratch(model, x, y, attack, eps,
                                                                       seed=seed)
    middle = convergence_eps(results, attack, eps)
    model_checks: list[Callable[[], Check]] = [
        lambda: probes.check_forward_deterministic(model, x),
        lambda: probes.check_batch_independent(model, x),
        lambda: probes.check_input_gradients_usable(model, x, y),
        lambda: probes.check_accuracy_at_large_eps(model, x, y, attack, seed=seed),
        lambda: probes.check_noise_weaker_than_attack(model, x, y, attack, eps_max, seed=seed),
        lambda: probes.check_attack_converged(model, x, y, attack, middle, seed=seed),
        lambda: probes.check_gradient_free_finds_no_more(model, x, y, attack, middle, seed=seed),
    ]
    with Bar("sanity checks", len(model_checks), progress) as bar:
        for run_check in model_checks:
            checks.append(run_check())
            bar.advance(1, checks[-1].name)
    return checks_frame(checks)


def unreliable_attacks(checks: pd.DataFrame | None, settings: dict[str, Any],
                       titles: Iterable[str]) -> dict[str, str]:
    """Attack title → why its robust accuracies are unreliable, for a run whose checks failed.

    Every attack of the run is, with one exception: when the only failures are the
    gradient-free check, attacks that include Square (``square``, ``autoattack``, and the
    per-sample worst case ``any`` over them) already did what that check asks for.
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
    if set(failed) == {"gradient_free_finds_no_more"} and free:
        free.add(ANY)
    else:
        free = set()
    return {t: reason for t in titles if t not in free}
