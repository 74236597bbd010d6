"""What every iterative attack shares: restarts over the samples nothing has broken yet, the
one pass at an iterate (objective, success flags, gradient), the start noise and the count
checks. PGD, APGD, APGD-T and the ensemble build on this module; Square uses its count check.

Worst case kept per sample (:class:`~robustkit.attacks.base.WorstCase`): the clean point and
every iterate of every start are candidates; a sample's result is its first adversarial
candidate, else its highest-objective one. A start runs only on samples not yet broken, so
more restarts never raise robust accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from robustkit.attacks.base import AttackResult, WorstCase, attack_mode
from robustkit.attacks.losses import adversarial_loss, judge, objective
from robustkit.attacks.norms import random_unit_ball
from robustkit.attacks.transforms import EOT
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Loss, Norm

#: How far a channels-last forward's logits may stray from the model's own before
#: :func:`channels_last` gives it up: this fraction of ``1 + max |z|`` (float rounding only).
LAYOUT_TOLERANCE = 1e-4

#: ``start_noise(restart)`` returns unit-ball noise shaped like the whole batch ``x``.
StartNoise = Callable[[int], Tensor]

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
    layout: bool = False,
) -> AttackResult:
    """The clean point, then ``restarts`` starts, each on the samples nothing has broken yet.

    The model runs in :func:`attack_mode`; rows with ``ε = 0`` are never attacked. ``labels``:
    the true classes of a targeted attack (success = misclassified, see :class:`WorstCase`).
    ``aim``: APGD-T's target classes, for the clean point's objective. ``layout``: run the
    starts with the model's weights channels-last where that is faster (:func:`channels_last`).
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
        with channels_last(model, x, logits) if layout else nullcontext():
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


@contextmanager
def channels_last(model: nn.Module, x: Tensor, logits: Tensor) -> Iterator[bool]:
    """On the CPU, run ``model``'s 4-D weights channels-last (NHWC) inside the block; yield
    whether it does. On exit every weight gets back its own tensor, untouched.

    A convolution with an NHWC weight writes NHWC activations, and on the CPU the pooling,
    activation and convolution kernels after it run several times faster on those than on
    NCHW (a 2×2 max-pool of a small MNIST CNN: about 12×). The function computed is the same
    up to float rounding; the layout is kept only if ``model(x)`` then matches ``logits``,
    the model's own logits of ``x``, within :data:`LAYOUT_TOLERANCE` (a model that reshapes
    with ``.view`` fails that forward and runs as it came). Elsewhere (CUDA, no 4-D weight,
    weights NHWC already) nothing changes.
    """
    moved = [(param, param.data) for param in model.parameters()
             if param.dim() == 4 and param.device.type == "cpu"
             and param.stride() != _nhwc_strides(param)]
    if x.device.type != "cpu" or not moved:
        yield False
        return
    try:
        try:  # e.g. ``.view`` of an NHWC activation, or weights that refuse a new tensor
            for param, data in moved:
                param.data = torch.empty_like(data, memory_format=torch.channels_last).copy_(data)
            with attack_mode(model), torch.no_grad():
                found = model(x)
            bound = LAYOUT_TOLERANCE * (1 + float(logits.abs().amax()))
            kept = isinstance(found, Tensor) and found.shape == logits.shape and bool(
                (found - logits).abs().amax() <= bound)
        except RuntimeError:
            kept = False
        if not kept:
            for param, data in moved:
                param.data = data
        yield kept
    finally:
        for param, data in moved:
            param.data = data


def _nhwc_strides(weight: Tensor) -> tuple[int, ...]:
    """The strides of ``weight`` laid out NHWC. With one input channel they differ from NCHW's
    only in that channel's stride, which ``is_contiguous`` ignores but the convolution reads to
    choose its output's layout."""
    _, channels, height, width = weight.shape
    return (height * width * channels, 1, width * channels, channels)


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
