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
    as_eps,
    attack_mode,
    check_inputs,
    clip_box,
    per_sample,
)
from robustkit.attacks.losses import adversarial_loss, check_loss, is_adversarial, objective
from robustkit.attacks.norms import check_norm, project, random_unit_ball, steepest_step
from robustkit.errors import RobustkitError

#: ``start_noise(restart)`` returns unit-ball noise shaped like the whole batch ``x``.
StartNoise = Callable[[int], Tensor]


class _WorstCase:
    """Per-sample record of the best candidate so far: first success, else highest objective."""

    def __init__(self, x: Tensor) -> None:
        self.x_adv = x.clone()
        self.loss = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def update(self, idx: Tensor, x_cand: Tensor, loss: Tensor, adv: Tensor) -> None:
        """Offer candidates ``x_cand`` for samples ``idx``: objective ``loss``, success ``adv``."""
        open_ = ~self.success[idx]
        first = adv & open_
        better = ~adv & open_ & (loss > self.loss[idx])
        take = first | better
        rows = take.view(-1, *([1] * (x_cand.dim() - 1)))
        self.x_adv[idx] = torch.where(rows, x_cand, self.x_adv[idx])  # no host sync
        self.loss[idx] = torch.where(take, loss, self.loss[idx])
        self.success[idx] = self.success[idx] | first


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    norm: str = "linf",
    steps: int = 40,
    step_size: float | Tensor | None = None,
    loss: str = "ce",
    restarts: int = 1,
    random_start: bool = True,
    targeted: bool = False,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
    start_noise: StartNoise | None = None,
) -> AttackResult:
    """PGD attack within ``‖x_adv − x‖ ≤ ε`` (``norm`` ∈ {"linf", "l2"}) and ``x_adv ∈ [0, 1]``.

    Args:
        eps: budget in pixel units, float or per-sample ``[N]``; ``ε = 0`` rows return ``x``.
        steps: gradient steps ``T`` per restart.
        step_size: ``α``; float or ``[N]``; default ``2.5·ε/T`` per sample.
        loss: ``"ce"`` or ``"margin"`` (see :mod:`robustkit.attacks.losses`).
        restarts: number of starts; each runs only on samples not yet broken. Without
            ``random_start`` all starts would be identical, so only one is run.
        targeted: ``y`` holds target classes and success means ``argmax = y``.
        early_stop: drop a sample from the batch as soon as it is broken (``False``: every
            sample of a restart runs all ``T`` steps; results are the same, it is a reference).
        generator: RNG for the random start when ``start_noise`` is not given.
        start_noise: ``start_noise(restart)`` → unit-ball noise shaped like ``x``; lets callers
            make the start depend only on (seed, restart, sample), not on batch composition.
    """
    check_inputs(x, y)
    norm = check_norm(norm)
    kind = check_loss(loss)
    eps_t = as_eps(eps, x, norm)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise RobustkitError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise RobustkitError(f"restarts must be an integer >= 1, got {restarts!r}")
    if step_size is None:
        alpha = 2.5 * eps_t / max(steps, 1)
    else:
        alpha = per_sample(step_size, x, "step_size")
    x = x.detach()
    worst = _WorstCase(x)
    grad_evals = 0

    with attack_mode(model):
        everyone = torch.arange(x.shape[0], device=x.device)
        with torch.no_grad():
            logits = model(x)
            worst.update(
                everyone,
                x,
                adversarial_loss(logits, y, kind, targeted),
                is_adversarial(logits, y, targeted),
            )
        for restart in range(restarts if random_start else 1):
            idx = (~worst.success & (eps_t.view(-1) > 0)).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            u = _start_noise(restart, x, idx, norm, random_start, generator, start_noise)
            grad_evals += _run(
                model, worst, idx, x[idx], y[idx], eps_t[idx], alpha[idx], u,
                norm=norm, steps=steps, kind=kind, targeted=targeted, early_stop=early_stop,
            )  # fmt: skip
    return AttackResult(x_adv=worst.x_adv, success=worst.success, grad_evals=grad_evals)


def _start_noise(
    restart: int,
    x: Tensor,
    idx: Tensor,
    norm: str,
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
    worst: _WorstCase,
    idx: Tensor,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    alpha: Tensor,
    u: Tensor,
    *,
    norm: str,
    steps: int,
    kind: str,
    targeted: bool,
    early_stop: bool,
) -> int:
    """One restart from ``δ₀ = ε·u`` on the sub-batch ``idx``; return the gradients it computed.

    Every iterate ``t = 0 … T`` is offered to ``worst``; the objective and gradient at iterate
    ``t`` come from one forward/backward pass, the final iterate needs a forward pass only.
    """
    grad_evals = 0
    x_cur = clip_box(x + project(eps * u, eps, norm), x)
    for t in range(steps + 1):
        if t == steps:
            with torch.no_grad():
                logits = model(x_cur)
                value = objective(logits, y, kind, targeted)
        else:
            x_in = x_cur.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(x_in)
                value = objective(logits, y, kind, targeted)
            (grad,) = torch.autograd.grad(value.sum(), x_in)
            grad_evals += idx.numel()
        adv = is_adversarial(logits.detach(), y, targeted)
        worst.update(idx, x_cur, value.detach(), adv)
        if t == steps:
            break
        if early_stop and bool(adv.any()):
            keep = ~adv
            idx, x, y, eps, alpha, x_cur, grad = (
                v[keep] for v in (idx, x, y, eps, alpha, x_cur, grad)
            )
            if idx.numel() == 0:
                break
        delta = project(x_cur - x + alpha * steepest_step(grad, norm), eps, norm)
        x_cur = clip_box(x + delta, x)
    return grad_evals
