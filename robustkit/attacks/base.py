"""Shared plumbing for the attacks: the result type, input checks and :func:`attack_mode`.

Design: every attack (FGSM, PGD, APGD, APGD-T, Square and the AutoAttack ensemble) returns an
:class:`AttackResult` holding the perturbed batch, a per-sample success flag and its cost
(per-sample input-gradient evaluations, and forward queries for Square), so the evaluation engine
gets all of them from one call. Callers that only want the images use ``result.x_adv``.

Conventions shared by all attacks:

* the model maps float ``x ∈ [0, 1]^{N×C×H×W}`` to logits ``z ∈ R^{N×K}``;
* ``ε`` is in pixel units, ``0 ≤ ε ≤ 1``, either one float or one value per sample;
* every iterate lies in ``B_ε(x) ∩ [0, 1]^d``; the box is widened to contain ``x`` itself, so an
  input a rounding error outside ``[0, 1]`` is never moved when ``ε = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustkit.budgets import eps_bound
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Norm

#: How far outside ``[0, 1]`` an input value may lie (rounding from e.g. ``/ 255`` pipelines).
BOX_TOLERANCE = 1e-5


@dataclass(frozen=True)
class AttackResult:
    """The outcome of one attack on a batch of ``N`` samples.

    Attributes:
        x_adv: ``[N, C, H, W]`` perturbed inputs, ``‖x_adv − x‖ ≤ ε`` and ``x_adv ∈ [0, 1]``.
        success: ``[N]`` bool, ``is_adversarial(model(x_adv), y, targeted)`` for each sample;
            for a targeted attack given the true ``labels``, ``argmax model(x_adv) ≠ labels``.
        grad_evals: per-sample input gradients computed, ``Σ_steps |active batch|``.
        queries: per-sample forward passes of a gradient-free attack (Square), counted the same
            way; 0 for gradient attacks, whose forward passes go with their gradients.
    """

    x_adv: Tensor
    success: Tensor
    grad_evals: int
    queries: int = 0


class WorstCase:
    """Per-sample best candidate of an attack: its first success, else its highest objective.

    Iterative attacks offer every iterate; restarts offer theirs only for samples not yet broken,
    so the record, and robust accuracy, can only get worse for the defender. ``labels`` (the
    true classes of a targeted attack) make "broken" mean misclassified: see :meth:`truth`.
    """

    def __init__(self, x: Tensor, labels: Tensor | None = None) -> None:
        self.labels = labels
        self.x_adv = x.clone()
        self.loss = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def truth(self, idx: Tensor) -> Tensor | None:
        """The true labels of samples ``idx`` when success means ``argmax ≠ label`` although the
        attack aims at targets, else None (success as :func:`is_adversarial` judges it)."""
        return None if self.labels is None else self.labels[idx]

    def update(self, idx: Tensor, x_cand: Tensor, loss: Tensor, adv: Tensor) -> None:
        """Offer candidates ``x_cand`` for samples ``idx``: objective ``loss``, success ``adv``."""
        open_ = ~self.success[idx]
        first = adv & open_
        better = ~adv & open_ & (loss > self.loss[idx])
        take = first | better
        if x_cand.device.type == "cpu":  # reading the mask is free here: copy only the rows taken
            self.x_adv[idx[take]] = x_cand[take]
            self.loss[idx[take]] = loss[take]
            self.success[idx[first]] = True
            return
        rows = take.view(-1, *([1] * (x_cand.dim() - 1)))
        self.x_adv[idx] = torch.where(rows, x_cand, self.x_adv[idx])  # no host sync
        self.loss[idx] = torch.where(take, loss, self.loss[idx])
        self.success[idx] = self.success[idx] | first


#: Steps between compactions of an attack's batch on CUDA (see :class:`EarlyStop`).
CUDA_COMPACT_EVERY = 8


def compaction_interval(device: torch.device, requested: int | None = None) -> int:
    """Steps between two compactions of an attack's batch: ``requested``, else 1 on the CPU and
    :data:`CUDA_COMPACT_EVERY` on CUDA.

    Testing whether any sample broke needs the flags on the host. On the CPU that is free and a
    smaller batch is at once cheaper, so the batch shrinks after every step. On CUDA it is a
    host–device synchronisation that drains the queue of kernels, so broken samples ride along
    for a few steps (their worst case is already fixed) and the batch shrinks every few steps.
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise RobustkitError(f"compact_every must be an integer >= 1, got {requested!r}")
        return requested
    return CUDA_COMPACT_EVERY if device.type == "cuda" else 1


