"""Certified lower bounds on a classifier's margins over the ε-ball: IBP, CROWN-IBP, CROWN.

Specification. For a sample ``(x, y)`` and each class ``j ≠ y`` the margin is
``m_j(x') = z_y(x') − z_j(x') = (C z(x'))_j`` with ``C = e_y − e_j``. Over the input set
``X = {x' : ‖x' − x‖ ≤ ε} ∩ [0, 1]^d`` (the ε-ball clipped to the pixel range), a sample is
**certified** when every lower bound ``m̲_j ≤ min_{x' ∈ X} m_j(x')`` is positive: no attack
can change its prediction. A clean-misclassified sample never is (``m̲_j ≤ m_j(x) < 0``).

Norms. In L∞, ``X`` is the box ``[max(x − ε, 0), min(x + ε, 1)]`` and every bound below is
taken over it exactly. In L2, ``X`` lies inside that same box (an L2 ball of radius ε lies in
the L∞ ball of radius ε) and inside the unclipped L2 ball ``B₂``; both are sound outer sets, and
the bounds take the better of the two wherever the input enters:

* the first affine steps ``h = A x' + b`` (everything before the first ReLU or pooling): IBP's
  box of ``h_i`` is ``[A_i x + b_i ∓ ε‖A_i‖₂]`` (the exact range over ``B₂``; ``‖A_i‖₂`` of
  the composed steps, so Flatten and ``--normalize`` in front of the first layer are covered)
  intersected with the box's own interval;
* CROWN's input term: ``min_{B₂} Λ x' = Λ x − ε‖Λ‖₂`` (Cauchy–Schwarz, attained at
  ``x − ε Λᵀ/‖Λ‖₂``), and the larger of it and the box's ``Λ c₀ − |Λ| r₀``.

The exact minimum over the intersection ``B₂ ∩ [0, 1]^d`` is not computed: the larger of the
two is a lower bound on it (never above it), so clipping can only help and ignoring it is
still sound.

The network is read as a sequence of steps: affine maps ``h ↦ A h + b`` (Linear, Conv2d,
Flatten, eval-mode BatchNorm, AvgPool2d, Identity, Dropout in eval mode, and the normalisation
of ``--normalize``), ReLU, and MaxPool2d (IBP only).

* **IBP** (Gowal et al., 2018): boxes ``[l, u]`` pushed forward. An affine step maps centre
  ``c = (u + l)/2`` and radius ``r = (u − l)/2`` to ``A c + b`` and ``|A| r``; ReLU and max
  pooling are monotone, applied to both ends. The last affine step is folded with ``C``
  (``C A``, ``C b``), which is tighter than subtracting logit bounds.
* **CROWN** (Zhang et al., 2018): a linear lower bound ``m ≥ Λ x' + β`` built backwards from
  ``Λ = C``. An affine step gives ``Λ ← Λ A``, ``β ← β + Λ b``. A ReLU with pre-activation
  bounds ``l < 0 < u`` is relaxed between ``α z`` (``α = 1`` when ``u ≥ −l``, else 0) and
  ``u (z − l)/(u − l)``: the lower line where ``Λ ≥ 0``, the upper where ``Λ < 0``; stable
  ReLUs are the identity (``l ≥ 0``) or zero (``u ≤ 0``). At the input,
  ``min_{x' ∈ X} Λ x' = Λ c₀ − |Λ| r₀`` in L∞ (see above for L2). The pre-activation bounds
  of each ReLU come from CROWN itself (``crown``) or from IBP (``crown-ibp``, Zhang et al.,
  2020).

All arithmetic is in float64 on a copy of the network (never TF32).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input

from robustkit.errors import RobustkitError
from robustkit.models.zoo import Normalized

Method = Literal["ibp", "crown-ibp", "crown"]
METHODS: tuple[Method, ...] = ("ibp", "crown-ibp", "crown")
#: The balls the bounds cover (a subset of :data:`robustkit.vocabulary.Norm`).
BoundNorm = Literal["linf", "l2"]
BOUND_NORMS: tuple[BoundNorm, ...] = ("linf", "l2")

#: What the bounds cover, as the error for anything else names it.
SUPPORTED = ("Linear, Conv2d, ReLU, Flatten, BatchNorm (eval), AvgPool2d, MaxPool2d (IBP "
             "only), Identity, Dropout, and --normalize")


class Standardize(nn.Module):
    """``(x − mean) / std`` per channel: the affine step of a :class:`Normalized` model."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


