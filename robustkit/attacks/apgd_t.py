"""APGD-T (Croce & Hein, 2020): APGD with the targeted DLR loss, once per target class.

With ``z = f(x)`` the clean logits, the targets of sample ``i`` are its ``k`` highest-scoring
classes other than ``y_i``, ``t₁, …, t_k`` (``z_{t₁} ≥ z_{t₂} ≥ …``; ``k = K − 1 = 9`` on
MNIST, as in AutoAttack's standard version). For ``j = 1 … k``, APGD maximises::

    DLR_T(f(x'), y, t_j) = −(z'_y − z'_{t_j}) / (z'_π1 − (z'_π3 + z'_π4)/2)

over ``B_ε(x) ∩ [0, 1]^d`` on the samples no earlier target has broken. Success is untargeted:
``argmax f(x') ≠ y``, whichever class wins. Per sample the attack keeps its first adversarial
point; a sample no target breaks keeps the point with the highest untargeted margin loss
``max_{j≠y} z'_j − z'_y`` over all targets (the DLR values of different targets do not compare).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustkit.attacks.apgd import apgd
from robustkit.attacks.base import AttackResult, WorstCase, attack_mode, check_inputs
from robustkit.attacks.iterative import StartNoise, channels_last, check_count
from robustkit.attacks.losses import check_logits, is_adversarial, objective
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Norm

#: AutoAttack's standard number of target classes (all nine wrong classes on MNIST).
DEFAULT_TARGETS = 9


def target_classes(logits: Tensor, y: Tensor, k: int) -> Tensor:
    """``[N, k]``: per row the ``k`` classes ``≠ y`` with the highest logits, highest first."""
    others = logits.scatter(1, y.unsqueeze(1), float("-inf"))
    return others.topk(k, dim=1).indices


def apgd_targeted(
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
    """APGD-T within ``‖x_adv − x‖ ≤ ε`` and ``x_adv ∈ [0, 1]``; ``y`` are the true labels.

    Args:
        targets: ``k``, the number of target classes tried (at most ``K − 1``).
        restarts: APGD starts per target.
        start_noise: ``start_noise(r)`` → unit-ball noise shaped like ``x``; target ``j``
            (0-based) uses the draws ``r = j·restarts … (j+1)·restarts − 1``, so every target
            starts afresh and the starts depend only on (draw, sample).

    ``grad_evals`` sums the gradients of all target runs.
    """
    check_inputs(x, y)
    check_count(targets, "targets", minimum=1)
    check_count(restarts, "restarts", minimum=1)
    x = x.detach()
    worst = WorstCase(x)
    with attack_mode(model), torch.no_grad():
        logits = model(x)
    check_logits(logits, y)
    if targets > logits.shape[1] - 1:
        raise RobustkitError(
            f"targets must be at most K - 1 = {logits.shape[1] - 1} for a "
            f"{logits.shape[1]}-class model, got {targets}"
        )
    ranked = target_classes(logits, y, targets)
    worst.update(torch.arange(len(x), device=x.device), x,
                 objective(logits, y, "margin", False), is_adversarial(logits, y))
    eps_t = eps if isinstance(eps, float | int) else torch.as_tensor(eps)
    with channels_last(model, x, logits):
        grad_evals = _each_target(model, x, y, worst, ranked, eps_t, norm=norm, steps=steps,
                                  restarts=restarts, early_stop=early_stop,
                                  generator=generator, start_noise=start_noise)
    return AttackResult(x_adv=worst.x_adv, success=worst.success, grad_evals=grad_evals)


def _each_target(model: nn.Module, x: Tensor, y: Tensor, worst: WorstCase, ranked: Tensor,
                 eps_t: float | Tensor, *, norm: Norm, steps: int, restarts: int,
                 early_stop: bool, generator: torch.Generator | None,
                 start_noise: StartNoise | None) -> int:
    """APGD towards ``ranked[:, j]``, ``j = 0, 1, …``, each on the samples still unbroken;
    every run's points are offered to ``worst``. Return the gradients spent."""
    grad_evals = 0
    for j in range(ranked.shape[1]):
        idx = (~worst.success).nonzero().squeeze(1)
        if idx.numel() == 0:
            break

        def noise(r: int, j: int = j, idx: Tensor = idx) -> Tensor:
            assert start_noise is not None
            return start_noise(j * restarts + r)[idx]

        run_eps = eps_t if isinstance(eps_t, float | int) else eps_t.view(-1)[idx]
        result = apgd(
            model, x[idx], y[idx], eps=run_eps, norm=norm, steps=steps, loss="dlr",
            restarts=restarts, early_stop=early_stop, generator=generator,
            start_noise=None if start_noise is None else noise, aim=ranked[idx, j],
        )  # fmt: skip
        grad_evals += result.grad_evals
        with attack_mode(model), torch.no_grad():
            found = model(result.x_adv)
        worst.update(idx, result.x_adv, objective(found, y[idx], "margin", False),
                     is_adversarial(found, y[idx]))
    return grad_evals
