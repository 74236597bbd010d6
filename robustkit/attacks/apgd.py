"""Auto-PGD (Croce & Hein, 2020): PGD with momentum and a step size that sets itself.

Fixed-step PGD needs its step size and step count tuned per model; too few small steps
overstate robustness. APGD starts with a large step and halves it, per sample, when progress
stalls. With ``P`` the projection onto ``B_ε(x) ∩ [0, 1]^d``, ``s`` the steepest-ascent direction
of the norm (:func:`~robustkit.attacks.norms.steepest_step`), ``a = 0.75`` and ``η⁽⁰⁾ = 2ε``::

    z⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + η⁽ᵏ⁾ · s(∇L(x⁽ᵏ⁾)))
    x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + a·(z⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾) + (1 − a)·(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾))         (x⁽¹⁾ = z⁽¹⁾)

At the checkpoints ``w_j = ⌈p_j·T⌉`` (:func:`checkpoints`) a sample's step is halved, and the
sample moves back to its best point ``x_max`` so far, when since the previous checkpoint

1. the objective rose in fewer than ``ρ = 0.75`` of the steps, or
2. neither its step size nor its best objective ``L_max`` changed.

One choice differs from the paper's algorithm: after moving back to ``x_max`` the momentum term is
reset (``x⁽ᵏ⁻¹⁾ := x_max``), so the next step starts from ``x_max`` and its gradient alone rather
than being pulled towards the iterate just abandoned.

Everything else is shared with :func:`~robustkit.attacks.pgd`: random start ``x⁽⁰⁾ = P(x + ε·u)``,
every iterate is a candidate for the per-sample worst case (first success, else highest
objective), restarts run only on samples not yet broken, early stopping, ``grad_evals``.

``norm="l1"`` runs l1-APGD (Croce & Hein, 2021; :mod:`robustkit.attacks.apgd_l1`): the exact
projection onto the L1 ball ∩ the box, the sparse update with adaptive sparsity, its own step
schedule, and AutoAttack's ε schedule (3ε, 2ε, ε) unless ``l1_schedule`` says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from robustkit.attacks.apgd_l1 import EPS_SCHEDULE, Objective, run_l1
from robustkit.attacks.base import (
    AttackResult,
    EarlyStop,
    WorstCase,
    as_eps,
    check_inputs,
    check_labels,
    clip_box,
    compaction_interval,
)
from robustkit.attacks.iterative import StartNoise, check_count, probe, with_restarts
from robustkit.attacks.losses import check_loss
from robustkit.attacks.norms import check_norm, project, steepest_step
from robustkit.attacks.transforms import EOT
from robustkit.vocabulary import Loss, Norm

#: Weight of the new step against the momentum term (``a`` above).
MOMENTUM_WEIGHT = 0.75
#: Condition 1: the objective must have risen in at least this fraction of a checkpoint window.
RISE_FRACTION = 0.75


def checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ⌈p_j·T⌉ < T``, ``j ≥ 1``, where APGD may halve its step.

    ``p₀ = 0``, ``p₁ = 0.22``, ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``: the windows
    start at 22% of the budget and shrink by 3 points each, down to 6%.
    """
    before, p = 0.0, 0.22
    found: list[int] = []
    while True:
        w = math.ceil(p * steps - 1e-9)  # guard 0.22·100 = 22.000000000000004
        if w >= steps:
            return found
        if w > 0 and (not found or w > found[-1]):
            found.append(w)
        before, p = p, p + max(p - before - 0.03, 0.06)


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    norm: Norm = "linf",
    steps: int = 100,
    loss: Loss = "ce",
    restarts: int = 1,
    random_start: bool = True,
    targeted: bool = False,
    labels: Tensor | None = None,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
    start_noise: StartNoise | None = None,
    compact_every: int | None = None,
    aim: Tensor | None = None,
    eot: EOT | None = None,
    l1_schedule: Sequence[tuple[float, float]] = EPS_SCHEDULE,
) -> AttackResult:
    """APGD within ``‖x_adv − x‖ ≤ ε`` (``norm`` ∈ {"linf", "l2", "l1"}) and ``x_adv ∈ [0, 1]``.

    Arguments as for :func:`~robustkit.attacks.pgd`, except that there is no step size:
    each sample's step starts at ``2ε`` and only ever halves (L1: see
    :mod:`~robustkit.attacks.apgd_l1`). ``aim`` (with ``loss="dlr"``,
    untargeted): one target class per sample for the targeted DLR loss of APGD-T
    (:func:`~robustkit.attacks.apgd_t.apgd_targeted`); success still means ``argmax ≠ y``.
    ``l1_schedule``: L1's phases, (multiple of ε, fraction of the steps) each.
    """
    check_inputs(x, y)
    check_labels(labels, y, targeted)
    norm = check_norm(norm)
    kind = check_loss(loss)
    eps_t = as_eps(eps, x, norm)
    check_count(steps, "steps", minimum=0)
    check_count(restarts, "restarts", minimum=1)
    halve_at = set(checkpoints(steps))
    every = compaction_interval(x.device, compact_every)

    def one_start(worst: WorstCase, idx: Tensor, x_i: Tensor, y_i: Tensor, u: Tensor) -> int:
        if norm == "l1":
            return run_l1(Objective(model, kind, targeted, eot), worst, idx, x_i, y_i,
                          eps_t[idx], u, steps=steps, early_stop=early_stop, every=every,
                          aim=None if aim is None else aim[idx], schedule=l1_schedule)
        return _run(model, worst, idx, x_i, y_i, eps_t[idx], u, norm=norm, steps=steps,
                    halve_at=halve_at, kind=kind, targeted=targeted, early_stop=early_stop,
                    every=every, aim=None if aim is None else aim[idx],
                    eot=eot)

    return with_restarts(
        model, x, y, eps_t, one_start, kind=kind, targeted=targeted, norm=norm,
        restarts=restarts if random_start else 1, random_start=random_start,
        generator=generator, start_noise=start_noise, labels=labels, aim=aim, layout=True,
    )  # fmt: skip