_AFFINE = (nn.Linear, nn.Conv2d, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d,
           nn.Identity, nn.Dropout, Standardize)


def network_steps(model: nn.Module, *, live: bool = False) -> list[nn.Module]:
    """``model`` (a float64 copy, in eval mode) as its sequence of steps; a layer the bounds do
    not cover is one :class:`RobustkitError` naming it and what is covered. ``live``: the
    steps of ``model`` itself, its parameters, dtype and mode (what certified training
    differentiates)."""
    steps: list[nn.Module] = []

    def walk(module: nn.Module, path: str) -> None:
        if isinstance(module, Normalized):
            steps.append(Standardize(module.mean, module.std))
            walk(module.model, f"{path}.model" if path else "model")
        elif isinstance(module, nn.Sequential):
            for name, child in module.named_children():
                walk(child, f"{path}.{name}" if path else name)
        elif isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise RobustkitError(
                f"cannot bound the layer Conv2d at {path or 'the top'} with padding_mode="
                f"{module.padding_mode!r}: certification covers zero padding only; pad with "
                "zeros (the default)")
        elif isinstance(module, (*_AFFINE, nn.ReLU, nn.MaxPool2d)):
            steps.append(module)
        else:
            where = f" at {path}" if path else ""
            raise RobustkitError(
                f"cannot bound the layer {type(module).__name__}{where}: certification covers "
                f"{SUPPORTED}; write the network as an nn.Sequential of those")

    bounded = model if live else copy.deepcopy(model).double().eval()
    if bounded._forward_hooks:  # a picked output or a user's hook changes what forward means
        raise RobustkitError("cannot bound a model whose forward is changed by hooks "
                             "(--output): give the network that returns the logits")
    walk(bounded, "")
    if not steps:
        raise RobustkitError("the model has no layers to bound")
    return steps


