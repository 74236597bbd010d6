"""Certified lower bounds on a classifier's margins over the L∞ ε-ball: IBP, CROWN-IBP, CROWN.

Specification. For a sample ``(x, y)`` and each class ``j ≠ y`` the margin is
``m_j(x') = z_y(x') − z_j(x') = (C z(x'))_j`` with ``C = e_y − e_j``. Over the input box
``X = [max(x − ε, 0), min(x + ε, 1)]`` (the ε-ball clipped to the pixel range), a sample is
**certified** when every lower bound ``m̲_j ≤ min_{x' ∈ X} m_j(x')`` is positive: no attack
can change its prediction. A clean-misclassified sample never is (``m̲_j ≤ m_j(x) < 0``).

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
  ``min_{x' ∈ X} Λ x' = Λ c₀ − |Λ| r₀``. The pre-activation bounds of each ReLU come from
  CROWN itself (``crown``) or from IBP (``crown-ibp``, Zhang et al., 2020).

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

from robustkit.errors import RobustkitError
from robustkit.models.zoo import Normalized

Method = Literal["ibp", "crown-ibp", "crown"]
METHODS: tuple[Method, ...] = ("ibp", "crown-ibp", "crown")

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
class Bounds:
    """Lower bounds on the margins ``[N, K − 1]`` (``j ≠ y`` in class order) and what they
    certify: every margin positive."""

    margins: Tensor

    @property
    def certified(self) -> Tensor:
        return (self.margins > 0).all(dim=1)


def interval_bounds(steps: Sequence[nn.Module], lower: Tensor, upper: Tensor
                    ) -> list[tuple[Tensor, Tensor]]:
    """IBP: the box of every step's input, then of the output: ``len(steps) + 1`` boxes."""
    boxes = [(lower, upper)]
    for step in steps:
        lo, hi = boxes[-1]
        if isinstance(step, (nn.ReLU, nn.MaxPool2d)):
            boxes.append((step(lo), step(hi)))
        else:
            centre, radius = step((hi + lo) / 2), _abs_map(step, (hi - lo) / 2)
            boxes.append((centre - radius, centre + radius))
    return boxes


def ibp_margins(steps: Sequence[nn.Module], lower: Tensor, upper: Tensor, y: Tensor
                ) -> Tensor:
    """IBP lower bounds on the margins, the last Linear step folded with ``C``."""
    last = steps[-1]
    if not isinstance(last, nn.Linear):
        lo, hi = interval_bounds(steps, lower, upper)[-1]
        return (lo.gather(1, y[:, None]) - hi)[~F.one_hot(y, lo.shape[1]).bool()].view(
            len(y), -1)
    lo, hi = interval_bounds(steps[:-1], lower, upper)[-1]
    spec = specification(last.out_features, y, lower.dtype)
    weight = spec @ last.weight  # [N, K − 1, features]
    bias = spec @ last.bias if last.bias is not None else 0.0
    centre, radius = (hi + lo) / 2, (hi - lo) / 2
    return (weight @ centre.unsqueeze(2)).squeeze(2) + bias - (
        weight.abs() @ radius.unsqueeze(2)).squeeze(2)


def _vjp(step: nn.Module, shape: Sequence[int], cotangent: Tensor) -> tuple[Tensor, Tensor]:
    """``(Λ A, Λ b)`` for the affine step ``h ↦ A h + b`` with inputs of ``shape`` (one
    sample) and ``Λ`` ``[N, S, *output]``: ``[N, S, *shape]`` and ``[N, S]``."""
    n, s = cotangent.shape[:2]
    zero = torch.zeros((n * s, *shape), dtype=torch.float64, device=cotangent.device,
                       requires_grad=True)
    with torch.enable_grad():
        out = step(zero)
    flat = cotangent.reshape(n * s, *out.shape[1:])
    (grad,) = torch.autograd.grad(out, zero, grad_outputs=flat)
    bias = (flat * out.detach()).flatten(1).sum(1)
    return grad.view(n, s, *shape), bias.view(n, s)


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
                   upper: Tensor) -> Tensor:
    """CROWN: the lower bound of ``spec · f(x')`` over the input box ``[lower, upper]``, for
    ``f`` the composition of ``steps`` (``shapes``: each step's input shape; ``boxes``: each
    step's input bounds, used at the ReLUs). ``spec`` ``[N, S, *output]``; returns ``[N, S]``."""
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
    centre, radius = ((upper + lower) / 2).unsqueeze(1), ((upper - lower) / 2).unsqueeze(1)
    return (lambda_ * centre).flatten(2).sum(2) - (lambda_.abs() * radius).flatten(2).sum(2) + beta


