"""Checks that probe the model: its outputs, its gradients and the evaluation's attack on it.

Each runs on a few hundred samples and fails on a sign that gradient attacks overstate the
model's robustness (masked gradients, probabilities instead of logits, a random or
batch-dependent forward pass) or that the evaluation's attack has not done its job (accuracy
left at a very large ε, noise as damaging as the attack, more steps or a gradient-free attack
finding more).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attack_specs import attack_spec
from robustkit.attacks import (
    NORMS,
    attack_mode,
    random_unit_ball,
    square,
    steepest_step,
)
from robustkit.attacks.losses import logits_problem, probability_rows
from robustkit.attacks.square import SQUARE_NORMS
from robustkit.checks.record import Check, grade
from robustkit.checks.results import ITERATIVE, largest_rise, monotone_check
from robustkit.config import AttackConfig
from robustkit.evaluation import run_attack
from robustkit.models.randomness import (
    AVERAGED_PASSES,
    BATCH_T2_LIMIT,
    BATCH_TOLERANCE,
    Spread,
    batch_effect,
    describe_comparison,
    output_spread,
)
from robustkit.vocabulary import Norm, Status


@dataclass(frozen=True)
class Outcome:
    """What an attack already run left robust at one ε: the per-sample mask ``[N]`` and how
    a check's detail names that attack."""

    robust: Tensor
    label: str

    @property
    def accuracy(self) -> float:
        return float(self.robust.float().mean())


#: The finding of :func:`check_gradient_free_finds_no_more` when it fails or warns.
MASKING_SUSPECTED = ("gradient masking suspected: a gradient-free attack beats the gradient "
                     "attacks on {k} of {m} samples")


#: Offset of the seed of the checks' EOT draws from their seed of random starts.
EOT_SEED_OFFSET = 65_537


def broken(model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, eps: float, seed: int,
            **changes: Any) -> Tensor:
    """Per-sample success ``[N]`` of an untargeted run of iterative ``attack`` at ``eps``, its
    random starts drawn from ``seed``. With ``attack.eot_samples = K`` (a random model attacked
    with EOT), every step averages ``K`` passes and success needs all ``K`` fooled, as in the
    sweep; :func:`~robustkit.checks.runner.run_checks` removes EOT for a deterministic model
    (the checks probe the plain model, not a transformation's threat model)."""
    config = dataclasses.replace(attack, **changes)
    starts = torch.Generator(device=x.device).manual_seed(seed)
    draws = (torch.Generator(device=x.device).manual_seed(seed + EOT_SEED_OFFSET)
             if config.eot_samples is not None else None)
    return run_attack(model, config, x, y, eps, None, starts=starts, generator=draws).success


def _robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, eps: float,
                     seed: int, **changes: Any) -> float:
    """Accuracy under an untargeted run of iterative ``attack`` (with ``changes``) at ``eps``."""
    return 1.0 - float(broken(model, x, y, attack, eps, seed, **changes).float().mean())


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def _untargeted_iterative(attack: AttackConfig) -> AttackConfig:
    """``attack`` as the untargeted PGD or APGD the checks run (PGD for any other attack)."""
    return dataclasses.replace(
        attack, name=attack.name if attack.name in ITERATIVE else "pgd", targeted=False)


# --------------------------------------------------------------------------- the outputs


