"""FAB-T (Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
attack", ICML 2020), targeted as AutoAttack runs it: a minimum-norm attack in L∞, L2 and L1.

FAB looks for the smallest ``δ`` with ``argmax f(x_orig + δ) ≠ y``. Towards one target class
``t`` (the ``k`` classes other than ``y`` with the highest clean logits, one after the other), it
linearises the decision boundary between ``y`` and ``t`` at the iterate ``x⁽ⁱ⁾``::

    F(z) = f_t(z) − f_y(z),     π⁽ⁱ⁾ = {z : F(x⁽ⁱ⁾) + ⟨∇F(x⁽ⁱ⁾), z − x⁽ⁱ⁾⟩ = 0}

and projects both the iterate and the original point onto ``π⁽ⁱ⁾ ∩ C`` (``C = [0, 1]^d``) in the
attack's norm (:func:`boundary_step`)::

    δ⁽ⁱ⁾      = proj_p(x⁽ⁱ⁾, π⁽ⁱ⁾, C) − x⁽ⁱ⁾,     δ_orig⁽ⁱ⁾ = proj_p(x_orig, π⁽ⁱ⁾, C) − x_orig
    α         = min(‖δ⁽ⁱ⁾‖_p / (‖δ⁽ⁱ⁾‖_p + ‖δ_orig⁽ⁱ⁾‖_p), α_max)
    x⁽ⁱ⁺¹⁾    = proj_C((1 − α)(x⁽ⁱ⁾ + η δ⁽ⁱ⁾) + α (x_orig + η δ_orig⁽ⁱ⁾))

(η = 1.05 overshoots the linearised boundary a little; α biases the step towards the original
point, the more so the closer the iterate already is to the boundary). When ``x⁽ⁱ⁺¹⁾`` is
adversarial it is recorded if it is the closest so far, and the iterate steps back towards the
original point, ``x⁽ⁱ⁺¹⁾ ← (1 − β) x_orig + β x⁽ⁱ⁺¹⁾`` (β = 0.9), to look for a closer crossing.
Restart ``r > 0`` starts from ``x_orig + (min(ε, ‖x_best − x_orig‖)/2)·u/‖u‖`` (``u`` random).

Finally (:func:`final_search`) a few steps of regula falsi on the segment from ``x_orig`` to the
closest adversarial point move it to the crossing of the segment with the decision boundary.

Cost: one gradient per iterate (``∇F`` is one vector–Jacobian product of the logits, with
the vector ``e_t − e_y``) and one forward pass for the verdict, per step and target; the final
search takes forward passes only. ``grad_evals`` counts the per-sample gradients.

Judged at ε (:func:`fab_targeted`, what the sweep runs): a sample is broken when its smallest
perturbation found has ``‖δ‖ ≤ ε``; samples broken so are not attacked further (early stop).
:func:`fab_minimal` returns the smallest perturbation itself, the attack's own answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustkit.attacks.apgd_t import DEFAULT_TARGETS, target_classes
from robustkit.attacks.base import AttackResult, as_eps, attack_mode, check_inputs, clip_box
from robustkit.attacks.iterative import StartNoise, check_count
from robustkit.attacks.losses import check_logits, margin
from robustkit.attacks.norms import check_norm, enforce_ball, lp_norm, random_unit_ball
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Norm

#: The largest weight of the step towards the original point (α_max).
ALPHA_MAX = 0.1
#: Extrapolation past the linearised boundary (η).
ETA = 1.05
#: The backward step after an adversarial iterate (β).
BETA = 0.9
#: Regula-falsi steps of the final search.
SEARCH_STEPS = 3
#: Gradient entries below this count as zero: their pixels never move (AutoAttack's threshold;
#: without it, where the box cannot reach the boundary, the corner would also move every pixel
#: of a numerically vanishing gradient by its whole room, at full cost in L1 and L2).
ZERO_GRADIENT = 1e-8


# ---------------------------------------------------------------- the projection onto π ∩ C


def boundary_step(point: Tensor, w: Tensor, c: Tensor, norm: Norm) -> Tensor:
    """``δ = argmin ‖δ‖_p`` subject to ``⟨w, δ⟩ = c`` and ``point + δ ∈ [0, 1]^d``, per row
    (``point``, ``w``: ``[n, d]``; ``c``: ``[n]``).

    With ``s = sign(c)`` every optimal ``δ_i`` moves in the direction ``s·sign(w_i)`` (moving
    the other way costs norm and loses progress), by ``m_i ∈ [0, r_i]``, ``r_i`` the room the
    box leaves that way. The problem becomes ``min ‖m‖_p`` s.t. ``Σ a_i m_i = |c|``,
    ``0 ≤ m ≤ r``, with ``a_i = |w_i|``:

    * L2: ``m_i = min(λ a_i, r_i)`` (KKT), ``λ`` the root of ``Σ a_i m_i(λ) = |c|``;
    * L∞: ``m_i = min(t, r_i)`` where ``a_i > 0``, ``t`` the root of the same equation;
    * L1: a fractional knapsack: the coordinates in order of decreasing ``a_i``, each filled to
      its room until ``|c|`` is reached.

    When the box cannot reach the hyperplane (``Σ a_i r_i < |c|``) the answer is the box's
    corner ``m = r``, the point of ``C`` closest to it along ``w``. Entries ``|w_i| <``
    :data:`ZERO_GRADIENT` count as 0. Computed in float64.
    """
    side = torch.where(c < 0, -1.0, 1.0).to(torch.float64)
    w64 = w.double() * side.unsqueeze(1)
    need = (c.double() * side).unsqueeze(1)
    p = point.double()
    a = torch.where(w64.abs() < ZERO_GRADIENT, 0.0, w64.abs())
    room = torch.where(w64 > 0, 1 - p, p).clamp_min(0) * (a > 0)
    if norm == "l1":
        moved = _knapsack(a, room, need)
    else:
        rate = a if norm == "l2" else (a > 0).to(a)
        moved = _water_fill(a, rate, room, need)
    return (w64.sign() * moved).to(point.dtype)


def _water_fill(a: Tensor, rate: Tensor, room: Tensor, need: Tensor) -> Tensor:
    """``m_i = min(λ·rate_i, r_i)`` with ``g(λ) = Σ a_i m_i = need`` (``λ = ∞``: ``m = r``).

    ``g`` is piecewise linear and increasing, with kinks at ``λ_i = r_i / rate_i`` where
    coordinate ``i`` reaches the box. With the kinks sorted, ``g(λ_(j)) = Σ_{i≤j} a_(i) r_(i) +
    λ_(j)·Σ_{i>j} a_(i) rate_(i)``; on the segment where ``g`` passes ``need``, the coordinates
    before it are saturated and ``λ = (need − saturated) / free``.
    """
    kinks = torch.where(rate > 0, room / rate.clamp_min(1e-300), 0.0)
    kinks, order = kinks.sort(dim=1)
    zero = torch.zeros_like(need)
    saturated = torch.cat((zero, (a * room).gather(1, order).cumsum(1)), 1)
    slope = (a * rate).gather(1, order)
    free = torch.cat((slope.sum(1, keepdim=True), slope.sum(1, keepdim=True)
                      - slope.cumsum(1)), 1).clamp_min(0)
    at_kinks = saturated + torch.cat((zero, kinks), 1) * free
    segment = ((at_kinks < need).sum(1, keepdim=True) - 1).clamp_min(0)
    open_ = free.gather(1, segment)
    lam = torch.where(open_ > 0, (need - saturated.gather(1, segment)) / open_.clamp_min(1e-300),
                      math.inf)
    return torch.where(rate > 0, torch.minimum(lam * rate, room), 0.0)


def _knapsack(a: Tensor, room: Tensor, need: Tensor) -> Tensor:
    """``m_(i) = clamp((need − Σ_{j<i} a_(j) r_(j)) / a_(i), 0, r_(i))`` in order of
    decreasing ``a``: the cheapest progress per unit of ``‖δ‖₁`` first."""
    order = a.argsort(dim=1, descending=True)
    a_s, room_s = a.gather(1, order), room.gather(1, order)
    before = (a_s * room_s).cumsum(1) - a_s * room_s
    share = torch.where(a_s > 0, (need - before) / a_s.clamp_min(1e-300), 0.0)
    moved = torch.minimum(share.clamp_min(0), room_s)
    return torch.zeros_like(a).scatter(1, order, moved)


# ------------------------------------------------------------------------- the attack


@dataclass(frozen=True)
class Minimal:
    """FAB's answer for a batch: per sample the closest adversarial point found ``x_adv``
    (``x`` itself where none was found, or where ``x`` is misclassified already), its distance
    ``‖x_adv − x‖_p`` (``inf`` where none was found, 0 where ``x`` is misclassified), and the
    per-sample gradients spent."""

    x_adv: Tensor
    distance: Tensor
    grad_evals: int


class _Closest:
    """Per sample, the closest adversarial point seen so far and its distance."""

    def __init__(self, x: Tensor, misclassified: Tensor) -> None:
        self.x_adv = x.clone()
        self.distance = torch.where(misclassified, 0.0, math.inf).to(x.device, x.dtype)

    def offer(self, idx: Tensor, x_cand: Tensor, size: Tensor, adv: Tensor) -> None:
        closer = adv & (size < self.distance[idx])
        self.x_adv[idx[closer]] = x_cand[closer]
        self.distance[idx[closer]] = size[closer]


def fab_minimal(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: Norm = "linf",
    steps: int = 100,
    targets: int = DEFAULT_TARGETS,
    restarts: int = 1,
    eps: float | Tensor | None = None,
    stop: Tensor | None = None,
    search_steps: int = SEARCH_STEPS,
    generator: torch.Generator | None = None,
    start_noise: StartNoise | None = None,
) -> Minimal:
    """FAB-T's smallest adversarial perturbation per sample (see the module docstring).

    Args:
        targets: ``k``, the target classes tried in turn (at most ``K − 1``).
        restarts: runs per target; run ``r > 0`` starts at random within ``min(ε, best)/2``.
        eps: the radius of the random starts (needed with ``restarts > 1``).
        stop: ``[N]`` distances at which a sample counts as done (no further target, restart
            or step is spent on it); None: every sample runs every step.
        start_noise: ``start_noise(j·restarts + r)`` → noise shaped like ``x`` for run ``r`` of
            target ``j`` (its direction is used); else drawn from ``generator``.
    """
    check_inputs(x, y)
    norm = check_norm(norm)
    for value, name, low in ((steps, "steps", 1), (targets, "targets", 1),
                             (restarts, "restarts", 1), (search_steps, "search_steps", 0)):
        check_count(value, name, minimum=low)
    if restarts > 1 and eps is None:
        raise RobustkitError("FAB's random restarts start within ε/2: pass eps with restarts > 1")
    x = x.detach()
    radius = as_eps(eps if eps is not None else 0.0, x, norm).view(-1)
    with attack_mode(model):
        with torch.no_grad():
            logits = model(x)
        check_logits(logits, y)
        if targets > logits.shape[1] - 1:
            raise RobustkitError(f"targets must be at most K - 1 = {logits.shape[1] - 1} for a "
                                 f"{logits.shape[1]}-class model, got {targets}")
        closest = _Closest(x, logits.argmax(1) != y)
        done_at = stop.view(-1).to(closest.distance) if stop is not None else torch.zeros_like(
            closest.distance)
        ranked = target_classes(logits, y, targets)
        grad_evals = 0
        for run in range(targets * restarts):
            j, r = divmod(run, restarts)
            idx = (closest.distance > done_at).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            start = x[idx] if r == 0 else _random_start(
                x, idx, radius, closest.distance, norm, generator,
                None if start_noise is None else start_noise(run))
            grad_evals += _one_run(model, x, y, ranked[:, j], idx, start, closest, done_at,
                                   norm, steps)
        final_search(model, x, y, closest, norm, search_steps)
    return Minimal(x_adv=closest.x_adv, distance=closest.distance, grad_evals=grad_evals)


def fab_targeted(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    norm: Norm = "linf",
    steps: int = 100,
    targets: int = DEFAULT_TARGETS,
    restarts: int = 1,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
    start_noise: StartNoise | None = None,
) -> AttackResult:
    """FAB-T judged at ``ε``: a sample is broken when FAB finds an adversarial point within
    ``B_ε(x) ∩ [0, 1]^d``. ``x_adv`` is that point; for the others, the closest adversarial
    point found pulled into the ball (:func:`~robustkit.attacks.norms.enforce_ball`) when that
    still breaks the sample, else ``x``. ``success`` is the verdict on ``x_adv`` (one forward
    pass). With ``early_stop`` a sample found within ``ε`` is attacked no further."""
    check_inputs(x, y)
    norm = check_norm(norm)
    eps_t = as_eps(eps, x, norm)
    x = x.detach()
    found = fab_minimal(model, x, y, norm=norm, steps=steps, targets=targets, restarts=restarts,
                        eps=eps_t.view(-1), stop=eps_t.view(-1) if early_stop else None,
                        generator=generator, start_noise=start_noise)
    inside = enforce_ball(found.x_adv, x, eps_t, norm)
    with attack_mode(model), torch.no_grad():
        success = model(inside).argmax(1) != y
    x_adv = torch.where(success.view(-1, 1, 1, 1), inside, x)
    return AttackResult(x_adv=x_adv, success=success, grad_evals=found.grad_evals)


def _one_run(model: nn.Module, x: Tensor, y: Tensor, target: Tensor, idx: Tensor, start: Tensor,
             closest: _Closest, done_at: Tensor, norm: Norm, steps: int) -> int:
    """``steps`` FAB iterations from ``start`` for the samples ``idx`` towards ``target``;
    every adversarial iterate is offered to ``closest``. Returns the gradients spent."""
    x_i, x0, y_i, t_i = start, x[idx], y[idx], target[idx]
    grad_evals = 0
    for _ in range(steps):
        x_i = _fab_step(model, x_i, x0, y_i, t_i, norm)
        grad_evals += len(idx)
        with torch.no_grad():
            adv = model(x_i).argmax(1) != y_i
        closest.offer(idx, x_i, lp_norm(x_i - x0, norm), adv)
        x_i = torch.where(adv.view(-1, 1, 1, 1), x0 + BETA * (x_i - x0), x_i)
        alive = closest.distance[idx] > done_at[idx]
        if not bool(alive.all()):
            if not bool(alive.any()):
                break
            idx, x_i, x0, y_i, t_i = idx[alive], x_i[alive], x0[alive], y_i[alive], t_i[alive]
    return grad_evals


def _fab_step(model: nn.Module, x_i: Tensor, x0: Tensor, y: Tensor, t: Tensor,
              norm: Norm) -> Tensor:
    """One FAB iteration: project ``x⁽ⁱ⁾`` and ``x_orig`` onto the linearised boundary
    ``π: F(x⁽ⁱ⁾) + ⟨∇F, z − x⁽ⁱ⁾⟩ = 0``, then the biased, extrapolated step (module
    docstring)."""
    value, grad = _boundary(model, x_i, y, t)
    w = grad.flatten(1)
    gap = (w * (x0 - x_i).flatten(1)).sum(1)
    delta = boundary_step(x_i.flatten(1), w, -value, norm).view_as(x_i)
    delta_orig = boundary_step(x0.flatten(1), w, -value - gap, norm).view_as(x0)
    size, size_orig = lp_norm(delta, norm), lp_norm(delta_orig, norm)
    alpha = (size / (size + size_orig).clamp_min(1e-12)).clamp(0, ALPHA_MAX).view(-1, 1, 1, 1)
    step = (1 - alpha) * (x_i + ETA * delta) + alpha * (x0 + ETA * delta_orig)
    return clip_box(step, x0)


def _boundary(model: nn.Module, x_i: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``F(x⁽ⁱ⁾) = f_t − f_y`` and ``∇F``: one backward pass of the logits with ``e_t − e_y``."""
    x_in = x_i.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_in)
        rows = torch.arange(len(y), device=y.device)
        value = logits[rows, t] - logits[rows, y]
    (grad,) = torch.autograd.grad(value.sum(), x_in)
    return value.detach(), grad


