"""Sanity checks of an adversarial evaluation: signs of gradient masking or mis-configuration.

A robust-accuracy number is only as good as the attack behind it. These checks follow the
checklist of Carlini et al. (2019), "On Evaluating Adversarial Robustness", and the red flags that
AutoAttack reports. Each check is one small function returning a :class:`Check` whose status is
``pass``, ``warn`` or ``fail``, with the measured value, the threshold it was held to and a
one-line explanation.

Two groups:

* from the results table alone (:func:`checks_from_results`): accuracy never rises with ε, an
  iterative attack is at least as strong as a single-step one, PGD's steps can reach ε (with
  the model, the first is replaced by a re-attack from scratch at each ε, because the sweep's
  ε-monotone reuse makes its curve monotone by construction);
* with the model (:func:`run_checks` adds these): accuracy ≈ 0 at very large ε, random noise is
  far weaker than the attack, more steps or restarts barely help, a gradient-free attack
  (Square) breaks almost nothing the strongest gradient attack left robust, input gradients
  are neither zero nor non-finite, the outputs are logits (not softmax or per-class sigmoid
  outputs) and the forward pass is deterministic and independent of the rest of the batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks import (
    NORMS,
    apgd,
    attack_mode,
    pgd,
    random_unit_ball,
    square,
    steepest_step,
)
from robustkit.config import AttackConfig, config_from_dict
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.models.defences import with_bpda
from robustkit.models.loading import BATCH_TOLERANCE, batch_dependent, same_size_batches
from robustkit.progress import Bar

Status = Literal["pass", "warn", "fail"]
STATUSES: tuple[Status, ...] = ("pass", "warn", "fail")
CHECK_COLUMNS = ["name", "status", "value", "threshold", "detail"]
ANY = "any"
#: Attacks that take many gradient steps (the ones the model checks probe).
ITERATIVE = ("pgd", "apgd")


@dataclass(frozen=True)
class Check:
    """The outcome of one sanity check."""

    name: str
    status: Status
    value: float | None
    threshold: str
    detail: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def checks_frame(checks: Iterable[Check]) -> pd.DataFrame:
    """Checks as a frame with the columns name, status, value, threshold, detail."""
    rows = [dataclasses.asdict(c) for c in checks]
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


def _grade(value: float, warn_above: float, fail_above: float) -> Status:
    if value > fail_above:
        return "fail"
    if value > warn_above:
        return "warn"
    return "pass"


# --------------------------------------------------------------------------- settings


def attack_configs(settings: dict[str, Any]) -> dict[str, AttackConfig]:
    """The attacks listed in ``settings.json``, keyed by their title (as in results.csv)."""
    raw = settings.get("attacks") or []
    try:
        configs = config_from_dict({"attacks": list(raw)}).attacks
    except RobustkitError:
        return {}
    return {c.title: c for c in configs}


def _attack_kind(title: str, configs: dict[str, AttackConfig]) -> tuple[str, bool]:
    """(name, targeted) of an attack title: from the settings, else guessed from the title."""
    if title in configs:
        return configs[title].name, configs[title].targeted
    name = next((n for n in ("fgsm", "apgd-t", "apgd", "pgd", "square", "autoattack")
                 if title.startswith(n)), title)
    return name, "targeted" in title


# --------------------------------------------------------------------------- group (a)


def _largest_rise(curves: Iterable[tuple[str, Sequence[float], Sequence[float]]]
                  ) -> tuple[float, str]:
    """The largest rise of accuracy between neighbouring ε over ``(name, eps, accuracy)``
    curves (ε ascending), and where it happens ("" when accuracy never rises)."""
    worst, where = 0.0, ""
    for name, eps, acc in curves:
        for i in range(len(acc) - 1):
            rise = float(acc[i + 1] - acc[i])
            if rise > worst + 1e-12:
                worst = rise
                where = (f"{name}: {acc[i]:.3f} at ε={eps[i]:g} rises to {acc[i + 1]:.3f} at "
                         f"ε={eps[i + 1]:g}")
    return worst, where


def _monotone_check(worst: float, where: str, fail_above: float, passed: str) -> Check:
    status: Status = "pass" if worst <= 1e-12 else ("warn" if worst <= fail_above else "fail")
    return Check("accuracy_monotone_in_eps", status, worst, f"rise = 0 (fail > {fail_above:g})",
                 where or passed)


def check_monotone(results: pd.DataFrame, fail_above: float = 0.02) -> Check:
    """Robust accuracy must never rise with ε: an adversarial example at ε is one at every ε' > ε.

    Value: the largest rise between neighbouring ε of any model × attack; a rise up to
    ``fail_above`` warns (it can be one unlucky random start), a larger one fails. On results
    of the shortcut engine (ε-monotone reuse) this holds by construction and cannot fail;
    :func:`run_checks` then uses :func:`check_monotone_from_scratch` instead.
    """
    curves = []
    for (model, attack, _), rows in results.groupby(["model", "attack", "norm"], sort=False):
        rows = rows.sort_values("eps")
        curves.append((f"{model}/{attack}", rows["eps"].to_numpy(float).tolist(),
                       rows["accuracy"].to_numpy(float).tolist()))
    worst, where = _largest_rise(curves)
    return _monotone_check(worst, where, fail_above,
                           "accuracy never rises with ε for any model and attack")


def check_iterative_stronger(
    results: pd.DataFrame, settings: dict[str, Any], fail_above: float = 0.02
) -> Check:
    """An iterative attack (PGD, APGD, APGD-T, the ensemble) must be at least as strong as FGSM
    at every ε.

    Value: the largest ``acc(PGD) − acc(FGSM)`` over ε and comparable pairs (same model, norm and
    targeting); positive means PGD missed examples that one gradient step found.
    """
    configs = attack_configs(settings)
    worst: float | None = None
    where, pairs = "", []
    for model, frame in results[results["attack"] != ANY].groupby("model", sort=False):
        kinds = {
            str(t): (*_attack_kind(str(t), configs), n)
            for t, n in frame.groupby("attack", sort=False)["norm"].first().items()
        }
        singles = [t for t, k in kinds.items() if k[0] == "fgsm"]
        iteratives = [t for t, k in kinds.items() if k[0] in (*ITERATIVE, "apgd-t", "autoattack")]
        for f in singles:
            for p in iteratives:
                if kinds[f][1:] != kinds[p][1:]:
                    continue
                a = frame[frame["attack"] == f].set_index("eps")["accuracy"]
                b = frame[frame["attack"] == p].set_index("eps")["accuracy"]
                diff = (b - a).dropna()
                if diff.empty:
                    continue
                pairs.append(f"{p} vs {f}")
                at = int(np.argmax(diff.to_numpy()))
                eps, gap = float(diff.index[at]), float(diff.iloc[at])
                if worst is None or gap > worst:
                    worst = gap
                    where = f"{model}: {p} {b[eps]:.3f} vs {f} {a[eps]:.3f} at ε={eps:g}"
    threshold = f"acc(PGD) − acc(FGSM) ≤ 0 (fail > {fail_above:g})"
    if worst is None:
        return Check(
            "iterative_beats_single_step",
            "pass",
            None,
            threshold,
            "no FGSM/PGD pair with the same norm to compare",
        )
    status: Status = "pass" if worst <= 1e-12 else ("warn" if worst <= fail_above else "fail")
    detail = (
        where
        if worst > 1e-12
        else f"{', '.join(sorted(set(pairs)))}: the iterative attack at least as strong as FGSM "
        "at every ε"
    )
    return Check("iterative_beats_single_step", status, worst, threshold, detail)


def check_step_budget(settings: dict[str, Any]) -> Check:
    """PGD's ``step_size × steps`` must be at least ε, or iterates cannot reach the ball's edge.

    Value: the smallest ``step_size·steps / ε_max`` over the PGD attacks (the default step
    ``2.5·ε/steps`` gives 2.5).
    """
    eps_values = [float(e) for e in settings.get("eps", []) if float(e) > 0]
    threshold = "step_size·steps ≥ ε_max"
    pgds = [c for c in attack_configs(settings).values() if c.name == "pgd"]
    if not pgds or not eps_values:
        return Check("pgd_step_budget", "pass", None, threshold, "no PGD attack with ε > 0")
    eps_max = max(eps_values)
    ratios = {
        c.title: (2.5 if c.step_size is None else c.step_size * c.steps / eps_max) for c in pgds
    }
    title = min(ratios, key=lambda t: ratios[t])
    ratio = ratios[title]
    config = next(c for c in pgds if c.title == title)
    reach = (
        f"default step 2.5·ε/{config.steps}"
        if config.step_size is None
        else f"{config.steps} steps of {config.step_size:g} travel "
        f"{config.step_size * config.steps:g}"
    )
    if ratio < 1:
        detail = f"{title}: {reach} < ε_max = {eps_max:g}; raise steps or step_size"
        return Check("pgd_step_budget", "fail", ratio, threshold, detail)
    return Check(
        "pgd_step_budget",
        "pass",
        ratio,
        threshold,
        f"{title}: {reach}, enough for ε_max = {eps_max:g}",
    )


def _group_a(results: pd.DataFrame, settings: dict[str, Any]) -> list[Check]:
    _check_results(results)
    return [
        check_monotone(results),
        check_iterative_stronger(results, settings),
        check_step_budget(settings),
    ]


def checks_from_results(results: pd.DataFrame, settings: dict[str, Any]) -> pd.DataFrame:
    """The checks that need only ``results.csv`` and ``settings.json`` (no model)."""
    return checks_frame(_group_a(results, settings))


def _check_results(results: pd.DataFrame) -> None:
    missing = {"model", "attack", "norm", "eps", "accuracy"} - set(results.columns)
    if missing:
        raise RobustkitError(
            f"results frame lacks the columns {sorted(missing)}: pass the "
            "frame of results.csv written by robustkit attack"
        )


# --------------------------------------------------------------------------- group (b)


def _robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: AttackConfig,
    eps: float,
    seed: int,
    **changes: Any,
) -> float:
    """Accuracy under an untargeted run of iterative ``attack`` (with ``changes``) at ``eps``."""
    return 1.0 - float(_broken(model, x, y, attack, eps, seed, **changes).float().mean())


def _broken(model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, eps: float, seed: int,
            **changes: Any) -> Tensor:
    """Per-sample success ``[N]`` of an untargeted run of iterative ``attack`` at ``eps``."""
    config = dataclasses.replace(attack, **changes)
    if config.bpda is not None:
        model = with_bpda(model, config.bpda)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    if config.name == "apgd":
        return apgd(model, x, y, eps=eps, norm=config.norm, steps=config.steps,
                    loss=config.loss, restarts=config.restarts,
                    random_start=config.random_start, generator=generator).success
    result = pgd(
        model,
        x,
        y,
        eps=eps,
        norm=config.norm,
        steps=config.steps,
        step_size=config.step_size,
        loss=config.loss,
        restarts=config.restarts,
        random_start=config.random_start,
        generator=generator,
    )
    return result.success


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def check_large_eps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: AttackConfig,
    *,
    seed: int = 0,
    fail_above: float = 0.05,
) -> Check:
    """At L∞ ε = 1 every image is reachable, so PGD must drive accuracy to ≈ 0.

    At ε = 0.5 every input can become the uniform grey image, so at most the samples whose
    label is the model's class for grey can survive; more than that (+ 0.05) warns.
    Value: accuracy at ε = 1.
    """
    linf = dataclasses.replace(
        attack, name="pgd", norm="linf", step_size=None, steps=min(attack.steps, 50), targeted=False
    )
    acc_half = _robust_accuracy(model, x, y, linf, 0.5, seed)
    acc_one = _robust_accuracy(model, x, y, linf, 1.0, seed)
    with attack_mode(model), torch.no_grad():
        grey_class = int(model(torch.full_like(x[:1], 0.5)).argmax(1)[0])
    bound = float((y == grey_class).float().mean())
    detail = (
        f"PGD-{linf.steps} accuracy {acc_half:.3f} at ε=0.5 (grey-image bound "
        f"{bound:.3f}), {acc_one:.3f} at ε=1 on {len(y)} samples"
    )
    threshold = f"acc(ε=1) ≤ {fail_above:g}, acc(ε=0.5) ≤ grey bound + 0.05"
    if acc_one > fail_above:
        status: Status = "fail"
        detail += ": the attack cannot even reach images it is allowed to; gradients are masked"
    elif acc_half > bound + 0.05:
        status = "warn"
        detail += ": at ε=0.5 the attack misses the grey image that lies in every ε-ball"
    else:
        status = "pass"
    return Check("accuracy_at_large_eps", status, acc_one, threshold, detail)


def check_noise_vs_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: AttackConfig,
    eps: float,
    *,
    draws: int = 10,
    seed: int = 0,
) -> Check:
    """Random noise of the same ε must break far fewer samples than the attack.

    Noise: ``draws`` uniform draws from the ε-ball, a sample counts as broken if any draw breaks
    it. Value: ``drop(noise) / drop(attack)`` with ``drop = clean accuracy − accuracy``: 0 when
    noise breaks nothing; above 0.5 warns, 1 or more (noise as strong as the attack) fails.
    """
    with attack_mode(model):
        clean = _accuracy(model, x, y)
        generator = torch.Generator(device=x.device).manual_seed(seed + 7919)
        survived = torch.ones(len(y), dtype=torch.bool, device=x.device)
        with torch.no_grad():
            for _ in range(draws):
                u = random_unit_ball(
                    x.shape, attack.norm, generator, device=x.device, dtype=x.dtype
                )
                x_noisy = torch.clamp(x + eps * u, 0.0, 1.0)
                survived &= model(x_noisy).argmax(1) == y
        noise_acc = float(survived.float().mean())
    name = attack.name if attack.name in ITERATIVE else "pgd"
    attack_acc = _robust_accuracy(model, x, y, attack, eps, seed, name=name, targeted=False)
    drop_attack, drop_noise = clean - attack_acc, clean - noise_acc
    threshold = "drop(noise) / drop(attack) ≤ 0.5 (fail ≥ 1)"
    detail = (
        f"at ε={eps:g}: clean {clean:.3f}, {draws} random {attack.norm} draws "
        f"{noise_acc:.3f}, {name.upper()}-{attack.steps} {attack_acc:.3f}"
    )
    if drop_attack <= 0:
        status: Status = "fail" if drop_noise > 0 else "warn"
        return Check(
            "noise_weaker_than_attack",
            status,
            None,
            threshold,
            detail
            + (
                ": the attack changes no prediction at the largest ε"
                + ("; random noise does" if drop_noise > 0 else "")
            ),
        )
    ratio = max(0.0, drop_noise) / drop_attack
    if ratio >= 1:
        status = "fail"
        detail += ": random noise is as strong as the attack; its gradients do not help"
    elif ratio > 0.5:
        status = "warn"
        detail += ": random noise does more than half the attack's damage"
    else:
        status = "pass"
    return Check("noise_weaker_than_attack", status, ratio, threshold, detail)


def check_convergence(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: AttackConfig,
    eps: float,
    *,
    seed: int = 0,
    step_factor: int = 2,
    restarts: int = 5,
    apgd_steps: int = 100,
    warn_above: float = 0.02,
    fail_above: float = 0.05,
) -> Check:
    """Twice the steps, more random restarts, or (for PGD) APGD may lower accuracy only a little.

    Value: the largest drop below the configured attack's accuracy. A larger drop means the
    reported numbers come from an attack that has not converged. Fixed-step PGD can stall where
    neither more steps nor more restarts help; APGD's adaptive step (one start, at least
    ``apgd_steps`` steps) exposes that.
    """
    base = dataclasses.replace(
        attack, name=attack.name if attack.name in ITERATIVE else "pgd", targeted=False
    )
    more_restarts = max(restarts, base.restarts + 1)
    acc = _robust_accuracy(model, x, y, base, eps, seed)
    acc_steps = _robust_accuracy(model, x, y, base, eps, seed, steps=base.steps * step_factor)
    acc_restarts = _robust_accuracy(model, x, y, base, eps, seed, restarts=more_restarts)
    stronger = {f"{base.steps * step_factor} steps": acc_steps,
                f"{more_restarts} restarts": acc_restarts}
    if base.name == "pgd":
        steps = max(apgd_steps, base.steps)
        stronger[f"APGD-{steps}"] = _robust_accuracy(
            model, x, y, base, eps, seed, name="apgd", steps=steps, restarts=1, step_size=None)
    drop = max(0.0, acc - min(stronger.values()))
    detail = (
        f"at ε={eps:g} on {len(y)} samples: {base.name.upper()}-{base.steps}×{base.restarts} "
        f"{acc:.3f}, " + ", ".join(f"{name} {value:.3f}" for name, value in stronger.items())
    )
    status = _grade(drop, warn_above, fail_above)
    if status != "pass":
        detail += ": the attack has not converged; report the stronger setting"
    return Check(
        "attack_converged", status, drop, f"drop ≤ {warn_above:g} (fail > {fail_above:g})", detail
    )


def check_monotone_from_scratch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: AttackConfig,
    eps: Sequence[float],
    *,
    seed: int = 0,
    fail_above: float = 0.02,
) -> Check:
    """Accuracy under ``attack`` run from scratch at each ε (no example reused) must not rise.

    The sweep's ε-monotone reuse makes its own curve monotone by construction, so this check
    re-attacks the checks' samples independently at every swept ε. A rise means the attack
    finds fewer examples in a larger ball, which it contains: its step size, start or
    gradients fail at large ε (masking that only shows there). Grading as
    :func:`check_monotone`.
    """
    base = dataclasses.replace(
        attack, name=attack.name if attack.name in ITERATIVE else "pgd", targeted=False
    )
    swept = sorted({0.0, *(float(e) for e in eps)})
    with attack_mode(model):
        clean = _accuracy(model, x, y)
    acc = [clean] + [_robust_accuracy(model, x, y, base, e, seed) for e in swept[1:]]
    worst, where = _largest_rise([(f"{base.title} from scratch", swept, acc)])
    passed = (f"{base.title} from scratch at each ε on {len(y)} samples: "
              + ", ".join(f"{a:.3f}" for a in acc) + " (the sweep reuses examples across ε, "
              "which makes its own curve monotone by construction)")
    return _monotone_check(worst, where and f"{where} on {len(y)} samples", fail_above, passed)


#: The finding of :func:`check_gradient_free` when it fails or warns.
MASKING_SUSPECTED = ("gradient masking suspected: a gradient-free attack beats the gradient "
                     "attacks on {k} of {m} samples")


def check_gradient_free(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: AttackConfig,
    eps: float,
    *,
    seed: int = 0,
    budget: int = 1000,
    warn_above: float = 0.01,
    fail_above: float = 0.05,
) -> Check:
    """Square (gradient-free) on the samples the strongest gradient attack leaves robust at ε.

    Gradients that carry no information (a non-differentiable input step, saturated logits,
    noise) make every gradient attack fail while the model is not robust; a score-based
    random search does not need them (Carlini et al., 2019, §5; AutoAttack's Square).
    Value: ``K / M``, the fraction of the ``M`` samples the gradient attack left robust that
    Square (``budget`` queries) breaks; above ``warn_above`` warns, above ``fail_above`` fails.
    """
    name = attack.name if attack.name in ITERATIVE else "pgd"
    config = dataclasses.replace(attack, name=name, targeted=False)
    robust = ~_broken(model, x, y, config, eps, seed)
    threshold = f"broken by Square ≤ {warn_above:g} of the robust (fail > {fail_above:g})"
    survivors = robust.nonzero().squeeze(1)
    label = f"{name.upper()}-{config.steps}×{config.restarts} {config.loss}"
    if survivors.numel() == 0:
        return Check("gradient_free_finds_no_more", "pass", 0.0, threshold,
                     f"at ε={eps:g}: {label} leaves no sample robust; nothing to test")
    generator = torch.Generator(device=x.device).manual_seed(seed + 104_729)
    found = square(model, x[survivors], y[survivors], eps=eps, norm=attack.norm, budget=budget,
                   generator=generator).success
    k, m = int(found.sum()), int(survivors.numel())
    fraction = k / m
    detail = (f"at ε={eps:g}: {label} leaves {m} of {len(y)} samples robust; Square "
              f"({budget} queries) breaks {k} of them")
    status = _grade(fraction, warn_above, fail_above)
    if status != "pass":
        detail = MASKING_SUSPECTED.format(k=k, m=m) + f" ({detail})"
    return Check("gradient_free_finds_no_more", status, fraction, threshold, detail)


def check_gradients(
    model: nn.Module, x: Tensor, y: Tensor, *, warn_above: float = 0.01, fail_above: float = 0.1
) -> Check:
    """The fraction of samples whose cross-entropy input gradient is zero or not finite.

    Zero gradients (a non-differentiable step such as rounding, saturated probabilities) leave a
    gradient attack nothing to follow; NaN/inf ones derail it. A row counts as zero when the
    attacks' own steepest-ascent step (:func:`~robustkit.attacks.steepest_step`, L∞ or L2)
    vanishes for it, or when all its values are subnormal.
    """
    with attack_mode(model):
        x_in = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_in), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_in, allow_unused=True)
    if grad is None:
        fraction, zero, bad = 1.0, len(y), 0
    else:
        flat = grad.flatten(1)
        finite = torch.isfinite(flat).all(1)
        tiny = torch.finfo(flat.dtype).tiny
        vanishes = [(steepest_step(flat, norm) == 0).all(1) for norm in NORMS]
        zeros = finite & ((flat.abs().amax(1) < tiny) | torch.stack(vanishes).any(0))
        zero, bad = int(zeros.sum()), int((~finite).sum())
        fraction = (zero + bad) / len(y)
    detail = f"{zero} of {len(y)} samples have a zero input gradient, {bad} a non-finite one"
    status = _grade(fraction, warn_above, fail_above)
    if status != "pass":
        detail += ": gradients are masked; gradient attacks overstate robustness"
    return Check(
        "input_gradients_usable",
        status,
        fraction,
        f"fraction ≤ {warn_above:g} (fail > {fail_above:g})",
        detail,
    )


def check_logits(model: nn.Module, x: Tensor) -> Check:
    """The outputs must be logits ``[N, K]``: finite, and not rows of probabilities.

    Value: the fraction of rows that look like probability vectors (in [0, 1], summing to 1).
    Log-probabilities pass: cross-entropy treats them exactly like logits.
    """
    threshold = "no probability rows, all finite"
    with attack_mode(model), torch.no_grad():
        out = model(x)
    problem = _shape_problem(out, len(x))
    if problem:
        return Check("outputs_are_logits", "fail", None, threshold, problem)
    out = out.double()
    if not bool(torch.isfinite(out).all()):
        rows = int((~torch.isfinite(out).all(1)).sum())
        return Check(
            "outputs_are_logits",
            "fail",
            None,
            threshold,
            f"{rows} of {len(out)} output rows hold nan or inf",
        )
    sums = out.sum(1)
    probs = (out >= 0).all(1) & (out <= 1).all(1) & ((sums - 1).abs() < 1e-3)
    fraction = float(probs.double().mean())
    if fraction > 0.5:
        return Check(
            "outputs_are_logits",
            "fail",
            fraction,
            threshold,
            "the outputs are probabilities (rows in [0, 1] summing to 1): remove the "
            "final softmax; attacks on probabilities mask gradients",
        )
    unit = float(((out >= 0).all(1) & (out <= 1).all(1)).double().mean())
    if unit > 0.5:
        return Check(
            "outputs_are_logits",
            "warn",
            fraction,
            threshold,
            f"{unit:.0%} of the output rows lie in [0, 1] without summing to 1: they look like "
            "per-class sigmoid probabilities; remove the final sigmoid (attacks on squashed "
            "outputs see vanishing gradients)",
        )
    log_probs = bool((out <= 1e-6).all() and (out.logsumexp(1).abs() < 1e-3).all())
    detail = (
        "log-probabilities, which cross-entropy treats as logits"
        if log_probs
        else f"logits with values in [{float(out.min()):.3g}, {float(out.max()):.3g}]"
    )
    return Check("outputs_are_logits", "pass", fraction, threshold, detail)


def _shape_problem(out: Any, n: int) -> str | None:
    """Why ``out`` is not an ``[n, K ≥ 2]`` float tensor, or None."""
    if not isinstance(out, Tensor):
        return f"the model returns a {type(out).__name__}, not a logits tensor [N, K]"
    if out.dim() != 2 or out.shape[0] != n or out.shape[1] < 2 or not out.is_floating_point():
        return f"the model returns a {out.dtype} tensor {list(out.shape)}, not logits [{n}, K]"
    return None


def check_deterministic(
    model: nn.Module, x: Tensor, rtol: float = 1e-5, random_above: float = 1e-3
) -> Check:
    """Two forward passes in eval mode must agree; a random model needs EOT-style attacks.

    Value: the largest absolute difference between the two passes' outputs. Differences up to
    ``random_above·max(1, |z|)`` (non-deterministic kernels) warn; larger ones, or changed
    predictions, fail.
    """
    with attack_mode(model), torch.no_grad():
        first, second = model(x), model(x)
    diff = float((first.double() - second.double()).abs().max())
    scale = max(1.0, float(first.double().abs().max()))
    threshold = f"max |Δ| ≤ {rtol:g}·max(1, |z|) (fail > {random_above:g}·max(1, |z|))"
    changed = int((first.argmax(1) != second.argmax(1)).sum())
    if changed or not math.isfinite(diff) or diff > random_above * scale:
        return Check(
            "forward_deterministic",
            "fail",
            diff,
            threshold,
            f"outputs differ by up to {diff:.3g} and {changed} of {len(x)} predictions "
            "change between two identical eval-mode passes: the model is random; "
            "attack it with EOT (eot_samples = K in [[attacks]], --eot-samples K) or remove "
            "the randomness",
        )
    if diff > rtol * scale:
        return Check(
            "forward_deterministic",
            "warn",
            diff,
            threshold,
            f"outputs differ by up to {diff:.3g} between two identical passes "
            "(non-deterministic kernels?); predictions agree",
        )
    return Check(
        "forward_deterministic",
        "pass",
        diff,
        threshold,
        f"two eval-mode passes over {len(x)} samples agree",
    )


def check_batch_independent(model: nn.Module, x: Tensor, k: int | None = None) -> Check:
    """A sample's output must not depend on the rest of its batch: the logits of ``x[:k]`` in
    two eval-mode batches of ``len(x)`` images that differ after position ``k``
    (:func:`~robustkit.models.loading.same_size_batches`).

    A model that normalises with batch statistics (BatchNorm in a ``torch.export`` program or
    traced TorchScript saved in train mode, where ``eval()`` changes nothing) predicts
    differently when early stopping shrinks the batch, so no reported number is reproducible
    and attacks see a different function from the one judged. Value: the largest absolute
    difference; beyond float noise (``1e-4·max(1, |z|)``) or a changed prediction fails.
    """
    k = max(1, len(x) // 4) if k is None else k
    with attack_mode(model):
        whole, part = same_size_batches(model, x, k)
    diff = float((whole.double() - part.double()).abs().max())
    changed = int((whole.argmax(1) != part.argmax(1)).sum())
    threshold = f"max |Δ| ≤ {BATCH_TOLERANCE:g}·max(1, |z|), no prediction changes"
    if batch_dependent(whole, part):
        return Check(
            "batch_independent", "fail", diff, threshold,
            f"the first {k} samples' outputs differ by up to {diff:.3g} between two batches "
            f"of {len(x)} that differ elsewhere, and {changed} predictions change: the model "
            "uses batch statistics (train-mode BatchNorm?); every figure depends on the batch, "
            "export "
            "the model after model.eval()",
        )
    return Check("batch_independent", "pass", diff, threshold,
                 f"the first {k} samples agree in two batches of {len(x)} that differ elsewhere")


# --------------------------------------------------------------------------- all together


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
    from scratch at each ε (:func:`check_monotone_from_scratch`) instead of reading a curve
    that is monotone by construction.
    ``progress`` shows a bar over the model checks (the slowest phase of a small run).
    """
    checks = _group_a(results, settings)
    if n < 1 or len(split) == 0:
        raise RobustkitError(f"run_checks needs at least one sample, got n={n} of {len(split)}")
    device = _device(model, split.images.device)
    x = split.images[:n].to(device)
    y = split.labels[:n].to(device)
    checks.append(check_logits(model, x))
    with attack_mode(model), torch.no_grad():
        if _shape_problem(model(x[:2]), len(x[:2])):
            return checks_frame(checks)  # not a [N, K] tensor: the other checks cannot run
    attack = main_attack(results, settings)
    eps = _sweep_eps(results, settings)
    eps_max = max(eps) if eps else 0.3
    if shortcuts and eps:
        checks[0] = check_monotone_from_scratch(model, x, y, attack, eps, seed=seed)
    model_checks: list[Callable[[], Check]] = [
        lambda: check_deterministic(model, x),
        lambda: check_batch_independent(model, x),
        lambda: check_gradients(model, x, y),
        lambda: check_large_eps(model, x, y, attack, seed=seed),
        lambda: check_noise_vs_attack(model, x, y, attack, eps_max, seed=seed),
        lambda: check_convergence(model, x, y, attack, convergence_eps(results, attack, eps),
                                  seed=seed),
        lambda: check_gradient_free(model, x, y, attack, convergence_eps(results, attack, eps),
                                    seed=seed),
    ]
    with Bar("sanity checks", len(model_checks), progress) as bar:
        for run_check in model_checks:
            checks.append(run_check())
            bar.advance(1, checks[-1].name)
    return checks_frame(checks)


#: Attacks with a gradient-free stage: a failing gradient-free check does not discredit them.
GRADIENT_FREE = ("square", "autoattack")
#: The mark put next to a number that a failing check makes unreliable.
UNRELIABLE = "(unreliable)"


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
    free = {t for t in titles if _attack_kind(t, configs)[0] in GRADIENT_FREE}
    if set(failed) == {"gradient_free_finds_no_more"} and free:
        free.add(ANY)
    else:
        free = set()
    return {t: reason for t in titles if t not in free}


def worst_status(frame: pd.DataFrame) -> Status:
    """The worst status of a checks frame: fail > warn > pass."""
    statuses = set(frame["status"]) if len(frame) else set()
    if "fail" in statuses:
        return "fail"
    return "warn" if "warn" in statuses else "pass"