def check_outputs_are_logits(model: nn.Module, x: Tensor) -> Check:
    """The outputs must be logits ``[N, K]``: finite, and not rows of probabilities.

    Fails on another shape or type, on nan/inf, or when most rows are probability vectors (a
    final softmax: attacks on probabilities mask gradients); warns when most rows lie in
    [0, 1] without summing to 1 (a final per-class sigmoid). Log-probabilities pass:
    cross-entropy treats them exactly like logits. Value: the fraction of probability rows.
    """
    threshold = "no probability rows, all finite"
    with attack_mode(model), torch.no_grad():
        out = model(x)
    problem = logits_problem(out, len(x))
    if problem:
        return Check("outputs_are_logits", "fail", None, threshold, problem)
    out = out.double()
    if not bool(torch.isfinite(out).all()):
        rows = int((~torch.isfinite(out).all(1)).sum())
        return Check("outputs_are_logits", "fail", None, threshold,
                     f"{rows} of {len(out)} output rows hold nan or inf",
                     {"non_finite_rows": rows})
    fraction = float(probability_rows(out).double().mean())
    unit = float(((out >= 0).all(1) & (out <= 1).all(1)).double().mean())
    measurements = {"probability_rows": fraction, "unit_interval_rows": unit}
    if fraction > 0.5:
        return Check("outputs_are_logits", "fail", fraction, threshold,
                     "the outputs are probabilities (rows in [0, 1] summing to 1): remove the "
                     "final softmax; attacks on probabilities mask gradients", measurements)
    if unit > 0.5:
        return Check(
            "outputs_are_logits", "warn", fraction, threshold,
            f"{unit:.0%} of the output rows lie in [0, 1] without summing to 1: they look like "
            "per-class sigmoid probabilities; remove the final sigmoid (attacks on squashed "
            "outputs see vanishing gradients)", measurements)
    log_probs = bool((out <= 1e-6).all() and (out.logsumexp(1).abs() < 1e-3).all())
    detail = (
        "log-probabilities, which cross-entropy treats as logits"
        if log_probs
        else f"logits with values in [{float(out.min()):.3g}, {float(out.max()):.3g}]"
    )
    return Check("outputs_are_logits", "pass", fraction, threshold, detail, measurements)


def check_forward_deterministic(
    model: nn.Module, x: Tensor, rtol: float = 1e-5, random_above: float = 1e-3, *,
    eot: Mapping[str, int] | None = None, plain: Sequence[str] = (),
    spread: Spread | None = None,
) -> Check:
    """Two eval-mode passes over the same batch: do they agree, and if the model is random,
    does the evaluation attack it as a random model must be attacked?

    Value: ``max |z⁽¹⁾ − z⁽²⁾|`` (:func:`~robustkit.models.randomness.output_spread`, or
    ``spread`` when measured already). Up to ``rtol·max(1, |z|)`` passes; up to
    ``random_above·max(1, |z|)`` with the same predictions warns (non-deterministic kernels).
    Beyond that the model is random, and the check states how it was attacked: ``eot`` (the
    evaluation's EOT attacks, title → draws ``K``; each step averages ``K`` passes and success
    needs all ``K`` fooled) passes, unless gradient attacks of the evaluation (``plain``) ran
    on one draw per step, which warns; no EOT attack at all fails (every number would rest on
    single draws of a random function).
    """
    with attack_mode(model):
        spread = spread or output_spread(model, x)
    diff, scale, changed = spread.difference, spread.scale, spread.changed
    threshold = f"max |Δ| ≤ {rtol:g}·max(1, |z|) (random above {random_above:g}·max(1, |z|): EOT)"
    random = changed > 0 or not math.isfinite(diff) or diff > random_above * scale
    measurements = {"max_difference": diff, "scale": scale, "changed_predictions": changed,
                    "random": float(random)}
    seen = (f"outputs differ by up to {diff:.3g} and {changed} of {len(x)} predictions "
            "change between two identical eval-mode passes")
    if random and eot:
        draws = ", ".join(f"{title}: K = {k}" for title, k in eot.items())
        detail = (f"the model is random ({seen}); the evaluation attacks it with EOT ({draws} "
                  "draws per step, success only when all K are fooled), and so do the checks")
        if plain:
            return Check("forward_deterministic", "warn", diff, threshold, detail + "; but "
                         f"{', '.join(plain)} ran on one draw per step: give "
                         f"{'them' if len(plain) > 1 else 'it'} eot_samples too", measurements)
        return Check("forward_deterministic", "pass", diff, threshold, detail, measurements)
    if random:
        return Check("forward_deterministic", "fail", diff, threshold,
                     f"{seen}: the model is random; attack it with EOT (eot_samples = K in "
                     "[[attacks]], --eot-samples K) or remove the randomness", measurements)
    status = grade(diff, rtol * scale, random_above * scale)
    detail = (f"outputs differ by up to {diff:.3g} between two identical passes "
              "(non-deterministic kernels?); predictions agree" if status == "warn"
              else f"two eval-mode passes over {len(x)} samples agree")
    return Check("forward_deterministic", status, diff, threshold, detail, measurements)