def _random_start(x: Tensor, idx: Tensor, radius: Tensor, distance: Tensor, norm: Norm,
                  generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
    """``proj_C(x + (min(ε, ‖x_best − x‖)/2)·u/‖u‖)`` for the samples ``idx``."""
    shape = (idx.numel(), *x.shape[1:])
    if noise is None:
        u = random_unit_ball(shape, norm, generator, device=x.device, dtype=x.dtype)
    else:
        u = noise.to(device=x.device, dtype=x.dtype)[idx]
    size = lp_norm(u, norm).clamp_min(1e-12).view(-1, 1, 1, 1)
    scale = (torch.minimum(radius[idx], distance[idx]) / 2).view(-1, 1, 1, 1)
    return clip_box(x[idx] + scale * u / size, x[idx])


def final_search(model: nn.Module, x: Tensor, y: Tensor, closest: _Closest, norm: Norm,
                 steps: int = SEARCH_STEPS) -> None:
    """Regula falsi on the segment ``[x_orig, x_adv]`` of each sample with an adversarial point:
    with the margin ``m(z) = f_y(z) − max_{j≠y} f_j(z)`` (``m > 0`` at the clean end ``a``,
    ``m ≤ 0`` at the adversarial end ``b``), ``z = a + τ (b − a)`` with ``τ = m(a) / (m(a) −
    m(b))``, the root of ``m`` linearised along the segment; ``z`` replaces ``b`` when
    ``argmax f(z) ≠ y``, else ``a``. The final ``b`` is offered to ``closest``."""
    idx = (closest.distance.isfinite() & (closest.distance > 0)).nonzero().squeeze(1)
    if steps == 0 or idx.numel() == 0:
        return
    x0, y_i = x[idx], y[idx]
    a, b = x0, closest.x_adv[idx]
    with attack_mode(model), torch.no_grad():
        m_a, m_b = margin(model(a), y_i), margin(model(b), y_i)
        for _ in range(steps):
            tau = (m_a / (m_a - m_b).clamp_min(1e-12)).clamp(0, 1).view(-1, 1, 1, 1)
            z = clip_box(a + tau * (b - a), x0)
            logits = model(z)
            adv = logits.argmax(1) != y_i
            m_z, rows = margin(logits, y_i), adv.view(-1, 1, 1, 1)
            b, m_b = torch.where(rows, z, b), torch.where(adv, m_z, m_b)
            a, m_a = torch.where(rows, a, z), torch.where(adv, m_a, m_z)
    closest.offer(idx, b, lp_norm(b - x0, norm), torch.ones_like(y_i, dtype=torch.bool))
