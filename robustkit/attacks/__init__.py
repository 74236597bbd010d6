"""White-box evasion attacks on image classifiers.

Every attack takes a model mapping ``x ∈ [0, 1]^{N×C×H×W}`` to logits ``[N, K]``, labels ``y``
(targets when ``targeted=True``) and a budget ``ε`` in pixel units, and returns an
:class:`AttackResult` ``(x_adv, success, grad_evals)``.

* :func:`fgsm` — one signed-gradient step (Goodfellow et al., 2015).
* :func:`pgd` — projected gradient ascent with restarts, L∞ or L2 (Madry et al., 2018).
* :func:`apgd` — PGD with momentum and a self-adjusting step size (Croce & Hein, 2020).
* :func:`apgd_targeted` — APGD-T: APGD with the targeted DLR loss, once per target class.
* :func:`fab_targeted` — FAB-T, the minimum-norm boundary attack judged at ε (Croce & Hein,
  2020); :func:`fab_minimal` returns the smallest perturbation itself.
* :func:`square` — the gradient-free Square attack (Andriushchenko et al., 2020).
"""

from __future__ import annotations

from robustkit.attacks.apgd import apgd
from robustkit.attacks.apgd_t import apgd_targeted
from robustkit.attacks.base import AttackResult, as_eps, attack_mode
from robustkit.attacks.fab import fab_minimal, fab_targeted
from robustkit.attacks.fgsm import fgsm
from robustkit.attacks.iterative import StartNoise
from robustkit.attacks.losses import adversarial_loss, dlr, is_adversarial, margin, targeted_dlr
from robustkit.attacks.norms import project, random_unit_ball, steepest_step
from robustkit.attacks.pgd import pgd
from robustkit.attacks.square import SquareNoise, square
from robustkit.vocabulary import LOSSES, NORMS, Loss, Norm

__all__ = [
    "LOSSES",
    "NORMS",
    "AttackResult",
    "Loss",
    "Norm",
    "SquareNoise",
    "StartNoise",
    "adversarial_loss",
    "apgd",
    "apgd_targeted",
    "as_eps",
    "attack_mode",
    "dlr",
    "fab_minimal",
    "fab_targeted",
    "fgsm",
    "is_adversarial",
    "margin",
    "pgd",
    "project",
    "random_unit_ball",
    "square",
    "steepest_step",
    "targeted_dlr",
]
