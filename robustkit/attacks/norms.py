"""Threat-model geometry for the ``"linf"`` and ``"l2"`` balls.

All functions act per sample (row) of a batch ``[N, ...]``:

* :func:`steepest_step`: the unit-norm direction ``s`` maximising ``⟨g, s⟩`` —
  ``sign(g)`` for L∞, ``g / ‖g‖₂`` for L2 (``0`` when ``g = 0``; any other ``g``, however small,
  gives a unit step);
* :func:`project`: the Euclidean projection onto ``{δ : ‖δ‖ ≤ ε}`` —
  ``clamp(δ, −ε, ε)`` for L∞, ``δ · min(1, ε / ‖δ‖₂)`` for L2;
* :func:`random_unit_ball`: a uniform sample from the unit ball;
* :func:`enforce_ball`: a result held to the ball and the box (what the framework does to
  every attack's output before a verdict).

Callers additionally clamp ``x + δ`` into the ``[0, 1]`` pixel box after every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from robustkit.errors import RobustkitError
from robustkit.vocabulary import NORMS, Norm


def check_norm(norm: str) -> Norm:
    """Return ``norm`` if it names a supported ball, else raise :class:`RobustkitError`."""
    for known in NORMS:  # the match itself, typed as a Norm
        if norm == known:
            return known
    raise RobustkitError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def row_norm(t: Tensor) -> Tensor:
    """‖t_i‖₂ for each row, shaped ``[N, 1, ..., 1]`` to broadcast against ``t``."""
    norms: Tensor = t.flatten(1).norm(dim=1)
    return norms.view(-1, *([1] * (t.dim() - 1)))


def unit_rows(t: Tensor) -> Tensor:
    """``t_i / ‖t_i‖₂`` per row; a zero row stays zero.

    Computed as ``r_i / ‖r_i‖₂`` with ``r_i = t_i / max_j |t_ij|`` (the same direction): ``r_i``
    has its largest entry at 1, so its norm neither underflows nor overflows. Taken directly,
    ``‖t_i‖₂`` is 0 in float32 once every entry is below about 1e-22 (the input gradient of a
    confident model's cross-entropy) and the step would vanish although its direction is usable.
    """
    scale = t.flatten(1).abs().amax(dim=1).view(-1, *([1] * (t.dim() - 1)))
    scaled = t / torch.where(scale > 0, scale, 1.0)
    norms = row_norm(scaled)
    return torch.where(norms > 0, scaled / norms, torch.zeros_like(t))


def steepest_step(grad: Tensor, norm: Norm) -> Tensor:
    """``argmax_{‖s‖ ≤ 1} ⟨grad, s⟩`` per row: ``sign(g)`` (L∞) or ``g / ‖g‖₂`` (L2)."""
    if check_norm(norm) == "linf":
        return grad.sign()
    return unit_rows(grad)


def project(delta: Tensor, eps: float | Tensor, norm: Norm) -> Tensor:
    """Project each row of ``delta`` onto the ε-ball ``{δ : ‖δ‖ ≤ ε}``.

    ``eps`` is a float or a tensor broadcastable to ``delta`` (e.g. ``[N, 1, 1, 1]``).
    L∞: ``clamp(δ, −ε, ε)``. L2: rows with ``‖δ‖₂ > ε`` are rescaled to norm ``ε``.
    """
    check_norm(norm)
    if not isinstance(eps, Tensor):
        if not eps >= 0:
            raise RobustkitError(f"eps must be >= 0, got {eps}")
        if norm == "linf":  # a scalar clamp: the same values as with an ε tensor, and faster
            return torch.clamp(delta, min=-eps, max=eps)
        eps = torch.tensor(eps, device=delta.device, dtype=delta.dtype)
    if norm == "linf":
        return torch.clamp(delta, min=-eps, max=eps)
    norms = row_norm(delta)
    outside = norms > eps
    scale = torch.where(outside, eps / torch.where(outside, norms, 1.0), 1.0)
    return delta * scale


def random_unit_ball(
    shape: Sequence[int],
    norm: Norm,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``shape[0]`` independent uniform samples from the unit ball in ``R^d``, ``d = Π shape[1:]``.

    L∞: ``u ~ U[−1, 1]^d``. L2: ``u = r · g / ‖g‖₂`` with ``g ~ N(0, I_d)`` and radius
    ``r = v^{1/d}``, ``v ~ U[0, 1]`` (the volume of the radius-``r`` ball grows like ``r^d``).
    Draws happen on ``generator``'s device (reproducible), then move to ``device``.
    """
    check_norm(norm)
    shape = tuple(shape)
    if len(shape) < 2:
        raise RobustkitError(f"shape must be [N, ...] with at least 2 dims, got {list(shape)}")
    draw_device = generator.device if generator is not None else device
    if norm == "linf":
        u = 2 * torch.rand(shape, generator=generator, device=draw_device, dtype=dtype) - 1
    else:
        g = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
        d = g[0].numel()
        v = torch.rand(shape[0], generator=generator, device=draw_device, dtype=dtype)
        radius = v.pow(1.0 / d).view(-1, *([1] * (len(shape) - 1)))
        u = radius * unit_rows(g)
    return u.to(device=device if device is not None else u.device)


#: Relative slack of the L2 ball in :func:`enforce_ball`: an attack's rescaling to ‖δ‖₂ = ε
#: can land a rounding error outside, which is not a breach of the threat model.
L2_SLACK = 1e-6


def enforce_ball(x_adv: Tensor, x: Tensor, eps: Tensor, norm: Norm) -> Tensor:
    """``x_adv`` held to the threat model: in ``B_ε(x)`` and in the box ``[min(x, 0),
    max(x, 1)]`` (``[0, 1]`` for a valid ``x``). ``eps`` is ``[N, 1, 1, 1]``.

    L∞: ``clamp(x_adv, x − ε, x + ε)``, which leaves every point an attack built as
    ``x + clamp(δ, −ε, ε)`` bit for bit as it was (rounding is monotone). L2: rows farther than
    ``ε·(1 + L2_SLACK)`` are projected onto the ball; the others are left untouched.
    """
    check_norm(norm)
    if norm == "linf":
        inside = torch.clamp(x_adv, min=x - eps, max=x + eps)
    else:
        delta = x_adv - x
        outside = row_norm(delta) > eps * (1 + L2_SLACK)
        inside = torch.where(outside, x + project(delta, eps, "l2"), x_adv)
    return torch.clamp(inside, min=x.clamp(max=0.0), max=x.clamp(min=1.0))