def check_batch_independent(model: nn.Module, x: Tensor, k: int | None = None) -> Check:
    """A sample's output must not depend on the rest of its batch: the logits of ``x[:k]`` in
    two eval-mode batches of ``len(x)`` images that differ after position ``k``
    (:func:`~robustkit.models.randomness.batch_effect`).

    A model that normalises with batch statistics (BatchNorm in a ``torch.export`` program or
    traced TorchScript saved in train mode, where ``eval()`` changes nothing) predicts
    differently when early stopping shrinks the batch, so no reported number is reproducible
    and attacks see a different function from the one judged. A random model is compared with
    its randomness held fixed (the same draws in both batches, else the means of several
    passes), so its randomness is not mistaken for batch statistics. Value: the largest
    absolute difference; beyond float noise (``1e-4·max(1, |z|)``) or a changed prediction
    fails (averaged: and ``mean t² > 9``).
    """
    k = max(1, len(x) // 4) if k is None else k
    with attack_mode(model):
        effect = batch_effect(model, x, k)
    held = describe_comparison(effect)
    threshold = (f"max |Δ| ≤ {BATCH_TOLERANCE:g}·max(1, |z|), no prediction changes"
                 + (f" (means of {AVERAGED_PASSES} passes: mean t² ≤ {BATCH_T2_LIMIT:g})"
                    if effect.comparison == "averaged" else ""))
    measurements = {"max_difference": effect.difference, "changed_predictions": effect.changed,
                    "shared": k, "mean_t2": effect.statistic, "random": float(effect.spread.random)}
    where = f"in two batches of {len(x)} that differ elsewhere" + (f", {held}" if held else "")
    if effect.dependent:
        return Check(
            "batch_independent", "fail", effect.difference, threshold,
            f"the first {k} samples' outputs differ by up to {effect.difference:.3g} {where}, "
            f"and {effect.changed} predictions change: the model uses batch statistics "
            "(train-mode BatchNorm?); every figure depends on the batch, export the model "
            "after model.eval()", measurements)
    return Check("batch_independent", "pass", effect.difference, threshold,
                 f"the first {k} samples agree {where}", measurements)


def check_input_gradients_usable(
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
        zero, bad = len(y), 0
    else:
        flat = grad.flatten(1)
        finite = torch.isfinite(flat).all(1)
        tiny = torch.finfo(flat.dtype).tiny
        vanishes = [(steepest_step(flat, norm) == 0).all(1) for norm in NORMS]
        zeros = finite & ((flat.abs().amax(1) < tiny) | torch.stack(vanishes).any(0))
        zero, bad = int(zeros.sum()), int((~finite).sum())
    fraction = (zero + bad) / len(y)
    detail = f"{zero} of {len(y)} samples have a zero input gradient, {bad} a non-finite one"
    status = grade(fraction, warn_above, fail_above)
    if status != "pass":
        detail += ": gradients are masked; gradient attacks overstate robustness"
    return Check("input_gradients_usable", status, fraction,
                 f"fraction ≤ {warn_above:g} (fail > {fail_above:g})", detail,
                 {"zero_gradients": zero, "non_finite_gradients": bad, "samples": len(y)})


# --------------------------------------------------------------------------- the attack


def check_accuracy_at_large_eps(
    model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, *,
    seed: int = 0, fail_above: float = 0.05, max_steps: int = 50,
) -> Check:
    """At L∞ ε = 1 every image is reachable, so PGD must drive accuracy to ≈ 0.

    Accuracy above ``fail_above`` at ε = 1 fails: the attack cannot reach images it is allowed
    to. At ε = 0.5 every input can become the uniform grey image, so at most the samples whose
    label is the model's class for grey can survive; more than that (+ 0.05) warns.
    Value: accuracy at ε = 1. PGD runs at most ``max_steps`` steps (at ε = 1 a handful reach
    any image) on the margin loss, whose gradient does not saturate when the logits are large
    (cross-entropy's vanishes there: that is :func:`check_input_gradients_usable`'s finding,
    not this check's).
    """
    linf = dataclasses.replace(attack, name="pgd", norm="linf", step_size=None, loss="margin",
                               steps=min(attack.steps, max_steps), targeted=False)
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
    return Check("accuracy_at_large_eps", status, acc_one, threshold, detail,
                 {"accuracy_at_1": acc_one, "accuracy_at_0.5": acc_half, "grey_bound": bound})


def _noise_accuracy(model: nn.Module, x: Tensor, y: Tensor, norm: Norm, eps: float, draws: int,
                    seed: int, passes: int = 1) -> float:
    """Accuracy under ``draws`` uniform draws from the ε-ball: a sample survives only if every
    draw leaves it correct. A random model (``passes = K``, its EOT draws) is judged as the
    EOT attack is: a draw breaks a sample only when all ``K`` passes misclassify it."""
    generator = torch.Generator(device=x.device).manual_seed(seed + 7919)
    survived = torch.ones(len(y), dtype=torch.bool, device=x.device)
    with torch.no_grad():
        for _ in range(draws):
            u = random_unit_ball(x.shape, norm, generator, device=x.device, dtype=x.dtype)
            survived &= ~_fooled_every_draw(model, torch.clamp(x + eps * u, 0.0, 1.0), y, passes)
    return float(survived.float().mean())


def check_noise_weaker_than_attack(
    model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, eps: float, *,
    draws: int = 10, seed: int = 0, known: Outcome | None = None,
) -> Check:
    """Random noise of the same ε must break far fewer samples than the attack.

    Noise: ``draws`` uniform draws from the ε-ball, a sample counts as broken if any draw breaks
    it. Value: ``drop(noise) / drop(attack)`` with ``drop = clean accuracy − accuracy``: 0 when
    noise breaks nothing; above 0.5 warns, 1 or more (noise as strong as the attack: its
    gradients do not help) fails. An attack that changes nothing warns, or fails when noise
    does change predictions. ``known``: the attack's outcome at ``eps``, when already run.
    With ``attack.eot_samples = K`` (a random model) noise is judged as the attack is (all
    ``K`` passes fooled).
    """
    with attack_mode(model):
        clean = _accuracy(model, x, y)
        noise_acc = _noise_accuracy(model, x, y, attack.norm, eps, draws, seed,
                                    attack.eot_samples or 1)
    config = _untargeted_iterative(attack)
    if known is None:
        attack_acc, label = (_robust_accuracy(model, x, y, config, eps, seed),
                             f"{config.name.upper()}-{attack.steps}")
    else:
        attack_acc, label = known.accuracy, known.label
    drop_attack, drop_noise = clean - attack_acc, clean - noise_acc
    threshold = "drop(noise) / drop(attack) ≤ 0.5 (fail ≥ 1)"
    detail = (
        f"at ε={eps:g}: clean {clean:.3f}, {draws} random {attack.norm} draws "
        f"{noise_acc:.3f}, {label} {attack_acc:.3f}"
    )
    measurements = {"eps": eps, "clean_accuracy": clean, "noise_accuracy": noise_acc,
                    "attack_accuracy": attack_acc}
    if drop_attack <= 0:
        detail += ": the attack changes no prediction at the largest ε"
        if drop_noise > 0:
            detail += "; random noise does"
        return Check("noise_weaker_than_attack", "fail" if drop_noise > 0 else "warn", None,
                     threshold, detail, measurements)
    ratio = max(0.0, drop_noise) / drop_attack
    status = grade(ratio, 0.5, 1.0, fail_at_limit=True)
    if status == "fail":
        detail += ": random noise is as strong as the attack; its gradients do not help"
    elif status == "warn":
        detail += ": random noise does more than half the attack's damage"
    return Check("noise_weaker_than_attack", status, ratio, threshold, detail, measurements)


def check_attack_converged(
    model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, eps: float, *,
    seed: int = 0, step_factor: int = 2, restarts: int = 5, apgd_steps: int = 100,
    warn_above: float = 0.02, fail_above: float = 0.05, known: Outcome | None = None,
    stronger: Outcome | None = None,
) -> Check:
    """Twice the steps, more random restarts, or (for PGD) APGD may lower accuracy only a little.

    Value: the largest drop below the configured attack's accuracy. A larger drop means the
    reported numbers come from an attack that has not converged. Fixed-step PGD can stall where
    neither more steps nor more restarts help; APGD's adaptive step (one start, at least
    ``apgd_steps`` steps) exposes that.

    ``known`` and ``stronger``: the attack's outcome at ``eps`` and that of a stronger attack
    on top of it, both already run (the quick checks: the evaluation's own outcome, and APGD
    on the samples it left robust, :func:`strengthen`); nothing runs here then.
    """
    base = _untargeted_iterative(attack)
    if known is not None and stronger is not None:
        acc, label = known.accuracy, known.label
        variants = {stronger.label: stronger.accuracy}
        measurements = {"eps": eps, "accuracy": acc, "accuracy_stronger": stronger.accuracy}
    else:
        acc, variants, measurements = _stronger_from_scratch(
            model, x, y, base, eps, seed, step_factor, max(restarts, base.restarts + 1),
            apgd_steps)
        label = f"{base.name.upper()}-{base.steps}×{base.restarts}"
    drop = max(0.0, acc - min(variants.values()))
    detail = (
        f"at ε={eps:g} on {len(y)} samples: {label} "
        f"{acc:.3f}, " + ", ".join(f"{name} {value:.3f}" for name, value in variants.items())
    )
    status = grade(drop, warn_above, fail_above)
    if status != "pass":
        detail += ": the attack has not converged; report the stronger setting"
    return Check("attack_converged", status, drop,
                 f"drop ≤ {warn_above:g} (fail > {fail_above:g})", detail, measurements)


def _stronger_from_scratch(
    model: nn.Module, x: Tensor, y: Tensor, base: AttackConfig, eps: float, seed: int,
    step_factor: int, restarts: int, apgd_steps: int,
) -> tuple[float, dict[str, float], dict[str, float]]:
    """The configured attack, and it with more steps, more restarts and (PGD) APGD, each run on
    every sample: (accuracy, stronger settings' accuracies, measurements)."""
    acc = _robust_accuracy(model, x, y, base, eps, seed)
    acc_steps = _robust_accuracy(model, x, y, base, eps, seed, steps=base.steps * step_factor)
    acc_restarts = _robust_accuracy(model, x, y, base, eps, seed, restarts=restarts)
    stronger = {f"{base.steps * step_factor} steps": acc_steps,
                f"{restarts} restarts": acc_restarts}
    measurements = {"eps": eps, "accuracy": acc, "accuracy_more_steps": acc_steps,
                    "accuracy_more_restarts": acc_restarts}
    if "step_size" in attack_spec(base.name).options:  # a fixed step can stall; APGD's adapts
        steps = max(apgd_steps, base.steps)
        acc_apgd = _robust_accuracy(model, x, y, base, eps, seed, name="apgd", steps=steps,
                                    restarts=1, step_size=None)
        stronger[f"APGD-{steps}"] = measurements["accuracy_apgd"] = acc_apgd
    return acc, stronger, measurements


def strengthen(model: nn.Module, x: Tensor, y: Tensor, known: Outcome, eps: float, *,
               norm: Norm, seed: int, steps: int, eot_samples: int | None = None) -> Outcome:
    """``known`` made stronger: APGD-``steps`` (CE, one start, in ``norm``; with EOT over
    ``eot_samples`` draws for a random model) run on the samples ``known`` left robust at
    ``eps``; robust = robust to both."""
    survivors = known.robust.to(x.device).nonzero().squeeze(1)
    robust = known.robust.clone()
    if survivors.numel():
        config = AttackConfig(name="apgd", norm=norm, steps=steps, eot_samples=eot_samples)
        hit = broken(model, x[survivors], y[survivors], config, eps, seed)
        robust[survivors[hit].cpu()] = False
    return Outcome(robust, f"APGD-{steps} on the {survivors.numel()} left")


def check_accuracy_monotone_in_eps_from_scratch(
    model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, eps: Sequence[float], *,
    seed: int = 0, fail_above: float = 0.02, max_steps: int | None = None,
) -> Check:
    """Accuracy under ``attack`` run from scratch at each ε (no example reused) must not rise.

    The sweep's ε-monotone reuse makes its own curve monotone by construction, so this check
    re-attacks the checks' samples independently at every swept ε. A rise means the attack
    finds fewer examples in a larger ball, which it contains: its step size, start or
    gradients fail at large ε (masking that only shows there). Grading as
    :func:`~robustkit.checks.results.check_accuracy_monotone_in_eps`. ``max_steps`` caps the
    attack's steps (a rise shows at any budget the attack is run with at every ε).
    """
    base = _untargeted_iterative(attack)
    if max_steps is not None:
        base = dataclasses.replace(base, steps=min(base.steps, max_steps), restarts=1)
    swept = sorted({0.0, *(float(e) for e in eps)})
    with attack_mode(model):
        clean = _accuracy(model, x, y)
    acc = [clean] + [_robust_accuracy(model, x, y, base, e, seed) for e in swept[1:]]
    rise = largest_rise([(f"{base.title} from scratch", swept, acc)])
    passed = (f"{base.title} from scratch at each ε on {len(y)} samples: "
              + ", ".join(f"{a:.3f}" for a in acc) + " (the sweep reuses examples across ε, "
              "which makes its own curve monotone by construction)")
    return monotone_check(rise, fail_above, passed, where=f" on {len(y)} samples")


#: What the gradient-free check is told the gradient attacks left robust: one outcome (a single
#: ε), or the outcome at each ε.
Known = Outcome | Callable[[float], Outcome]


def check_gradient_free_finds_no_more(
    model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, eps: float | Sequence[float],
    *, seed: int = 0, budget: int = 1000, warn_above: float = 0.01, fail_above: float = 0.05,
    known: Known | None = None, least: int = 1, eot_samples: int | None = None,
) -> Check:
    """Square (gradient-free) on the samples the strongest gradient attack leaves robust, at
    every ε of ``eps`` where it leaves at least ``least`` of them (else at the ε where it
    leaves the most).

    Gradients that carry no information (a non-differentiable input step, saturated logits,
    noise) make every gradient attack fail while the model is not robust; a score-based
    random search does not need them (Carlini et al., 2019, §5; AutoAttack's Square). Masking
    can be confined to some budgets (a step that hides the gradient only for small
    perturbations), hence every ε. With ``M_ε`` the samples the gradient attack left robust at
    ε and ``K_ε`` those of them Square breaks within ε (``budget`` queries, the square-size
    schedule stretched over them, ``rescale=True``; an example found at
    a smaller ε lies in every larger ball, so it counts there without a new search), the value
    is ``max_ε K_ε / M_ε``; above ``warn_above`` warns, above ``fail_above`` fails.
    ``known``: the outcome of the gradient attacks already run (the evaluation's strongest, say:
    one :class:`Outcome` for a single ε, or a function of ε); ``attack`` is then not run.
    ``eot_samples``: the model is random, and a Square example counts only when ``K`` fresh
    passes all misclassify it (as an EOT attack's success is judged).
    """
    config = _untargeted_iterative(attack)
    budgets = [float(eps)] if isinstance(eps, (int, float)) else sorted(float(e) for e in eps)
    threshold = f"broken by Square ≤ {warn_above:g} of the robust (fail > {fail_above:g})"
    if attack.norm not in SQUARE_NORMS:
        return Check("gradient_free_finds_no_more", "warn", None, threshold,
                     f"not run: robustkit's Square has no {attack.norm} version, so no "
                     "gradient-free search backs the gradient attacks in this norm",
                     {"eps": max(budgets, default=0.0), "robust": 0, "broken_by_square": 0,
                      "eps_tested": 0})

    def outcome(e: float) -> Outcome:
        if isinstance(known, Outcome):
            return known
        if known is not None:
            return known(e)
        return Outcome(~broken(model, x, y, config, e, seed),
                       f"{config.name.upper()}-{config.steps}×{config.restarts} {config.loss}")

    outcomes = {e: outcome(e) for e in budgets if e > 0}
    tested = _eps_to_search(outcomes, least)
    if not tested:
        where = ", ".join(f"{e:g}" for e in budgets) or "no ε"
        label = next(iter(outcomes.values())).label if outcomes else config.name.upper()
        return Check("gradient_free_finds_no_more", "pass", 0.0, threshold,
                     f"at ε={where}: {label} leaves no sample robust; nothing to test",
                     {"eps": max(budgets, default=0.0), "robust": 0, "broken_by_square": 0,
                      "eps_tested": 0})
    counts = _square_breaks(model, x, y, {e: outcomes[e].robust for e in tested}, attack.norm,
                            budget, seed, eot_samples)
    worst = max(tested, key=lambda e: (counts[e][0] / counts[e][1], e))
    k, m = counts[worst]
    fraction = k / m
    label = outcomes[worst].label
    judged = f"; each example judged by {eot_samples} fresh passes" if eot_samples else ""
    if len(tested) == 1:
        detail = (f"at ε={worst:g}: {label} leaves {m} of {len(y)} samples robust; Square "
                  f"({budget} queries{judged}) breaks {k} of them")
    else:
        detail = (f"at ε = {', '.join(f'{e:g}' for e in tested)}: {label} leaves "
                  f"{', '.join(str(counts[e][1]) for e in tested)} of {len(y)} samples robust; "
                  f"Square ({budget} queries{judged}) breaks "
                  f"{', '.join(str(counts[e][0]) for e in tested)} of them")
    status = grade(fraction, warn_above, fail_above)
    if status != "pass":
        detail = MASKING_SUSPECTED.format(k=k, m=m) + f" at ε={worst:g} ({detail})"
    return Check("gradient_free_finds_no_more", status, fraction, threshold, detail,
                 {"eps": worst, "robust": m, "broken_by_square": k, "eps_tested": len(tested)})


def _eps_to_search(outcomes: dict[float, Outcome], least: int) -> list[float]:
    """The ε where the gradient attacks left at least ``least`` samples robust; else the one
    where they left the most (the smallest of ties); none when they left none anywhere."""
    robust = {e: int(o.robust.sum()) for e, o in outcomes.items()}
    tested = [e for e in outcomes if robust[e] >= least]
    if tested or not robust or not max(robust.values()):
        return tested
    return [max(robust, key=lambda e: (robust[e], -e))]


def _square_breaks(model: nn.Module, x: Tensor, y: Tensor, robust: dict[float, Tensor],
                   norm: Norm, budget: int, seed: int, eot_samples: int | None
                   ) -> dict[float, tuple[int, int]]:
    """ε → (K_ε, M_ε): of the ``M_ε`` samples ``robust[ε]`` marks, how many Square breaks
    within ε, in ascending ε; an example found at a smaller ε counts at every larger one
    without a new search. With ``eot_samples``, an example counts only when that many fresh
    passes of the (random) model all misclassify it."""
    found = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    generator = torch.Generator(device=x.device).manual_seed(seed + 104_729)
    counts: dict[float, tuple[int, int]] = {}
    for e, robust_at_e in robust.items():
        left = robust_at_e.to(x.device)
        search = (left & ~found).nonzero().squeeze(1)
        if search.numel():
            result = square(model, x[search], y[search], eps=e, norm=norm, budget=budget,
                            rescale=True, generator=generator)
            success = result.success
            if eot_samples is not None:
                success = success & _fooled_every_draw(model, result.x_adv, y[search],
                                                       eot_samples)
            found[search[success]] = True
        counts[e] = (int((found & left).sum()), int(left.sum()))
    return counts


@torch.no_grad()
def _fooled_every_draw(model: nn.Module, x: Tensor, y: Tensor, draws: int) -> Tensor:
    """``[N]``: ``argmax ≠ y`` in each of ``draws`` passes of a random model over ``x``."""
    fooled = torch.ones(len(y), dtype=torch.bool, device=x.device)
    with attack_mode(model):
        for _ in range(draws):
            fooled &= model(x).argmax(1) != y
    return fooled
