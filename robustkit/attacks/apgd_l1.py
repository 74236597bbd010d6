"""l1-APGD (Croce & Hein, "Mind the box", ICML 2021): APGD in the L1 ball ∩ the [0, 1] box.

The threat set is ``S = {x' : ‖x' − x‖₁ ≤ ε, x' ∈ [0, 1]^d}``. Three things differ from the L∞
and L2 APGD of :mod:`robustkit.attacks.apgd`:

1. **Projection**: ``P_S`` is the exact Euclidean projection onto the intersection
   (:func:`~robustkit.attacks.norms.project_l1_box`), not the ball's projection clamped.
2. **Sparse update**: the L1 steepest-ascent step moves one coordinate, too few; l1-APGD moves
   the ``k`` coordinates with the largest ``|∇L|``, each by ``η/k``
   (:func:`~robustkit.attacks.norms.sparse_step`), without momentum::

       x⁽ᵗ⁺¹⁾ = P_S(x⁽ᵗ⁾ + η⁽ᵗ⁾ · s_k(∇L(x⁽ᵗ⁾)))

3. **Adaptive sparsity and step**: every ``c = max(⌊0.04·T⌋, 1)`` steps, with ``x_max`` the
   best point so far and ``m = ‖x_max − x‖₀`` its sparsity: ``k := m / 1.5``; if ``m`` fell
   below 0.95 of its value at the previous checkpoint the step goes back to ``η = αε`` and the
   run moves back to ``x_max``, else ``η := η / 1.5``; ``η`` stays in ``[αε/10, αε]``, ``α = 1``.
   A run starts with ``k = ‖x⁽⁰⁾ − x‖₀ / 1.5`` (``0.2·d`` from the clean point).

**ε schedule** (what AutoAttack's ``version="standard"`` runs in L1, ``use_largereps``): the
``T`` steps are split into phases at ``3ε``, ``2ε`` and ``ε`` (``⌈0.3T⌉``, ``⌈0.3T⌉`` and the
rest); each phase is a fresh run, with its own checkpoint period ``c``, from the previous
phase's best point projected onto its smaller set. Only the last phase's points lie in ``S``:
only they are candidates for the worst case, and only there does early stopping drop samples.
``schedule=((1.0, 1.0),)`` runs the paper's plain l1-APGD.

The random start: ``x⁽⁰⁾ = P_S(x + √(2/π)·d·u)`` with ``u = r·g/‖g‖₁`` the L1 start noise
(:func:`~robustkit.attacks.norms.random_unit_ball`; ``‖g‖₁ ≈ √(2/π)·d``, so the added noise has
about standard normal entries, as the authors' start ``x + g``), projected onto the first
phase's set: a sparse point on the set's boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustkit.attacks.base import EarlyStop, WorstCase
from robustkit.attacks.iterative import probe
from robustkit.attacks.norms import project_l1_box, sparse_step
from robustkit.attacks.transforms import EOT
from robustkit.vocabulary import Loss

#: AutoAttack's L1 schedule: (multiple of ε, fraction of the steps) per phase.
EPS_SCHEDULE: tuple[tuple[float, float], ...] = ((3.0, 0.3), (2.0, 0.3), (1.0, 0.4))
#: The plain l1-APGD of the paper: one phase at ε.
NO_SCHEDULE: tuple[tuple[float, float], ...] = ((1.0, 1.0),)
#: Initial step ``η = α·ε``.
ALPHA = 1.0
#: The step never falls below ``α·ε / MIN_STEP_DIVISOR``.
MIN_STEP_DIVISOR = 10.0
#: At a checkpoint without progress in sparsity the step is divided by this, and ``k`` is
#: the best point's sparsity over this.
SHRINK = 1.5
#: Sparsity "fell" when it is below this fraction of its value at the previous checkpoint.
SPARSER = 0.95
#: The sparsity fraction ``k/d`` of a run that starts at the clean point.
START_FRACTION = 0.2
#: The start noise ``u`` (unit L1 ball) is scaled by this times ``d``: ``E‖g‖₁ = √(2/π)·d``.
START_SCALE = math.sqrt(2 / math.pi)
#: Checkpoint period ``max(⌊PERIOD·T⌋, 1)`` for a phase of ``T`` steps.
PERIOD = 0.04


def phases(steps: int, schedule: Sequence[tuple[float, float]]) -> list[tuple[float, int]]:
    """``(ε multiple, steps)`` per phase: ``⌈p·T⌉`` for every phase but the last, which takes
    the rest and, when ``T ≥ 1``, at least one step (earlier phases give theirs up)."""
    counts = [math.ceil(fraction * steps - 1e-9) for _, fraction in schedule[:-1]]
    floor = min(steps, 1)
    while sum(counts) > steps - floor:
        longest = max(range(len(counts)), key=lambda i: (counts[i], -i))
        counts[longest] -= 1
    counts.append(steps - sum(counts))
    return [(scale, n) for (scale, _), n in zip(schedule, counts, strict=True)]


def sparsity(delta: Tensor) -> Tensor:
    """``‖δ_i‖₀`` per row, as floats ``[N]``."""
    return (delta.flatten(1) != 0).sum(dim=1).to(delta.dtype)


def into_set(point: Tensor, x: Tensor, radius: Tensor) -> Tensor:
    """``P_S(point)`` for ``S = B₁(x, radius) ∩ [0, 1]^d``."""
    return x + project_l1_box(point - x, x, radius)


@dataclass
class Objective:
    """What one phase maximises and how it is judged (shared by the phases of a start)."""

    model: nn.Module
    kind: Loss
    targeted: bool
    eot: EOT | None


def run_l1(
    objective: Objective,
    worst: WorstCase,
    idx: Tensor,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    u: Tensor,
    *,
    steps: int,
    early_stop: bool,
    every: int,
    aim: Tensor | None,
    schedule: Sequence[tuple[float, float]] = EPS_SCHEDULE,
) -> int:
    """One l1-APGD start from the unit-L1-ball noise ``u`` on the sub-batch ``idx``; returns
    the per-sample gradients it computed. ``eps``: ``[n, 1, 1, 1]``."""
    plan = phases(steps, schedule)
    d = x[0].numel()
    x_cur = into_set(x + START_SCALE * d * u, x, plan[0][0] * eps)
    grads = 0
    for number, (scale, n) in enumerate(plan):
        final = number == len(plan) - 1
        x_cur = into_set(x_cur, x, scale * eps)
        x_cur, spent = _phase(objective, worst if final else None, idx, x, y, scale * eps,
                              x_cur, steps=n, early_stop=early_stop and final, every=every,
                              aim=aim)
        grads += spent
    return grads


def _phase(
    objective: Objective,
    worst: WorstCase | None,
    idx: Tensor,
    x: Tensor,
    y: Tensor,
    radius: Tensor,
    x_cur: Tensor,
    *,
    steps: int,
    early_stop: bool,
    every: int,
    aim: Tensor | None,
) -> tuple[Tensor, int]:
    """``steps`` l1-APGD steps in ``B₁(x, radius) ∩ [0, 1]^d`` from ``x_cur``; every iterate
    is offered to ``worst`` (None: a phase at a larger radius, whose points are not in the
    threat set). Returns the highest-objective point of every sample (the next phase's start)
    and the per-sample gradients computed."""
    n, d = len(idx), x[0].numel()
    stop = EarlyStop(n, x.device, enabled=early_stop, every=every)
    period = max(int(PERIOD * steps), 1)
    top_step = ALPHA * radius
    eta = top_step.clone()
    start_sparsity = sparsity(x_cur - x)
    fraction = torch.where(start_sparsity > 0, start_sparsity / d / SHRINK, START_FRACTION)
    sparsity_then = torch.where(start_sparsity > 0, start_sparsity, float(d))
    best = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
    x_best, grad_best = x_cur, torch.zeros_like(x_cur)
    out = x_cur.clone()  # every sample's best point, kept for the next phase
    rows = torch.arange(n, device=x.device)
    for t in range(steps + 1):
        value, adv, grad = probe(objective.model, x_cur, y, objective.kind,
                                 objective.targeted, gradient=t < steps,
                                 truth=None if worst is None else worst.truth(idx), aim=aim,
                                 eot=objective.eot)
        if worst is not None:
            worst.update(idx, x_cur, value, adv)
        improved = value > best
        best = torch.where(improved, value, best)
        x_best = torch.where(improved.view(-1, 1, 1, 1), x_cur, x_best)
        out[rows] = x_best
        if t == steps:
            break
        grad_best = torch.where(improved.view(-1, 1, 1, 1), grad, grad_best)
        keep = stop.after_step(t, adv)
        if keep is not None:
            aim = None if aim is None else aim[keep]
            (idx, rows, x, y, radius, top_step, eta, x_cur, grad, best, x_best, grad_best,
             fraction, sparsity_then) = (
                v[keep] for v in (idx, rows, x, y, radius, top_step, eta, x_cur, grad, best,
                                  x_best, grad_best, fraction, sparsity_then))
            if idx.numel() == 0:
                break
        if t > 0 and t % period == 0:
            now = sparsity(x_best - x)
            sparser = now < SPARSER * sparsity_then
            fraction, sparsity_then = now / d / SHRINK, now
            back = sparser.view(-1, 1, 1, 1)
            eta = torch.where(back, top_step, eta / SHRINK)
            eta = torch.minimum(torch.maximum(eta, top_step / MIN_STEP_DIVISOR), top_step)
            x_cur = torch.where(back, x_best, x_cur)
            grad = torch.where(back, grad_best, grad)
        x_cur = into_set(x_cur + eta * sparse_step(grad, fraction), x, radius)
    scale = objective.eot.samples if objective.eot else 1
    return out, stop.grad_evals * scale
