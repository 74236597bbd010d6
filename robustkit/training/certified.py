"""Certified training: IBP (Gowal et al., 2018) and CROWN-IBP (Zhang et al., 2020).

The loss bounds the worst case over the L∞ ball instead of sampling it. For a sample
``(x, y)`` let ``m̲_j ≤ min_{x' ∈ X} (z_y(x') − z_j(x'))`` be lower bounds on the margins over
the box ``X = [x − ε, x + ε] ∩ [0, 1]^d``. The robust loss is the cross-entropy of the vector
``z̃`` with ``z̃_y = 0`` and ``z̃_j = −m̲_j``::

    CE(z̃, y) = log(1 + Σ_{j ≠ y} exp(−m̲_j)) ≥ max_{x' ∈ X} CE(f(x'), y),

an upper bound on the adversarial loss (each ``z_j − z_y ≤ −m̲_j``). At ε = 0 the bounds are
the margins themselves and it is the clean cross-entropy. The training loss at iteration t is::

    L_t = κ_t · CE(f(x), y) + (1 − κ_t) · CE(z̃_t, y),
    m̲_t = β_t · m̲_CROWN-IBP + (1 − β_t) · m̲_IBP        (IBP alone: β_t = 0)

with the bounds of :mod:`robustkit.certify.bounds` (``interval_bounds``, ``ibp_margins``,
``_relax``) run on the live network in its own float32 and differentiated through; TF32 is
turned off for the whole run (:func:`exact_float32`), so bounds are never computed in it.

Schedules (:func:`schedule`), per iteration: ε is 0 through ``start_epochs`` clean epochs,
then ramps to ``train_eps`` over ``ramp_epochs`` epochs (``linear``, or ``smooth``: Shi et al.,
2021 — polynomial growth ``p⁴`` up to a quarter of the ramp, then the tangent line to 1), then
stays there. κ and β move linearly from their start to their end values over the same ramp.
The first step of the ramp already has ε > 0, and full ε is reached only at its last step.

Initialisation (:func:`ibp_initialise`): Shi et al. (2021)'s IBP initialisation. Every
convolution and linear layer but the last draws ``W ~ N(0, σ²)`` with ``σ = √(2π) / n_in``
(``n_in`` the fan-in) and a zero bias: then ``E|W| n_in = 2`` and, since a ReLU halves the
width of an interval centred near 0, the width of the IBP box stays about constant from layer
to layer instead of growing by a factor ≈ √n_in per layer (the default He/LeCun scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.certify.bounds import (
    _relax,
    certified_accuracy,
    ibp_margins,
    input_box,
    interval_bounds,
    network_steps,
    specification,
)
from robustkit.config import CertifiedConfig
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.vocabulary import CertifiedMethod

#: The smooth ramp's join (fraction of the ramp) and exponent: ``p^k`` up to ``μ``, then linear.
SMOOTH_JOIN, SMOOTH_POWER = 0.25, 4


@dataclass(frozen=True)
class CertifiedStep:
    """The schedules' values at one iteration: ε, κ (clean weight) and β (CROWN-IBP weight)."""

    eps: float
    kappa: float
    beta: float


def ramp_progress(cfg: CertifiedConfig, iteration: int, steps_per_epoch: int) -> float:
    """``p_t ∈ [0, 1]`` after step ``t`` (0-based): 0 through the ``start_epochs`` clean epochs,
    ``(t + 1 − S) / R`` over the ramp (``S``, ``R``: its start and length in steps), 1 after;
    without a ramp (``R = 0``, fine-tuning) 1 from step ``S``."""
    start = cfg.start_epochs * steps_per_epoch
    length = cfg.ramp_epochs * steps_per_epoch
    if length == 0:
        return 1.0 if iteration >= start else 0.0
    return min(max((iteration + 1 - start) / length, 0.0), 1.0)


def smooth_ramp(p: float, join: float = SMOOTH_JOIN, power: int = SMOOTH_POWER) -> float:
    """Shi et al. (2021)'s shape of ε's warm-up: ``a·p^k`` for ``p ≤ μ``, then the tangent line
    at ``μ`` up to 1 at ``p = 1`` (continuous with its slope; ``a`` chosen so it ends at 1):
    ``a = 1 / (μ^{k−1} (μ + k (1 − μ)))``."""
    a = 1.0 / (join ** (power - 1) * (join + power * (1 - join)))
    if p <= join:
        return a * p ** power
    return a * join ** power + a * power * join ** (power - 1) * (p - join)


