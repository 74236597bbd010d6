"""Threat-model geometry for the ``"linf"``, ``"l2"`` and ``"l1"`` balls.

All functions act per sample (row) of a batch ``[N, ...]``:

* :func:`steepest_step`: the unit-norm direction ``s`` maximising ``⟨g, s⟩`` —
  ``sign(g)`` for L∞, ``g / ‖g‖₂`` for L2, ``sign(g_i)·e_i`` at the largest ``|g_i|`` for L1
  (``0`` when ``g = 0``; any other ``g``, however small, gives a unit step);
* :func:`sparse_step`: the L1 step of l1-APGD, ``sign(g)`` on the ``k`` largest ``|g_i|``, over k;
* :func:`project`: the Euclidean projection onto ``{δ : ‖δ‖ ≤ ε}`` —
  ``clamp(δ, −ε, ε)`` for L∞, ``δ · min(1, ε / ‖δ‖₂)`` for L2;
* :func:`project_l1_box`: the exact Euclidean projection onto ``{δ : ‖δ‖₁ ≤ ε} ∩ [−x, 1 − x]``
  (the L1 ball intersected with the pixel box; Croce & Hein, 2021): unlike L∞, clamping into
  the box after the ball's projection is not the projection onto the intersection in L1;
* :func:`random_unit_ball`: a uniform sample from the unit ball;
* :func:`enforce_ball`: a result held to the ball and the box (what the framework does to
  every attack's output before a verdict).

Callers of :func:`project` additionally clamp ``x + δ`` into the ``[0, 1]`` pixel box after
every step (exact for L∞, whose ball and box are both coordinate-wise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from robustkit.errors import RobustkitError
from robustkit.vocabulary import NORMS, Norm

#: The balls of the attacks that take no L1 (PGD, FGSM).
LP_NORMS: tuple[Norm, ...] = ("linf", "l2")


def check_norm(norm: str, supported: Sequence[Norm] = NORMS, attack: str = "") -> Norm:
    """Return ``norm`` if it names a ball in ``supported`` (``attack``'s, when named), else
    raise :class:`RobustkitError`."""
    for known in supported:  # the match itself, typed as a Norm
        if norm == known:
            return known
    if norm in NORMS:
        raise RobustkitError(f"{attack or 'this attack'} does not run in {norm}; it takes "
                             f"{', '.join(supported)}")
    raise RobustkitError(f"unknown norm {norm!r}; choose one of {', '.join(supported)}")


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
    """``argmax_{‖s‖ ≤ 1} ⟨grad, s⟩`` per row: ``sign(g)`` (L∞), ``g / ‖g‖₂`` (L2), or
    ``sign(g_i)·e_i`` at the first largest ``|g_i|`` (L1)."""
    norm = check_norm(norm)
    if norm == "linf":
        return grad.sign()
    if norm == "l1":
        flat = grad.flatten(1)
        top = flat.abs().argmax(dim=1, keepdim=True)
        step = torch.zeros_like(flat).scatter(1, top, flat.gather(1, top).sign())
        return step.view_as(grad)
    return unit_rows(grad)


def sparse_step(grad: Tensor, fraction: Tensor) -> Tensor:
    """l1-APGD's update direction (Croce & Hein, 2021, §4): with ``q`` the ``⌊(1 − k)·d⌋``-th
    smallest ``|g_i|`` of the row (``k`` = ``fraction`` ``[N]``, clamped to one coordinate at
    least), ``s_i = sign(g_i)·[|g_i| ≥ q] / #{j : |g_j| ≥ q}``: the signs of the largest
    gradient entries, spread evenly so that ``‖s‖₁ = 1`` (0 for a zero gradient)."""
    flat = grad.flatten(1)
    d = flat.shape[1]
    magnitude = flat.abs()
    position = ((1 - fraction) * d).clamp(0, d - 1).long().view(-1, 1)
    threshold = magnitude.sort(dim=1).values.gather(1, position)
    chosen = (magnitude >= threshold).to(flat.dtype) * flat.sign()
    count = chosen.abs().sum(dim=1, keepdim=True)
    return (chosen / count.clamp_min(1)).view_as(grad)

def project(delta: Tensor, eps: float | Tensor, norm: Norm) -> Tensor:
    """Project each row of ``delta`` onto the ε-ball ``{δ : ‖δ‖ ≤ ε}``.

    ``eps`` is a float or a tensor broadcastable to ``delta`` (e.g. ``[N, 1, 1, 1]``).
    L∞: ``clamp(δ, −ε, ε)``. L2: rows with ``‖δ‖₂ > ε`` are rescaled to norm ``ε``.
    """
    check_norm(norm, LP_NORMS)
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


def project_l1_box(delta: Tensor, x: Tensor, eps: Tensor) -> Tensor:
    """The Euclidean projection of each row of ``delta`` onto ``S = {δ : ‖δ‖₁ ≤ ε,
    x + δ ∈ [0, 1]^d}`` (``eps``: ``[N, 1, …]``; ``x`` in the box, so ``0 ∈ S``).

    ``S`` is convex and separable but for the one L1 constraint, so by the KKT conditions the
    projection is ``δ_i(λ) = clamp(soft(v_i, λ), −x_i, 1 − x_i)`` with ``soft(v, λ) =
    sign(v)·max(|v| − λ, 0)`` and one ``λ ≥ 0`` per row: ``λ = 0`` when the box alone brings
    ``v`` into the ball, else the root of ``g(λ) = Σ_i min(max(a_i − λ, 0), b_i) = ε`` with
    ``a_i = |v_i|`` and ``b_i`` the room the box leaves in ``v_i``'s direction. ``g`` is
    piecewise linear and decreasing, with kinks at ``a_i`` (coordinate ``i`` starts moving)
    and ``a_i − b_i`` (it reaches the box); sorting the ``2d`` kinks from the top, the slope
    below each is the count of moving coordinates, so ``g`` at every kink is one cumulative sum
    and ``λ`` the exact interpolation on the segment where ``g`` passes ``ε`` (Croce & Hein,
    2021, §3; computed in float64, O(d log d) per row).
    """
    shape, dtype = delta.shape, delta.dtype
    v = delta.flatten(1).double()
    centre = x.flatten(1).double()
    budget = eps.reshape(-1, 1).double()
    room = torch.where(v > 0, 1 - centre, centre).clamp_min(0)  # b_i
    a = v.abs()
    boxed = torch.minimum(a, room)  # λ = 0
    kinks, order = torch.sort(torch.cat((a, a - room), dim=1), dim=1, descending=True)
    entering = torch.where(order < v.shape[1], 1.0, -1.0).to(v)  # a_i: +1, a_i − b_i: −1
    slope = entering.cumsum(dim=1)  # moving coordinates just below each kink
    gaps = kinks[:, :-1] - kinks[:, 1:]
    at_kinks = torch.cat((torch.zeros_like(budget), (slope[:, :-1] * gaps).cumsum(dim=1)), 1)
    # the last kink at which g is still below ε; g passes ε on the segment below it
    last = (at_kinks < budget).sum(dim=1, keepdim=True).clamp(1, kinks.shape[1]) - 1
    lam = kinks.gather(1, last) - (budget - at_kinks.gather(1, last)) / slope.gather(
        1, last).clamp_min(1)
    inside = boxed.sum(dim=1, keepdim=True) <= budget
    lam = torch.where(inside, 0.0, lam.clamp_min(0))
    moved = torch.minimum((a - lam).clamp_min(0), room)
    return (v.sign() * moved).to(dtype).view(shape)


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
    L1: ``u = r · g / ‖g‖₁``, the same Gaussian direction: a point of the unit L1 ball but not
    a uniform one (that would take Laplace entries). It is what l1-APGD starts from: the
    authors start at the projection of ``x + g`` onto the threat set, and the sparsity of that
    start sets the attack's first sparsity level, so the start's distribution shows in the
    attack's strength (uniform-L1 starts, sparser after the projection, broke 3–6 points fewer
    samples on a PGD-AT CNN at ε = 10).
    Draws happen on ``generator``'s device (reproducible), then move to ``device``.
    """
    norm = check_norm(norm)
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
        u = radius * (unit_rows(g) if norm == "l2" else _l1_rows(g))
    return u.to(device=device if device is not None else u.device)


def _l1_rows(t: Tensor) -> Tensor:
    """``t_i / ‖t_i‖₁`` per row; a zero row stays zero."""
    norms = t.flatten(1).abs().sum(dim=1).view(-1, *([1] * (t.dim() - 1)))
    return torch.where(norms > 0, t / torch.where(norms > 0, norms, 1.0), torch.zeros_like(t))


#: Relative slack of the L2 and L1 balls in :func:`enforce_ball`: an attack's rescaling to
#: ‖δ‖ = ε can land a rounding error outside, which is not a breach of the threat model.
L2_SLACK = 1e-6


def lp_norm(delta: Tensor, norm: Norm) -> Tensor:
    """``‖δ_i‖`` per row in ``norm``, shaped ``[N]``."""
    flat = delta.flatten(1)
    size: Tensor = flat.abs().amax(dim=1) if norm == "linf" else (
        flat.abs().sum(dim=1) if norm == "l1" else flat.norm(dim=1))
    return size


def enforce_ball(x_adv: Tensor, x: Tensor, eps: Tensor, norm: Norm) -> Tensor:
    """``x_adv`` held to the threat model: in ``B_ε(x)`` and in the box ``[min(x, 0),
    max(x, 1)]`` (``[0, 1]`` for a valid ``x``). ``eps`` is ``[N, 1, 1, 1]``.

    L∞: ``clamp(x_adv, x − ε, x + ε)``, which leaves every point an attack built as
    ``x + clamp(δ, −ε, ε)`` bit for bit as it was (rounding is monotone). L2 and L1: rows
    farther than ``ε·(1 + L2_SLACK)`` are projected onto the ball (L1: onto the ball ∩ box,
    :func:`project_l1_box`); the others are left untouched.
    """
    norm = check_norm(norm)
    if norm == "linf":
        inside = torch.clamp(x_adv, min=x - eps, max=x + eps)
    else:
        delta = x_adv - x
        outside = (lp_norm(delta, norm) > eps.view(-1) * (1 + L2_SLACK)).view(
            -1, *([1] * (x.dim() - 1)))
        if norm == "l1":
            nearest = x + project_l1_box(delta, x.clamp(0.0, 1.0), eps)
        else:
            nearest = x + project(delta, eps, "l2")
        inside = torch.where(outside, nearest, x_adv)
    return torch.clamp(inside, min=x.clamp(max=0.0), max=x.clamp(min=1.0))