def _abs_map(step: nn.Module, r: Tensor) -> Tensor:
    """``|A| r`` for the linear part ``A`` of an affine step (``r ≥ 0``)."""
    if isinstance(step, nn.Linear):
        return F.linear(r, step.weight.abs())
    if isinstance(step, nn.Conv2d):
        return F.conv2d(r, step.weight.abs(), None, step.stride, step.padding,
                        step.dilation, step.groups)
    if isinstance(step, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale = _batchnorm_scale(step)
        shape = (1, -1) + (1,) * (r.dim() - 2)
        return r * scale.abs().view(shape)
    if isinstance(step, Standardize):
        return r / step.std
    mapped: Tensor = step(r)  # Flatten, AvgPool2d, Identity, Dropout: non-negative maps
    return mapped


def _batchnorm_scale(step: nn.BatchNorm1d | nn.BatchNorm2d) -> Tensor:
    """``γ / √(σ² + ε)`` of an eval-mode BatchNorm (a negative γ gives a negative scale)."""
    if step.running_var is None:
        raise RobustkitError("cannot bound a BatchNorm without running statistics")
    weight = step.weight if step.weight is not None else torch.ones_like(step.running_var)
    return weight / torch.sqrt(step.running_var + step.eps)


def input_box(x: Tensor, eps: float | Tensor, dtype: torch.dtype = torch.float64
              ) -> tuple[Tensor, Tensor]:
    """The L∞ ball around ``x`` clipped to [0, 1], in ``dtype``: ``(lower, upper)``."""
    x = x.to(dtype)
    radius = torch.as_tensor(eps, dtype=dtype, device=x.device)
    if radius.dim() == 1:
        radius = radius.view(-1, *([1] * (x.dim() - 1)))
    return (x - radius).clamp(0, 1), (x + radius).clamp(0, 1)


def specification(logits_width: int, y: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``C`` ``[N, K − 1, K]`` in ``dtype``: rows ``e_y − e_j`` for every ``j ≠ y``."""
    eye = torch.eye(logits_width, dtype=dtype, device=y.device)
    rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # [N, K, K]: e_y − e_j for every j
    keep = ~F.one_hot(y, logits_width).bool()
    return rows[keep].view(len(y), logits_width - 1, logits_width)


@dataclass(frozen=True)
class L2Ball:
    """The unclipped L2 ball ``{x' : ‖x' − x‖₂ ≤ ε}`` around each sample (float64): the outer
    set the L2 bounds use beside the clipped box (see the module docstring)."""

    centre: Tensor  # [N, *shape]
    radius: Tensor  # [N]

    def linear_min(self, lambda_: Tensor) -> Tensor:
        """``min_{‖x' − x‖₂ ≤ ε} Λ x' = Λ x − ε‖Λ‖₂`` per row: ``Λ`` ``[N, S, *shape]`` →
        ``[N, S]``."""
        flat = lambda_.flatten(2)
        norms: Tensor = torch.linalg.vector_norm(flat, dim=2)
        return (flat * self.centre.flatten(1).unsqueeze(1)).sum(2) - self.radius[:, None] * norms


def l2_ball(x: Tensor, eps: float | Tensor) -> L2Ball:
    """The L2 ball of radius ``eps`` (one value, or one per sample) around ``x``."""
    radius = torch.as_tensor(eps, dtype=torch.float64, device=x.device)
    return L2Ball(x.double(), radius.expand(len(x)).clone() if radius.dim() == 0 else radius)


def input_term(lambda_: Tensor, lower: Tensor, upper: Tensor, ball: L2Ball | None = None
               ) -> Tensor:
    """``min Λ x'`` over the box ``[lower, upper]`` (``Λ c₀ − |Λ| r₀``), or with ``ball`` the
    larger of that and the ball's ``Λ x − ε‖Λ‖₂`` (both sound: the input set lies in each).
    ``Λ`` ``[N, S, *shape]`` → ``[N, S]``."""
    centre, radius = ((upper + lower) / 2).unsqueeze(1), ((upper - lower) / 2).unsqueeze(1)
    box = (lambda_ * centre).flatten(2).sum(2) - (lambda_.abs() * radius).flatten(2).sum(2)
    return box if ball is None else torch.maximum(box, ball.linear_min(lambda_))


def affine_prefix(steps: Sequence[nn.Module]) -> int:
    """How many leading steps are affine (the input layer: everything before the first ReLU
    or pooling)."""
    for k, step in enumerate(steps):
        if isinstance(step, (nn.ReLU, nn.MaxPool2d)):
            return k
    return len(steps)


#: Affine steps that map each value to one value (reshapes, per-channel scales): IBP is exact
#: through them, ``|D A| = |D| |A|`` and ``|A D| = |A| |D|``.
_ELEMENTWISE = (nn.Flatten, nn.Identity, nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d, Standardize)


def exact_prefix(steps: Sequence[nn.Module]) -> int:
    """How many leading steps IBP bounds exactly: the input layer when it has at most one step
    that mixes values (``|A| r`` of the composition is then ``|A|`` of the product), else 0.
    CROWN's backward pass gives nothing tighter there, so it is skipped."""
    prefix = affine_prefix(steps)
    mixing = sum(not isinstance(step, _ELEMENTWISE) for step in steps[:prefix])
    return prefix if mixing <= 1 else 0


def _row_norms(chain: Sequence[nn.Module], shape: Sequence[int], device: torch.device
               ) -> Tensor:
    """``‖A_i‖₂`` for every output ``i`` of the affine chain ``h = A x + b`` on inputs of
    ``shape``: ``‖A_i‖₂² = Σ_k (A e_k)_i²``, the basis pushed through in chunks."""
    width = int(torch.tensor(shape).prod())

    def run(h: Tensor) -> Tensor:
        for step in chain:
            h = step(h)
        return h

    offset = run(torch.zeros((1, *shape), dtype=torch.float64, device=device))
    squares = torch.zeros_like(offset[0])
    for first in range(0, width, ROWS_PER_PASS):
        basis = torch.eye(width, dtype=torch.float64, device=device)[first:first + ROWS_PER_PASS]
        squares += (run(basis.view(-1, *shape)) - offset).pow(2).sum(0)
    return squares.sqrt()


def _tighten_with_ball(steps: Sequence[nn.Module], box: tuple[Tensor, Tensor], ball: L2Ball
                       ) -> tuple[Tensor, Tensor]:
    """The box of the affine chain ``steps`` (``h = A x' + b``) intersected with its exact
    range over the L2 ball, ``A x + b ∓ ε‖A_i‖₂``."""
    centre = ball.centre
    for step in steps:
        centre = step(centre)
    shape = (len(centre),) + (1,) * (centre.dim() - 1)
    spread = ball.radius.view(shape) * _row_norms(steps, ball.centre.shape[1:],
                                                  centre.device)
    lo, hi = box
    return torch.maximum(lo, centre - spread), torch.minimum(hi, centre + spread)


@dataclass(frozen=True)
class Bounds:
    """Lower bounds on the margins ``[N, K − 1]`` (``j ≠ y`` in class order) and what they
    certify: every margin positive."""

    margins: Tensor

    @property
    def certified(self) -> Tensor:
        return (self.margins > 0).all(dim=1)


def interval_bounds(steps: Sequence[nn.Module], lower: Tensor, upper: Tensor,
                    ball: L2Ball | None = None) -> list[tuple[Tensor, Tensor]]:
    """IBP: the box of every step's input, then of the output: ``len(steps) + 1`` boxes. With
    ``ball`` the output box of the input layer (:func:`affine_prefix`) is intersected with its
    range over the L2 ball."""
    boxes = [(lower, upper)]
    prefix = affine_prefix(steps) if ball is not None else -1
    for k, step in enumerate(steps):
        lo, hi = boxes[-1]
        if isinstance(step, (nn.ReLU, nn.MaxPool2d)):
            boxes.append((step(lo), step(hi)))
        else:
            centre, radius = step((hi + lo) / 2), _abs_map(step, (hi - lo) / 2)
            boxes.append((centre - radius, centre + radius))
        if ball is not None and k + 1 == prefix:
            boxes[-1] = _tighten_with_ball(steps[:prefix], boxes[-1], ball)
    return boxes


def ibp_margins(steps: Sequence[nn.Module], lower: Tensor, upper: Tensor, y: Tensor,
                ball: L2Ball | None = None) -> Tensor:
    """IBP lower bounds on the margins, the last Linear step folded with ``C``. In L2
    (``ball``) a network that is affine throughout is bounded exactly (``C A x − ε‖(C A)_j‖₂``,
    with the box as above)."""
    if ball is not None and affine_prefix(steps) == len(steps):
        return _affine_margins(steps, lower, upper, y, ball)
    last = steps[-1]
    if not isinstance(last, nn.Linear):
        lo, hi = interval_bounds(steps, lower, upper, ball)[-1]
        return (lo.gather(1, y[:, None]) - hi)[~F.one_hot(y, lo.shape[1]).bool()].view(
            len(y), -1)
    lo, hi = interval_bounds(steps[:-1], lower, upper, ball)[-1]
    spec = specification(last.out_features, y, lower.dtype)
    weight = spec @ last.weight  # [N, K − 1, features]
    bias = spec @ last.bias if last.bias is not None else 0.0
    centre, radius = (hi + lo) / 2, (hi - lo) / 2
    return (weight @ centre.unsqueeze(2)).squeeze(2) + bias - (
        weight.abs() @ radius.unsqueeze(2)).squeeze(2)


def _affine_margins(steps: Sequence[nn.Module], lower: Tensor, upper: Tensor, y: Tensor,
                    ball: L2Ball | None) -> Tensor:
    """The margins of an affine network, bounded by its one linear form (exact over the
    outer set)."""
    boxes = interval_bounds(steps, lower, upper)
    shapes = [tuple(lo.shape[1:]) for lo, _ in boxes[:-1]]
    spec = specification(boxes[-1][0].shape[1], y)
    return backward_bound(steps, shapes, boxes[:-1], spec, lower, upper, ball)


def _vjp(step: nn.Module, shape: Sequence[int], cotangent: Tensor) -> tuple[Tensor, Tensor]:
    """``(Λ A, Λ b)`` for the affine step ``h ↦ A h + b`` with inputs of ``shape`` (one
    sample) and ``Λ`` ``[N, S, *output]``: ``[N, S, *shape]`` and ``[N, S]``. Linear and
    Conv2d apply ``Aᵀ`` directly (a transposed convolution); the other steps, elementwise and
    cheap, by autograd through one pass over zeros (whose output is ``b``)."""
    n, s = cotangent.shape[:2]
    flat = cotangent.reshape(n * s, *cotangent.shape[2:])
    if isinstance(step, nn.Linear):
        grad = flat @ step.weight
        bias = flat @ step.bias if step.bias is not None else flat.new_zeros(n * s)
    elif isinstance(step, nn.Conv2d) and not isinstance(step.padding, str):
        grad = conv2d_input((n * s, *shape), step.weight, flat, step.stride, step.padding,
                            step.dilation, step.groups)
        bias = (flat.sum((2, 3)) @ step.bias if step.bias is not None
                else flat.new_zeros(n * s))
    else:
        zero = torch.zeros((n * s, *shape), dtype=cotangent.dtype, device=cotangent.device,
                           requires_grad=True)
        with torch.enable_grad():
            out = step(zero)
        (grad,) = torch.autograd.grad(out, zero, grad_outputs=flat)
        bias = (flat * out.detach()).flatten(1).sum(1)
    return grad.reshape(n, s, *shape), bias.view(n, s)


def _relax(lambda_: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``Λ`` through a ReLU with input bounds ``[lo, hi]`` (CROWN's lower bound): the new
    ``Λ`` and the intercepts ``[N, S]`` it adds."""
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    unstable = (lo < 0) & (hi > 0)
    width = torch.where(unstable, hi - lo, torch.ones_like(hi))
    upper_slope = torch.where(unstable, hi / width, (lo >= 0).to(hi.dtype))
    upper_intercept = torch.where(unstable, -upper_slope * lo, torch.zeros_like(lo))
    lower_slope = torch.where(unstable, (hi >= -lo).to(hi.dtype), (lo >= 0).to(hi.dtype))
    positive, negative = lambda_.clamp(min=0), lambda_.clamp(max=0)
    intercept = (negative * upper_intercept).flatten(2).sum(2)
    return positive * lower_slope + negative * upper_slope, intercept


def backward_bound(steps: Sequence[nn.Module], shapes: Sequence[Sequence[int]],
                   boxes: Sequence[tuple[Tensor, Tensor]], spec: Tensor, lower: Tensor,
                   upper: Tensor, ball: L2Ball | None = None) -> Tensor:
    """CROWN: the lower bound of ``spec · f(x')`` over the input box ``[lower, upper]`` (and,
    with ``ball``, the L2 ball: :func:`input_term`), for ``f`` the composition of ``steps``
    (``shapes``: each step's input shape; ``boxes``: each step's input bounds, used at the
    ReLUs). ``spec`` ``[N, S, *output]``; returns ``[N, S]``."""
    lambda_, beta = spec, torch.zeros(spec.shape[:2], dtype=torch.float64, device=spec.device)
    for step, shape, (lo, hi) in zip(reversed(steps), reversed(shapes), reversed(boxes),
                                     strict=True):
        if isinstance(step, nn.ReLU):
            lambda_, intercept = _relax(lambda_, lo, hi)
        elif isinstance(step, nn.MaxPool2d):
            raise RobustkitError("CROWN does not cover MaxPool2d: use the IBP bound for this "
                                 "model (--method ibp), or pool with AvgPool2d or a strided "
                                 "convolution")
        else:
            lambda_, intercept = _vjp(step, shape, lambda_)
        beta = beta + intercept
    return input_term(lambda_, lower, upper, ball) + beta


#: Neurons bounded per backward pass of CROWN's intermediate bounds.
ROWS_PER_PASS = 256


def _crown_boxes(steps: Sequence[nn.Module], shapes: Sequence[Sequence[int]],
                 boxes: list[tuple[Tensor, Tensor]], lower: Tensor, upper: Tensor,
                 ball: L2Ball | None = None, intersect: bool = True
                 ) -> list[tuple[Tensor, Tensor]]:
    """The input bounds of every ReLU tightened by CROWN (identity specification over the
    ReLU's inputs), front to back; the other boxes as given (IBP's, exact at the input layer
    as :func:`exact_prefix` says). Only neurons unstable under the current box (for some
    sample of the batch) are bounded: a stable ReLU is relaxed exactly (the identity or 0)
    whatever its bounds, so tightening it changes no bound downstream.

    Each CROWN bound is intersected with IBP's (both are sound), which helps most on
    IBP-trained networks, where IBP's box is often the tighter. ``intersect=False`` keeps
    CROWN's alone, the textbook CROWN that auto_LiRPA computes (its cross-check uses it); with
    the adaptive lower slope a tighter box does not always give a tighter final bound, so the
    two can differ either way."""
    tight = list(boxes)
    exact = exact_prefix(steps)
    for k, step in enumerate(steps):
        if not isinstance(step, nn.ReLU) or k <= exact:
            continue
        n, width = len(lower), int(torch.tensor(shapes[k]).prod())
        low, high = (b.flatten(1).clone() for b in tight[k])
        unstable = ((low < 0) & (high > 0)).any(0).nonzero().flatten()
        for rows in unstable.split(ROWS_PER_PASS):  # memory: n × rows × the input's size
            basis = torch.zeros((len(rows), width), dtype=torch.float64, device=lower.device)
            basis[torch.arange(len(rows)), rows] = 1.0
            spec = basis.expand(n, *basis.shape).reshape(n, len(rows), *shapes[k])
            crown_low = backward_bound(steps[:k], shapes[:k], tight[:k], spec, lower, upper,
                                       ball)
            crown_high = -backward_bound(steps[:k], shapes[:k], tight[:k], -spec, lower, upper,
                                         ball)
            low[:, rows] = torch.maximum(low[:, rows], crown_low) if intersect else crown_low
            high[:, rows] = (torch.minimum(high[:, rows], crown_high) if intersect
                             else crown_high)
        tight[k] = (low.view_as(tight[k][0]), high.view_as(tight[k][1]))
    return tight


def check_norm(norm: str) -> BoundNorm:
    """``norm`` when the bounds cover it, else one :class:`RobustkitError`."""
    if norm not in BOUND_NORMS:
        raise RobustkitError(f"certification covers the norms {', '.join(BOUND_NORMS)}, not "
                             f"{norm!r}: certify with --norm linf or --norm l2")
    return norm


def margin_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor,
                  method: Method = "crown-ibp", norm: BoundNorm = "linf") -> Bounds:
    """Lower bounds on every margin ``z_y − z_j`` of ``model`` over the ε-ball of ``norm``
    around each sample of ``x`` clipped to [0, 1] (``eps``: one value or one per sample; see
    the module docstring for the methods and norms)."""
    return step_bounds(network_steps(model), x, y, eps, method, norm)


def step_bounds(steps: Sequence[nn.Module], x: Tensor, y: Tensor, eps: float | Tensor,
                method: Method = "crown-ibp", norm: BoundNorm = "linf") -> Bounds:
    """:func:`margin_bounds` of a network already read by :func:`network_steps`."""
    if method not in METHODS:
        raise RobustkitError(f"unknown bound {method!r}: choose one of {', '.join(METHODS)}")
    x = x.to(next(iter(_tensors(steps)), x).device)
    lower, upper = input_box(x, eps)
    ball = l2_ball(x, eps) if check_norm(norm) == "l2" else None
    y = y.to(lower.device)
    with torch.no_grad():
        if method == "ibp":
            return Bounds(ibp_margins(steps, lower, upper, y, ball))
        boxes = interval_bounds(steps, lower, upper, ball)
        shapes = [tuple(lo.shape[1:]) for lo, _ in boxes[:-1]]
        if method == "crown":
            boxes = _crown_boxes(steps, shapes, boxes, lower, upper, ball)
        out_lo = boxes[-1][0]
        spec = specification(out_lo.shape[1], y)
        return Bounds(backward_bound(steps, shapes, boxes[:-1], spec, lower, upper, ball))


def _tensors(steps: Sequence[nn.Module]) -> list[Tensor]:
    return [t for step in steps for t in (*step.parameters(), *step.buffers())]


def certified_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor,
                       method: Method = "crown-ibp", batch_size: int = 100,
                       progress: Callable[[int], None] | None = None,
                       norm: BoundNorm = "linf") -> Tensor:
    """Per sample ``[N]``: certified at ``eps`` (one value, or one per sample) by ``method``
    in ``norm``, in batches."""
    steps = network_steps(model)
    radius = torch.as_tensor(eps, dtype=torch.float64)
    parts = []
    for start in range(0, len(x), batch_size):
        part = radius if radius.dim() == 0 else radius[start:start + batch_size]
        parts.append(step_bounds(steps, x[start:start + batch_size],
                                 y[start:start + batch_size], part, method, norm
                                 ).certified.cpu())
        if progress is not None:
            progress(len(parts[-1]))
    return torch.cat(parts)