def schedule(cfg: CertifiedConfig, iteration: int, steps_per_epoch: int) -> CertifiedStep:
    """ε, κ and β for step ``iteration`` (0-based, counted over the whole run)."""
    p = ramp_progress(cfg, iteration, steps_per_epoch)
    shape = smooth_ramp(p) if cfg.ramp == "smooth" else p
    return CertifiedStep(
        eps=cfg.final_eps * shape,
        kappa=cfg.kappa_start + (cfg.kappa_end - cfg.kappa_start) * p,
        beta=cfg.beta_start + (cfg.beta_end - cfg.beta_start) * p,
    )


def exact_float32() -> None:
    """Turn TF32 off for this process (cuBLAS and cuDNN): bounds computed with a 10-bit
    mantissa would not bound anything. A no-op on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@torch.no_grad()
def ibp_initialise(model: nn.Module) -> None:
    """Shi et al. (2021)'s IBP initialisation (module docstring): every Conv2d/Linear weight but
    the last layer's ~ ``N(0, (√(2π)/n_in)²)``, those biases 0. Draws from the global
    generator (seeded by the training run)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for layer in layers[:-1]:
        fan_in = layer.weight[0].numel()
        layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
        if layer.bias is not None:
            layer.bias.zero_()


def live_steps(model: nn.Module, method: CertifiedMethod) -> list[nn.Module]:
    """The steps of the live ``model`` (its parameters, in its dtype) that the bounds run
    through; one :class:`RobustkitError` for a layer they do not cover, for max pooling under
    CROWN-IBP, and for BatchNorm or Dropout while training (not affine maps then)."""
    steps = network_steps(model, live=True)
    for step in steps:
        moving = isinstance(step, (nn.BatchNorm1d, nn.BatchNorm2d)) or (
            isinstance(step, nn.Dropout) and step.p > 0)
        if moving and step.training:
            raise RobustkitError(
                f"{method} training cannot bound {type(step).__name__} while training (it is "
                "not a fixed affine map then): remove it from the network")
        if method == "crown-ibp" and isinstance(step, nn.MaxPool2d):
            raise RobustkitError("crown-ibp training cannot bound MaxPool2d: use a strided "
                                 "network (dm-small, dm-medium, strided-cnn) or method ibp")
    return steps