class EarlyStop:
    """Which samples of an iterative attack's batch are still unbroken, and the gradients spent.

    A run calls :meth:`after_step` once per gradient step ``t`` with the success flags of
    iterate ``t``. It counts the gradient of iterate ``t`` for the samples unbroken before it
    (the count does not depend on the compaction interval), and every ``every`` steps
    (``t = 0, every, 2·every, …``) returns the mask of the rows to keep when some row broke,
    else ``None``. The flags stay on the device between compactions and the count until
    :attr:`grad_evals` is read, so only a compaction synchronises. Without ``enabled``
    (``early_stop=False``) nothing is ever dropped.
    """

    def __init__(self, n: int, device: torch.device, *, enabled: bool, every: int) -> None:
        self.enabled, self.every = enabled, every
        self.alive = torch.ones(n, dtype=torch.bool, device=device)
        self.evals = torch.zeros((), dtype=torch.int64, device=device)

    def after_step(self, t: int, adv: Tensor) -> Tensor | None:
        """Record iterate ``t``'s flags ``adv``; the rows to keep when it is time to compact."""
        self.evals += self.alive.sum()
        if not self.enabled:
            return None
        self.alive &= ~adv
        if t % self.every != 0 or bool(self.alive.all()):  # the only host sync of a step
            return None
        keep = self.alive
        self.alive = keep[keep]
        return keep

    @property
    def grad_evals(self) -> int:
        """Per-sample gradients computed for samples that were still unbroken."""
        return int(self.evals)


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters; restore both exactly on exit.

    Each submodule's ``training`` flag and each parameter's ``requires_grad`` flag are recorded
    and written back, so an attack run in the middle of adversarial training leaves the model
    (including deliberately frozen parts) as it found it.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def check_inputs(x: Tensor, y: Tensor) -> None:
    """Check ``x`` is a float ``[N, C, H, W]`` batch in ``[0, 1]``, ``y`` int64 ``[N]``."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise RobustkitError(
            f"x must be a float tensor of shape [N, C, H, W], got {_describe(x)}; "
            "pass a batch of images, e.g. x.unsqueeze(0) for a single image"
        )
    outside = ~((x >= -BOX_TOLERANCE) & (x <= 1 + BOX_TOLERANCE))
    if bool(outside.any()):
        bad = x[outside][0].item()
        raise RobustkitError(
            f"x must hold pixel values in [0, 1], found {bad}; "
            "feed unnormalised images and put any normalisation inside the model"
        )
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise RobustkitError(
            f"y must be an int64 tensor of shape [{x.shape[0]}] (one label per image), "
            f"got {_describe(y)}; convert with y.long()"
        )
    if y.device != x.device:
        raise RobustkitError(
            f"x is on {x.device} but y is on {y.device}; move both to the same device"
        )


def check_labels(labels: Tensor | None, y: Tensor, targeted: bool) -> None:
    """``labels`` (true classes) go with a targeted attack only and are shaped like ``y``."""
    if labels is None:
        return
    if not targeted:
        raise RobustkitError("labels are the true classes of a targeted attack: pass them with "
                             "targeted=True, or leave them out (y already holds the labels)")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != y.shape:
        raise RobustkitError(f"labels must be an int64 tensor of shape {list(y.shape)} (one true "
                             f"class per image), got {_describe(labels)}")
    if labels.device != y.device:
        raise RobustkitError(f"labels are on {labels.device} but y is on {y.device}; move both "
                             "to the same device")


def per_sample(value: float | Tensor, x: Tensor, name: str, upper: float = math.inf) -> Tensor:
    """Return ``value`` as an ``[N, 1, 1, 1]`` tensor on ``x``'s device and dtype.

    ``value`` is a number or a tensor of ``N`` values (a 0-d tensor counts as a number); each must
    satisfy ``0 ≤ value ≤ upper``, otherwise :class:`RobustkitError` names the offending value.
    """
    n = x.shape[0]
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise RobustkitError(f"{name} must be a number or a tensor of {n} numbers, got {value!r}")
    if isinstance(value, Tensor):
        values = value.detach().to(device="cpu", dtype=torch.float64)
    else:  # a Python number keeps full precision until cast to x's dtype
        values = torch.tensor(float(value), dtype=torch.float64)
    if values.dim() == 0:
        values = values.expand(n)
    if values.shape != (n,):
        raise RobustkitError(
            f"{name} must be a number or a tensor of shape [{n}] (one per sample), "
            f"got shape {list(values.shape)}"
        )
    bad = ~((values >= 0) & (values <= upper))
    if bool(bad.any()):
        hint = f" (pixel units; write e.g. {name}=8/255, not 8)" if upper == 1 else ""
        raise RobustkitError(
            f"{name} must lie in [0, {upper:g}]{hint}, got {values[bad][0].item():g}"
        )
    return values.to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1)


def max_eps(norm: Norm, x: Tensor) -> float:
    """The largest meaningful budget for images shaped like ``x[0]`` (:func:`eps_bound`)."""
    return eps_bound(norm, x[0].numel())


def as_eps(eps: float | Tensor, x: Tensor, norm: Norm = "linf") -> Tensor:
    """Check ``0 ≤ ε ≤ max_eps(norm)`` (float or per-sample ``[N]``); return ``[N, 1, 1, 1]``."""
    return per_sample(eps, x, "eps", upper=max_eps(norm, x))


def clip_box(x_new: Tensor, x: Tensor) -> Tensor:
    """Clamp ``x_new`` into the box ``[min(x, 0), max(x, 1)]`` (``= [0, 1]`` for a valid ``x``)."""
    return torch.clamp(x_new, min=x.clamp(max=0.0), max=x.clamp(min=1.0))


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
