"""The per-sample objectives an attacker maximises, and the success test.

With logits ``z`` and label ``y`` (the true class; the target class ``t`` when targeted):

=============  ===============================  =================================
kind           untargeted (y = true class)      targeted (y = target t)
=============  ===============================  =================================
``"ce"``       ``CE(z, y)``                     ``−CE(z, t)``
``"margin"``   ``max_{j≠y} z_j − z_y``          ``z_t − max_{j≠t} z_j``
``"dlr"``      ``DLR(z, y)``                    ``−(max_{j≠t} z_j − z_t) / D₃₄(z)``
=============  ===============================  =================================

The margin loss is Carlini & Wagner's (2017) with κ = ∞. In both cases the attack has succeeded
once the prediction ``argmax z`` differs from ``y`` (untargeted) or equals ``t`` (targeted);
:func:`judge` also knows the evaluation's rule for targeted attacks, success = ``argmax z`` differs
from the true class (the attack only chooses where to push).

The Difference of Logits Ratio (Croce & Hein, 2020), with ``z_π1 ≥ z_π2 ≥ …`` the sorted logits::

    DLR(z, y)      = −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3)
    DLR_T(z, y, t) = −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2)          (:func:`targeted_dlr`)

Both are unchanged when the logits are shifted or rescaled, so a model cannot hide behind large
or saturated logits. ``DLR_T`` is APGD-T's objective: untargeted success (``argmax z ≠ y``)
reached by pushing towards one target ``t``; pass ``t`` as ``aim`` with ``kind="dlr"``. A plain
targeted attack (``targeted=True``) knows only ``t``, so its DLR puts ``t``'s strongest rival
in the place of the true class, ``D₃₄(z) = z_π1 − (z_π3 + z_π4)/2``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from robustkit.errors import RobustkitError
from robustkit.vocabulary import LOSSES, Loss

#: Added to the DLR denominators, as in the paper, so that tied logits do not divide by zero.
DLR_FLOOR = 1e-12


def check_loss(kind: str) -> Loss:
    """Return ``kind`` if it names a known loss (:data:`~robustkit.vocabulary.LOSSES`, the
    objectives :func:`adversarial_loss` knows), else raise :class:`RobustkitError`."""
    for known in LOSSES:  # the match itself, typed as a Loss
        if kind == known:
            return known
    raise RobustkitError(f"unknown attack loss {kind!r}; choose one of {', '.join(LOSSES)}")


def logits_problem(out: object, n: int | None = None, num_classes: int | None = None
                   ) -> str | None:
    """Why a model's output ``out`` is not logits, or None: logits are one float tensor
    ``[n, K]`` with ``K = num_classes`` when given, else any ``K ≥ 2`` (any number of rows when
    ``n`` is None).

    With :func:`probability_rows` this is the one rule of what counts as logits; model loading,
    the attacks and the ``outputs_are_logits`` check all apply it.
    """
    k = "K" if num_classes is None else str(num_classes)
    if isinstance(out, (tuple, list)):
        return (f"the model returns a {type(out).__name__} of {len(out)} items; it must return "
                f"one logits tensor [N, {k}]: wrap it so forward returns the logits")
    if not isinstance(out, Tensor):
        return f"the model returns a {type(out).__name__}, not a logits tensor [N, {k}]"
    rows = n is None or (out.dim() > 0 and out.shape[0] == n)
    width = out.dim() == 2 and out.shape[1] >= 2 and num_classes in (None, out.shape[1])
    if rows and width and out.is_floating_point():
        return None
    batch = "" if n is None else f" for a batch of {n} images"
    classes = " with K >= 2 classes" if num_classes is None else ""
    return (f"the model returns shape {list(out.shape)} ({out.dtype}){batch}; expected "
            f"[N, {k}] float logits{classes}")


def probability_rows(out: Tensor) -> Tensor:
    """``[N]``: which rows of the outputs ``out`` are probability vectors (every entry in
    [0, 1], summing to 1 within 1e-3), the mark of a final softmax. Attacks on probabilities
    see saturated, vanishing gradients and overstate robustness."""
    return (out >= 0).all(1) & (out <= 1).all(1) & ((out.sum(1) - 1).abs() < 1e-3)


def check_logits(logits: Tensor, y: Tensor) -> None:
    """Raise :class:`RobustkitError` unless ``logits`` are logits (:func:`logits_problem`) and
    ``y`` holds one label ``0 ≤ y_i < K`` per row."""
    problem = logits_problem(logits)
    if problem:
        raise RobustkitError(problem)
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


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """``DLR(z, y) = −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3)`` per sample ``[N]`` (K ≥ 3)."""
    top = logits.sort(dim=1, descending=True).values
    return -margin(logits, y) / (top[:, 0] - top[:, 2] + DLR_FLOOR)


def targeted_dlr(logits: Tensor, y: Tensor, t: Tensor) -> Tensor:
    """``DLR_T(z, y, t) = −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2)`` per sample ``[N]`` (K ≥ 4)."""
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    z_t = logits.gather(1, t.unsqueeze(1)).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + DLR_FLOOR)


def adversarial_loss(logits: Tensor, y: Tensor, kind: Loss = "ce", targeted: bool = False,
                     aim: Tensor | None = None) -> Tensor:
    """Per-sample objective ``L(z, y)`` ``[N]`` that the attacker maximises (see module table).

    ``aim`` (``kind="dlr"``, untargeted only): APGD-T's target classes ``t`` ``[N]``; the
    objective is then :func:`targeted_dlr` ``DLR_T(z, y, t)``.
    """
    check_loss(kind)
    check_logits(logits, y)
    if kind == "dlr":
        needed = 4 if targeted or aim is not None else 3
        if logits.shape[1] < needed:
            raise RobustkitError(
                f"the dlr loss needs at least {needed} classes, the model has "
                f"{logits.shape[1]}; use loss ce or margin"
            )
    if aim is not None:
        if kind != "dlr" or targeted:
            raise RobustkitError("aim (a target class for APGD-T) needs loss dlr, untargeted")
        check_logits(logits, aim)
    return objective(logits, y, kind, targeted, aim)


def objective(logits: Tensor, y: Tensor, kind: Loss, targeted: bool,
              aim: Tensor | None = None) -> Tensor:
    """:func:`adversarial_loss` without argument checks, for inner loops on checked inputs."""
    if kind == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    if kind == "dlr":
        if aim is not None:
            return targeted_dlr(logits, y, aim)
        if targeted:  # y = t: t's strongest rival stands in for the unknown true class
            top = logits.sort(dim=1, descending=True).values
            return margin(logits, y) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + DLR_FLOOR)
        return dlr(logits, y)
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