def _affine_back(step: nn.Module, lambda_: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``(Λ A, Λ b)`` for the affine step ``h ↦ A h + b`` with inputs of ``shape`` (one
    sample), ``Λ`` ``[N, S, *output]``, differentiable in ``Λ`` and the step's parameters.
    Linear: ``Λ W``; Conv2d: the transposed convolution; Flatten: a reshape; any other affine
    step: the vector-Jacobian product at 0 (its output there is ``b``)."""
    n, s = lambda_.shape[:2]
    if isinstance(step, nn.Linear):
        bias = lambda_ @ step.bias if step.bias is not None else lambda_.new_zeros(n, s)
        return lambda_ @ step.weight, bias
    if isinstance(step, nn.Conv2d) and step.padding_mode == "zeros" and isinstance(
            step.padding, tuple):
        return _conv_back(step, lambda_, shape)
    if isinstance(step, nn.Flatten):
        return lambda_.reshape(n, s, *shape), lambda_.new_zeros(n, s)
    zero = lambda_.new_zeros((n * s, *shape), requires_grad=True)
    with torch.enable_grad():
        out = step(zero)
    flat = lambda_.reshape(n * s, *out.shape[1:])
    (grad,) = torch.autograd.grad(out, zero, grad_outputs=flat, create_graph=True)
    return grad.view(n, s, *shape), (flat * out).flatten(1).sum(1).view(n, s)


def _conv_back(step: nn.Conv2d, lambda_: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``Λ`` through a convolution: ``conv_transpose2d`` with the output padding that restores
    the input's height and width; the intercept ``Σ_{c,h,w} Λ_{c,h,w} b_c``."""
    n, s = lambda_.shape[:2]
    out_h, out_w = lambda_.shape[-2:]
    extra = []
    for size, out, k, stride, pad, dil in zip(shape[1:], (out_h, out_w), step.kernel_size,
                                              step.stride, step.padding, step.dilation,
                                              strict=True):
        extra.append(int(size) - ((out - 1) * stride - 2 * int(pad) + dil * (k - 1) + 1))
    back = F.conv_transpose2d(lambda_.reshape(n * s, *lambda_.shape[2:]), step.weight, None,
                              step.stride, _padding_pair(step.padding), tuple(extra),
                              step.groups, step.dilation)
    bias = (lambda_.sum((3, 4)) @ step.bias if step.bias is not None
            else lambda_.new_zeros(n, s))
    return back.view(n, s, *shape), bias


def _padding_pair(padding: object) -> tuple[int, int]:
    """A Conv2d's numeric padding as the pair ``conv_transpose2d`` takes."""
    if not isinstance(padding, tuple):
        raise TypeError(f"numeric padding expected, not {padding!r}")
    return int(padding[0]), int(padding[1])


def crown_ibp_margins(steps: Sequence[nn.Module], boxes: Sequence[tuple[Tensor, Tensor]],
                      lower: Tensor, upper: Tensor, y: Tensor) -> Tensor:
    """CROWN-IBP lower bounds ``[N, K − 1]`` on the margins: ``Λ = C`` at the logits, pushed
    back through every step (affine: ``Λ ← Λ A``, ``c ← c + Λ b``; ReLU: CROWN's relaxation
    over the IBP box of its input), then ``min_{x' ∈ X} Λ x' = Λ c₀ − |Λ| r₀`` at the input."""
    lambda_ = specification(boxes[-1][0].shape[1], y, lower.dtype)
    total = lambda_.new_zeros(lambda_.shape[:2])
    for step, (lo, hi) in zip(reversed(steps), reversed(boxes[:-1]), strict=True):
        if isinstance(step, nn.ReLU):
            lambda_, intercept = _relax(lambda_, lo, hi)
        else:
            lambda_, intercept = _affine_back(step, lambda_, lo.shape[1:])
        total = total + intercept
    centre, radius = ((upper + lower) / 2).unsqueeze(1), ((upper - lower) / 2).unsqueeze(1)
    return ((lambda_ * centre).flatten(2).sum(2) - (lambda_.abs() * radius).flatten(2).sum(2)
            + total)


def margin_lower_bounds(steps: Sequence[nn.Module], x: Tensor, y: Tensor, eps: float,
                        beta: float) -> Tensor:
    """``m̲ = β·CROWN-IBP + (1 − β)·IBP`` ``[N, K − 1]`` over the L∞ ε-box of ``x`` clipped to
    [0, 1], in ``x``'s dtype, differentiable in the steps' parameters (IBP alone at β = 0)."""
    lower, upper = input_box(x, eps, x.dtype)
    if beta == 0:
        return ibp_margins(steps, lower, upper, y)
    boxes = interval_bounds(steps, lower, upper)
    ibp = ibp_margins(steps[-1:], *boxes[-2], y) if isinstance(steps[-1], nn.Linear) else (
        ibp_margins(steps, lower, upper, y))
    crown = crown_ibp_margins(steps, boxes, lower, upper, y)
    return beta * crown + (1 - beta) * ibp


def robust_cross_entropy(margins: Tensor, y: Tensor) -> Tensor:
    """``CE(z̃, y)`` with ``z̃_y = 0``, ``z̃_j = −m̲_j``, averaged over the batch:
    ``mean log(1 + Σ_{j≠y} exp(−m̲_j))`` (``margins`` ``[N, K − 1]``; the order of the
    classes does not matter, so ``z̃`` is laid out with ``y`` first)."""
    shifted = torch.cat([margins.new_zeros(len(margins), 1), -margins], dim=1)
    return F.cross_entropy(shifted, torch.zeros_like(y))


def certified_loss(model: nn.Module, x: Tensor, y: Tensor, step: CertifiedStep,
                   method: CertifiedMethod, label_smoothing: float = 0.0
                   ) -> tuple[Tensor, Tensor]:
    """``κ·CE(f(x), y) + (1 − κ)·CE(z̃, y)`` (module docstring) and the clean logits; the
    bounds are skipped where they cannot count (κ = 1, or ε = 0 where CE(z̃, y) is the clean
    cross-entropy itself)."""
    logits = model(x)
    clean = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if step.kappa == 1 or step.eps == 0:
        return clean, logits
    beta = step.beta if method == "crown-ibp" else 0.0
    margins = margin_lower_bounds(live_steps(model, method), x, y, step.eps, beta)
    return step.kappa * clean + (1 - step.kappa) * robust_cross_entropy(margins, y), logits


def certified_fraction(model: nn.Module, split: Split, eps: float, method: CertifiedMethod,
                       batch_size: int = 250) -> float:
    """The fraction of ``split`` certified at ``eps`` by the float64 bounds of
    :mod:`robustkit.certify.bounds` (IBP, or the better of IBP and CROWN-IBP per sample for a
    CROWN-IBP-trained model): what validation reports and selects on."""
    if len(split) == 0:
        return float("nan")
    x, y = split.images, split.labels
    certified = certified_accuracy(model, x, y, eps, "ibp", batch_size)
    if method == "crown-ibp":
        certified |= certified_accuracy(model, x, y, eps, "crown-ibp", batch_size)
    return float(certified.float().mean())
