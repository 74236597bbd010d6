"""The per-sample objectives an attacker maximises, and the success test.

With logits ``z`` and label ``y`` (the true class; the target class ``t`` when targeted):

=============  ===============================  =================================
kind           untargeted (y = true class)      targeted (y = target t)
=============  ===============================  =================================
``"ce"``       ``CE(z, y)``                     ``−CE(z, t)``
``"margin"``   ``max_{j≠y} z_j − z_y``          ``z_t − max_{j≠t} z_j``
=============  ===============================  =================================

The margin loss is Carlini & Wagner's (2017) with κ = ∞. In both cases the attack has succeeded
once the prediction ``argmax z`` differs from ``y`` (untargeted) or equals ``t`` (targeted);
:func:`judge` also knows the evaluation's rule for targeted attacks, success = ``argmax z`` differs
from the true class (the attack only chooses where to push).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from robustkit.errors import RobustkitError

#: The objectives :func:`adversarial_loss` knows.
LOSSES: tuple[str, ...] = ("ce", "margin")


def check_loss(kind: str) -> str:
    """Return ``kind`` if it names a known loss, else raise :class:`RobustkitError`."""
    if kind not in LOSSES:
        raise RobustkitError(f"unknown attack loss {kind!r}; choose one of {', '.join(LOSSES)}")
    return kind


def check_logits(logits: Tensor, y: Tensor) -> None:
    """Check ``logits`` is ``[N, K]`` with ``K ≥ 2`` and every label ``0 ≤ y_i < K``."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise RobustkitError(
            f"the model must return logits of shape [N, K] with K >= 2 classes, "
            f"got shape {list(logits.shape)}"
        )
    if y.shape != (logits.shape[0],):
        raise RobustkitError(
            f"got {logits.shape[0]} rows of logits but labels of shape {list(y.shape)}; "
            "pass one label per image"
        )
    k = logits.shape[1]
    if bool(((y < 0) | (y >= k)).any()):
        raise RobustkitError(f"labels must lie in [0, {k - 1}] for a {k}-class model")


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Classification margin ``m(z, y) = z_y − max_{j≠y} z_j`` per sample, ``[N]``."""
    z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    z_other = logits.scatter(1, y.unsqueeze(1), float("-inf")).amax(dim=1)
    return z_y - z_other


def adversarial_loss(logits: Tensor, y: Tensor, kind: str = "ce", targeted: bool = False) -> Tensor:
    """Per-sample objective ``L(z, y)`` ``[N]`` that the attacker maximises (see module table)."""
    check_loss(kind)
    check_logits(logits, y)
    return objective(logits, y, kind, targeted)


def objective(logits: Tensor, y: Tensor, kind: str, targeted: bool) -> Tensor:
    """:func:`adversarial_loss` without argument checks, for inner loops on checked inputs."""
    if kind == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    m = margin(logits, y)
    return m if targeted else -m


def is_adversarial(logits: Tensor, y: Tensor, targeted: bool = False) -> Tensor:
    """``[N]`` bool: ``argmax z ≠ y`` (untargeted) or ``argmax z = t`` (targeted, ``y = t``)."""
    predicted = logits.argmax(dim=1)
    return predicted == y if targeted else predicted != y


def judge(logits: Tensor, y: Tensor, targeted: bool, truth: Tensor | None) -> Tensor:
    """Success flags ``[n]``: ``argmax ≠ truth`` when the true labels are given, else
    :func:`is_adversarial` (``argmax ≠ y``, or ``argmax = y`` for targets)."""
    if truth is not None:
        return logits.argmax(dim=1) != truth
    return is_adversarial(logits, y, targeted)