#: Neurons bounded per backward pass of CROWN's intermediate bounds.
ROWS_PER_PASS = 256


def _crown_boxes(steps: Sequence[nn.Module], shapes: Sequence[Sequence[int]],
                 boxes: list[tuple[Tensor, Tensor]], lower: Tensor, upper: Tensor
                 ) -> list[tuple[Tensor, Tensor]]:
    """The input bounds of every ReLU tightened by CROWN (identity specification over the
    ReLU's inputs), front to back; the other boxes as given (IBP's)."""
    tight = list(boxes)
    for k, step in enumerate(steps):
        if not isinstance(step, nn.ReLU) or k == 0:
            continue
        n, width = len(lower), int(torch.tensor(shapes[k]).prod())
        lows, highs = [], []
        for first in range(0, width, ROWS_PER_PASS):  # memory: n × rows × the input's size
            rows = torch.eye(width, dtype=torch.float64, device=lower.device)[
                first:first + ROWS_PER_PASS]
            spec = rows.expand(n, *rows.shape).reshape(n, len(rows), *shapes[k])
            lows.append(backward_bound(steps[:k], shapes[:k], tight[:k], spec, lower, upper))
            highs.append(-backward_bound(steps[:k], shapes[:k], tight[:k], -spec, lower, upper))
        low, high = torch.cat(lows, dim=1), torch.cat(highs, dim=1)
        ibp_lo, ibp_hi = tight[k]
        tight[k] = (torch.maximum(low.view_as(ibp_lo), ibp_lo),
                    torch.minimum(high.view_as(ibp_hi), ibp_hi))
    return tight


def margin_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor,
                  method: Method = "crown-ibp") -> Bounds:
    """Lower bounds on every margin ``z_y − z_j`` of ``model`` over the L∞ ε-ball around each
    sample of ``x`` clipped to [0, 1] (see the module docstring for the methods)."""
    if method not in METHODS:
        raise RobustkitError(f"unknown bound {method!r}: choose one of {', '.join(METHODS)}")
    steps = network_steps(model)
    lower, upper = input_box(x.to(next(iter(_tensors(steps)), x).device), eps)
    y = y.to(lower.device)
    with torch.no_grad():
        if method == "ibp":
            return Bounds(ibp_margins(steps, lower, upper, y))
        boxes = interval_bounds(steps, lower, upper)
        shapes = [tuple(lo.shape[1:]) for lo, _ in boxes[:-1]]
        if method == "crown":
            boxes = _crown_boxes(steps, shapes, boxes, lower, upper)
        out_lo = boxes[-1][0]
        spec = specification(out_lo.shape[1], y)
        return Bounds(backward_bound(steps, shapes, boxes[:-1], spec, lower, upper))


def _tensors(steps: Sequence[nn.Module]) -> list[Tensor]:
    return [t for step in steps for t in (*step.parameters(), *step.buffers())]


def certified_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float,
                       method: Method = "crown-ibp", batch_size: int = 100,
                       progress: Callable[[int], None] | None = None) -> Tensor:
    """Per sample ``[N]``: certified at ``eps`` by ``method``, in batches."""
    parts = []
    for start in range(0, len(x), batch_size):
        parts.append(margin_bounds(model, x[start:start + batch_size],
                                   y[start:start + batch_size], eps, method).certified.cpu())
        if progress is not None:
            progress(len(parts[-1]))
    return torch.cat(parts)