def _run(
    model: nn.Module,
    worst: WorstCase,
    idx: Tensor,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    u: Tensor,
    *,
    norm: Norm,
    steps: int,
    halve_at: set[int],
    kind: Loss,
    targeted: bool,
    early_stop: bool,
    every: int = 1,
    aim: Tensor | None = None,
    eot: EOT | None = None,
) -> int:
    """One APGD run from ``x⁽⁰⁾ = P(x + ε·u)`` on the sub-batch ``idx``; return its gradients.

    Per-sample state: the iterate and the one before it, the step ``η``, the best point ``x_max``
    with its objective and gradient, and for the checkpoint tests the number of rises since the
    last checkpoint and ``(η, L_max)`` as they were there.
    """

    stop, last_checkpoint = EarlyStop(len(idx), x.device, enabled=early_stop, every=every), 0
    x_cur = clip_box(x + project(eps * u, eps, norm), x)
    x_prev = x_cur
    eta = 2 * eps
    best = torch.full((len(idx),), -math.inf, device=x.device, dtype=x.dtype)
    x_best, grad_best = x_cur, torch.zeros_like(x_cur)
    value_before = torch.full_like(best, math.inf)  # no rise counted at t = 0
    rises = torch.zeros(len(idx), device=x.device)
    for t in range(steps + 1):
        value, adv, grad = probe(model, x_cur, y, kind, targeted, gradient=t < steps,
                                 truth=worst.truth(idx), aim=aim, eot=eot)
        worst.update(idx, x_cur, value, adv)
        if t == steps:
            break
        rises += (value > value_before).to(rises.dtype)
        value_before = value
        improved = value > best
        best = torch.where(improved, value, best)
        rows = improved.view(-1, 1, 1, 1)
        x_best = torch.where(rows, x_cur, x_best)
        grad_best = torch.where(rows, grad, grad_best)
        if t == 0:  # the checkpoint w₀ = 0
            eta_then, best_then = eta, best
        keep = stop.after_step(t, adv)
        if keep is not None:
            aim = None if aim is None else aim[keep]
            (idx, x, y, eps, eta, x_cur, x_prev, grad, best, x_best, grad_best, value_before,
             rises, eta_then, best_then) = (
                v[keep] for v in (idx, x, y, eps, eta, x_cur, x_prev, grad, best, x_best,
                                  grad_best, value_before, rises, eta_then, best_then))
            if idx.numel() == 0:
                break
        if t in halve_at:
            stalled = rises < RISE_FRACTION * (t - last_checkpoint)
            unchanged = (eta.view(-1) == eta_then.view(-1)) & (best == best_then)
            halve = (stalled | unchanged).view(-1, 1, 1, 1)
            eta_then, best_then = eta, best
            eta = torch.where(halve, eta / 2, eta)
            x_cur = torch.where(halve, x_best, x_cur)
            x_prev = torch.where(halve, x_best, x_prev)
            grad = torch.where(halve, grad_best, grad)
            rises = torch.zeros_like(rises)
            last_checkpoint = t
        x_prev, x_cur = x_cur, apgd_step(x, x_cur, x_prev, grad, eta, eps, norm, first=t == 0)
    return stop.grad_evals * (eot.samples if eot else 1)


def apgd_step(x: Tensor, x_cur: Tensor, x_prev: Tensor, grad: Tensor, eta: Tensor,
              eps: Tensor, norm: Norm, *, first: bool = False) -> Tensor:
    """``x⁽ᵏ⁺¹⁾`` from ``x⁽ᵏ⁾ = x_cur``, ``x⁽ᵏ⁻¹⁾ = x_prev`` and ``∇L(x⁽ᵏ⁾) = grad``::

        z = P(x⁽ᵏ⁾ + η·s(∇L)),   x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + a·(z − x⁽ᵏ⁾) + (1 − a)·(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾))

    with ``P`` onto ``B_ε(x) ∩ [0, 1]^d``; the ``first`` step is ``z`` itself.
    """

    def into_ball(point: Tensor) -> Tensor:
        return clip_box(x + project(point - x, eps, norm), x)

    z = into_ball(x_cur + eta * steepest_step(grad, norm))
    if first:
        return z
    return into_ball(x_cur + MOMENTUM_WEIGHT * (z - x_cur)
                     + (1 - MOMENTUM_WEIGHT) * (x_cur - x_prev))
