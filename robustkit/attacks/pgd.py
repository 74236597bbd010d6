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

from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustkit.attacks.base import (
    AttackResult,
    EarlyStop,
    WorstCase,
    as_eps,
    attack_mode,
    check_inputs,
    check_labels,
    clip_box,
    compaction_interval,
    per_sample,
)
from robustkit.attacks.losses import adversarial_loss, check_loss, judge, objective
from robustkit.attacks.norms import check_norm, project, random_unit_ball, steepest_step
from robustkit.attacks.transforms import EOT
from robustkit.budgets import default_step_size
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Loss, Norm

#: ``start_noise(restart)`` returns unit-ball noise shaped like the whole batch ``x``.
StartNoise = Callable[[int], Tensor]


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
    norm = check_norm(norm)
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


#: ``one_start(worst, idx, x[idx], y[idx], u)`` runs one start of an iterative attack from the
#: unit-ball noise ``u`` on the samples ``idx``, offers its iterates to ``worst`` and returns the
#: per-sample gradients it computed.
OneStart = Callable[[WorstCase, Tensor, Tensor, Tensor, Tensor], int]


def check_count(value: object, name: str, minimum: int) -> None:
    """``value`` must be an integer ``≥ minimum`` (``steps``, ``restarts``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RobustkitError(f"{name} must be an integer >= {minimum}, got {value!r}")


def with_restarts(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    one_start: OneStart,
    *,
    kind: Loss,
    targeted: bool,
    norm: Norm,
    restarts: int,
    random_start: bool,
    generator: torch.Generator | None,
    start_noise: StartNoise | None,
    labels: Tensor | None = None,
    aim: Tensor | None = None,
) -> AttackResult:
    """The clean point, then ``restarts`` starts, each on the samples nothing has broken yet.

    The model runs in :func:`attack_mode`; rows with ``ε = 0`` are never attacked. ``labels``:
    the true classes of a targeted attack (success = misclassified, see :class:`WorstCase`).
    ``aim``: APGD-T's target classes, for the clean point's objective.
    """
    x = x.detach()
    worst = WorstCase(x, labels)
    grad_evals = 0
    with attack_mode(model):
        with torch.no_grad():
            logits = model(x)
            everyone = torch.arange(x.shape[0], device=x.device)
            worst.update(
                everyone,
                x,
                adversarial_loss(logits, y, kind, targeted, aim),
                judge(logits, y, targeted, worst.truth(everyone)),
            )
        for restart in range(restarts):
            idx = (~worst.success & (eps.view(-1) > 0)).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            u = _start_noise(restart, x, idx, norm, random_start, generator, start_noise)
            grad_evals += one_start(worst, idx, x[idx], y[idx], u)
    return AttackResult(x_adv=worst.x_adv, success=worst.success, grad_evals=grad_evals)


def _start_noise(
    restart: int,
    x: Tensor,
    idx: Tensor,
    norm: Norm,
    random_start: bool,
    generator: torch.Generator | None,
    start_noise: StartNoise | None,
) -> Tensor:
    """Unit-ball noise ``u`` for the samples ``idx`` (zeros without a random start)."""
    shape = (idx.numel(), *x.shape[1:])
    if not random_start:
        return torch.zeros(shape, device=x.device, dtype=x.dtype)
    if start_noise is None:
        return random_unit_ball(shape, norm, generator, device=x.device, dtype=x.dtype)
    u = start_noise(restart)
    if not isinstance(u, Tensor) or u.shape != x.shape:
        raise RobustkitError(
            f"start_noise({restart}) must return a tensor shaped like x {list(x.shape)}, "
            f"got {list(u.shape) if isinstance(u, Tensor) else type(u).__name__}"
        )
    return u.to(device=x.device, dtype=x.dtype)[idx]


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


def probe(model: nn.Module, x_cur: Tensor, y: Tensor, kind: Loss, targeted: bool, *,
          gradient: bool, truth: Tensor | None = None, aim: Tensor | None = None,
          eot: EOT | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One pass at the iterates ``x_cur``: the objective ``L`` ``[n]``, the success flags ``[n]``
    (:func:`judge`) and ``∇L`` (an empty tensor when ``gradient`` is false: the forward-only
    final check). ``aim``: APGD-T's target classes (see
    :func:`~robustkit.attacks.losses.adversarial_loss`). With ``eot``, its ``K`` transformed
    passes (:meth:`EOT.probe`)."""
    if eot is not None:
        return eot.probe(model, x_cur, y, kind, targeted, gradient=gradient, truth=truth)
    if not gradient:
        with torch.no_grad():
            logits = model(x_cur)
            value = objective(logits, y, kind, targeted, aim)
        return value, judge(logits, y, targeted, truth), x_cur.new_empty(0)
    x_in = x_cur.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_in)
        value = objective(logits, y, kind, targeted, aim)
    (grad,) = torch.autograd.grad(value.sum(), x_in)
    return value.detach(), judge(logits.detach(), y, targeted, truth), grad
