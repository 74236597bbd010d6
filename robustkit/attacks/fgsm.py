"""Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, 2015).

One L∞ step of size ε along the sign of the input gradient of the attack objective ``L``
(:func:`~robustkit.attacks.losses.adversarial_loss`, already negated for targeted attacks)::

    x_adv = clip_[0,1](x + ε · sign(∇_x L(x, y)))

Returns an :class:`~robustkit.attacks.base.AttackResult`; ``success`` is evaluated at ``x_adv``
only (FGSM does not fall back to the clean point) and ``grad_evals = N``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustkit.attacks.base import (
    AttackResult,
    as_eps,
    attack_mode,
    check_inputs,
    check_labels,
    clip_box,
)
from robustkit.attacks.losses import adversarial_loss, check_loss, judge
from robustkit.vocabulary import Loss


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    targeted: bool = False,
    loss: Loss = "ce",
    labels: Tensor | None = None,
) -> AttackResult:
    """``x_adv = clip_[0,1](x + ε · sign(∇_x L(x, y)))``; ``y`` holds targets when ``targeted``.

    ``eps`` is a float or a per-sample tensor ``[N]`` in ``[0, 1]``; samples with ``ε = 0`` come
    back unchanged. ``labels``: the true classes of a targeted attack; success then means
    ``argmax ≠ labels`` rather than reaching the target.
    """
    check_inputs(x, y)
    check_labels(labels, y, targeted)
    kind = check_loss(loss)
    eps_t = as_eps(eps, x)
    x = x.detach()
    with attack_mode(model):
        x_in = x.clone().requires_grad_(True)
        with torch.enable_grad():
            objective = adversarial_loss(model(x_in), y, kind, targeted)
        (grad,) = torch.autograd.grad(objective.sum(), x_in)
        x_adv = clip_box(x + eps_t * grad.sign(), x)
        with torch.no_grad():
            success = judge(model(x_adv), y, targeted, labels)
    return AttackResult(x_adv=x_adv, success=success, grad_evals=x.shape[0])
