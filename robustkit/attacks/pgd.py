"""Projected Gradient Descent with random restarts (Madry et al., 2018).

For each restart ``r`` the attacker starts from ``δ₀ = ε·u`` (``u`` in the unit ball, or ``0``
without a random start) and iterates projected steepest ascent on the objective ``L``
(:func:`~robustkit.attacks.losses.adversarial_loss`)::

    δ_{t+1} = Π_{B_ε ∩ box}(δ_t + α · s(∇_δ L(x + δ_t, y))),     t = 0, …, T−1

with ``s`` the steepest-ascent direction of the norm
(:func:`~robustkit.attacks.norms.steepest_step`), ``Π`` the projection onto the ε-ball
followed by clamping ``x + δ`` into ``[0, 1]``, and
``α = 2.5·ε/T`` by default.

Worst case kept per sample: the clean point ``x`` and every iterate ``x + δ_t`` (``t = 0 … T``) of
every restart are candidates. A sample's returned ``x_adv`` is the FIRST candidate found that is
adversarial; if none is, it is the candidate with the highest objective. Restarts only run on
samples not yet broken, so more restarts never raise robust accuracy. With ``early_stop`` a
sample also leaves the batch within a restart as soon as it is broken.

Returns an :class:`~robustkit.attacks.base.AttackResult`; ``grad_evals`` counts the per-sample
gradients computed (the forward-only checks of the clean point and final iterate are not counted).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustkit.attacks.base import (
    AttackResult,
    EarlyStop,
    WorstCase,
    as_eps,
    check_inputs,
    check_labels,
    clip_box,
    compaction_interval,
    per_sample,
)
from robustkit.attacks.iterative import StartNoise, check_count, probe, with_restarts
from robustkit.attacks.losses import check_loss
from robustkit.attacks.norms import LP_NORMS, check_norm, project, steepest_step
from robustkit.attacks.transforms import EOT
from robustkit.budgets import default_step_size
from robustkit.vocabulary import Loss, Norm


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    norm: Norm = "linf",
    steps: int = 40,
    step_size: float | Tensor | None = None,
    loss: Loss = "ce",
    restarts: int = 1,
    random_start: bool = True,
    targeted: bool = False,
    labels: Tensor | None = None,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
    start_noise: StartNoise | None = None,
    compact_every: int | None = None,
    eot: EOT | None = None,
) -> AttackResult:
    """PGD attack within ``‖x_adv − x‖ ≤ ε`` (``norm`` ∈ {"linf", "l2"}) and ``x_adv ∈ [0, 1]``.

    Args:
        eps: budget in pixel units, float or per-sample ``[N]``; ``ε = 0`` rows return ``x``.
        steps: gradient steps ``T`` per restart.
        step_size: ``α``; float or ``[N]``; default ``2.5·ε/T`` per sample.
        loss: ``"ce"``, ``"margin"`` or ``"dlr"`` (see :mod:`robustkit.attacks.losses`).
        restarts: number of starts; each runs only on samples not yet broken. Without
            ``random_start`` all starts would be identical, so only one is run.
        targeted: ``y`` holds target classes and success means ``argmax = y``.
        labels: with ``targeted``, the true classes; success then means ``argmax ≠ labels``
            (misclassified, as AutoAttack judges its targeted attacks), so the worst case is
            the first misclassified iterate, while the objective still pulls towards ``y``.
        early_stop: drop a sample from the batch as soon as it is broken (``False``: every
            sample of a restart runs all ``T`` steps; results are the same, it is a reference).
        generator: RNG for the random start when ``start_noise`` is not given.
        start_noise: ``start_noise(restart)`` → unit-ball noise shaped like ``x``; lets callers
            make the start depend only on (seed, restart, sample), not on batch composition.
        compact_every: with ``early_stop``, drop broken samples every this many steps
            (default: every step on the CPU, every few on CUDA; see
            :func:`~robustkit.attacks.base.compaction_interval`). Results do not depend on it.
        eot: ascend the mean objective over ``eot.samples`` random transformations per step
            (:class:`~robustkit.attacks.transforms.EOT`, which also defines success then).
    """
    check_inputs(x, y)
    check_labels(labels, y, targeted)
    norm = check_norm(norm, LP_NORMS, "pgd")
    kind = check_loss(loss)
    eps_t = as_eps(eps, x, norm)
    check_count(steps, "steps", minimum=0)
    check_count(restarts, "restarts", minimum=1)
    every = compaction_interval(x.device, compact_every)
    if step_size is None:
        alpha = default_step_size(eps_t, max(steps, 1))
    else:
        alpha = per_sample(step_size, x, "step_size")
    # one budget and one step for every row: scalar arithmetic in each step (the same values)
    one_eps = isinstance(eps, (int, float)) and len(x) > 0
    radius = float(eps) if one_eps and norm == "linf" else None
    one_step = (step_size is None and one_eps) or isinstance(step_size, (int, float))
    step = float(alpha[0]) if one_step and len(x) > 0 else None

    def one_start(worst: WorstCase, idx: Tensor, x_i: Tensor, y_i: Tensor, u: Tensor) -> int:
        return _run(
            model, worst, idx, x_i, y_i, eps_t[idx], alpha[idx], u,
            norm=norm, steps=steps, kind=kind, targeted=targeted, early_stop=early_stop,
            every=every, radius=radius, step=step, eot=eot,
        )  # fmt: skip

    return with_restarts(
        model, x, y, eps_t, one_start, kind=kind, targeted=targeted, norm=norm,
        restarts=restarts if random_start else 1, random_start=random_start,
        generator=generator, start_noise=start_noise, labels=labels,
    )  # fmt: skip


def _run(
    model: nn.Module,
    worst: WorstCase,
    idx: Tensor,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    alpha: Tensor,
    u: Tensor,
    *,
    norm: Norm,
    steps: int,
    kind: Loss,
    targeted: bool,
    early_stop: bool,
    every: int = 1,
    radius: float | None = None,
    step: float | None = None,
    eot: EOT | None = None,
) -> int:
    """One restart from ``δ₀ = ε·u`` on the sub-batch ``idx``; return the gradients it computed.

    Every iterate ``t = 0 … T`` is offered to ``worst``; the objective and gradient at iterate
    ``t`` come from one forward/backward pass, the final iterate needs a forward pass only.
    Broken samples leave the batch at the compactions of :class:`EarlyStop` (every ``every``
    steps); until then their later iterates cannot change their (successful) worst case.
    ``radius``, ``step``: the one L∞ budget and the one step size of every row, when there
    is one (scalar arithmetic, the same values as the per-row tensors ``eps`` and ``alpha``).
    """
    stop = EarlyStop(len(idx), x.device, enabled=early_stop, every=every)
    x_cur = clip_box(x + project(eps * u, eps, norm), x)
    low, high = x.clamp(max=0.0), x.clamp(min=1.0)  # the box of clip_box, computed once
    # every x in [+0, 1] (no −0): the box is [0, 1] and a scalar clamp gives the same values
    unit_box = not bool(torch.signbit(x).any()) and bool((x <= 1).all())
    for t in range(steps + 1):
        value, adv, grad = probe(model, x_cur, y, kind, targeted, gradient=t < steps,
                                 truth=worst.truth(idx), eot=eot)
        worst.update(idx, x_cur, value, adv)
        if t == steps:
            break
        keep = stop.after_step(t, adv)
        if keep is not None:
            idx, x, y, eps, alpha, x_cur, grad, low, high = (
                v[keep] for v in (idx, x, y, eps, alpha, x_cur, grad, low, high)
            )
            if idx.numel() == 0:
                break
        ball = eps if radius is None else radius
        length = alpha if step is None else step
        delta = project(x_cur - x + length * steepest_step(grad, norm), ball, norm)
        x_new = x + delta
        x_cur = x_new.clamp(0.0, 1.0) if unit_box else torch.clamp(x_new, min=low, max=high)
    return stop.grad_evals * (eot.samples if eot else 1)
