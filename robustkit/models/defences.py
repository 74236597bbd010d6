"""Input-preprocessing defences, and BPDA to attack through them (Athalye, Carlini & Wagner, 2018).

A preprocessing defence classifies ``f(g(x))`` where ``g`` rewrites the input first. Three are
shipped, as examples of the two ways such a ``g`` defeats a gradient attack:

* :class:`BitDepth` ``g(x) = round(x·L)/L``, ``L = 2^b − 1`` (Xu et al., 2018, feature squeezing):
  piecewise constant, so ``∇g = 0`` almost everywhere, and the attack has nothing to follow;
* :class:`MedianFilter` (``k×k`` median, reflect padding): its gradient reaches one pixel per
  window, a sparse and shattered signal;
* :class:`GaussianNoise` ``g(x) = clamp(x + σ·n, 0, 1)``, ``n ∼ N(0, I)`` drawn in every pass:
  a randomised defence; attack it with EOT (:class:`robustkit.attacks.transforms.EOT`).

**BPDA** (Backward Pass Differentiable Approximation) keeps the forward pass ``f(g(x))`` exactly
and replaces ``∇g`` in the backward pass by the gradient of a differentiable ``h ≈ g``::

    forward:  f(g(x))          backward:  ∇_x L ≈ J_h(x)ᵀ · ∇_{g(x)} L(f(g(x)), y)

``h = identity`` (for ``g(x) ≈ x``) passes the gradient straight through; ``"mean-filter"``
approximates the median by the ``k×k`` mean. :func:`with_bpda` returns that view of a
:class:`Defended` model; predictions are unchanged, so only the attack's gradients differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.defence_specs import DEFAULT_BITS, DEFAULT_SIGMA, DEFAULT_SIZE, describe_step
from robustkit.errors import RobustkitError
from robustkit.vocabulary import PREPROCESSING, Approximation, Preprocess


class Preprocessing(nn.Module):
    """``g``: ``[N, C, H, W]`` in [0, 1] → the same shape in [0, 1]; no parameters."""

    #: True when two passes over the same input may differ (attack with EOT).
    random = False
    #: The BPDA approximations this step accepts, by name.
    approximations: tuple[Approximation, ...] = ("identity",)

    def approximation(self, name: str) -> Callable[[Tensor], Tensor] | None:
        """``h`` for BPDA (None: the identity, whose backward pass is the incoming gradient)."""
        if name not in self.approximations:
            raise RobustkitError(
                f"BPDA approximation {name!r} does not fit {self.describe()}; choose "
                f"{' or '.join(self.approximations)}")
        return None

    def describe(self) -> str:
        raise NotImplementedError


class BitDepth(Preprocessing):
    """Quantise every pixel to ``bits`` bits: ``round(x·L)/L`` with ``L = 2^bits − 1``."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise RobustkitError(f"bit-depth bits must be an integer in [1, 16], got {bits!r}")
        self.bits = bits

    def forward(self, x: Tensor) -> Tensor:
        levels = 2**self.bits - 1
        quantised: Tensor = torch.round(x * levels) / levels
        return quantised

    def describe(self) -> str:
        return describe_step("bit-depth", bits=self.bits)


class MedianFilter(Preprocessing):
    """``k×k`` median of every pixel's neighbourhood (reflect padding)."""

    approximations: tuple[Approximation, ...] = ("identity", "mean-filter")

    def __init__(self, size: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise RobustkitError(f"median size must be an odd integer >= 1, got {size!r}")
        self.size = size

    def _windows(self, x: Tensor) -> Tensor:
        r, (n, c, h, w) = self.size // 2, x.shape
        padded = F.pad(x, (r, r, r, r), mode="reflect") if r else x
        return F.unfold(padded, self.size).view(n, c, self.size**2, h * w)

    def forward(self, x: Tensor) -> Tensor:
        return self._windows(x).median(dim=2).values.view_as(x)

    def approximation(self, name: str) -> Callable[[Tensor], Tensor] | None:
        super().approximation(name)
        if name == "mean-filter":
            return lambda x: self._windows(x).mean(dim=2).view_as(x)
        return None

    def describe(self) -> str:
        return describe_step("median", size=self.size)


class GaussianNoise(Preprocessing):
    """Add fresh ``N(0, σ²)`` noise to every pixel in every pass, then clamp to [0, 1]."""

    random = True

    def __init__(self, sigma: float) -> None:
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
            raise RobustkitError(f"noise sigma must be a number >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp(0.0, 1.0)

    def describe(self) -> str:
        return describe_step("noise", sigma=self.sigma)


class _StraightThrough(torch.autograd.Function):
    """Forward ``g(x)`` exactly; backward ``J_h(x)ᵀ·grad`` (``h = None``: the identity)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Preprocessing,
                approx: Callable[[Tensor], Tensor] | None) -> Tensor:
        ctx.approx = approx
        ctx.save_for_backward(x)
        with torch.no_grad():
            out: Tensor = step(x)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if ctx.approx is None:
            return grad, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            (grad_x,) = torch.autograd.grad(ctx.approx(x_in), x_in, grad)
        return grad_x, None, None


class Defended(nn.Module):
    """``f(g(x))``: the classifier ``model`` behind the preprocessing ``step``.

    With ``bpda`` (an approximation name), the backward pass through ``step`` is BPDA's;
    the forward pass, and so every prediction, is the same.
    """

    def __init__(self, model: nn.Module, step: Preprocessing,
                 bpda: Approximation | None = None) -> None:
        super().__init__()
        self.model, self.step, self.bpda = model, step, bpda
        self._approx = step.approximation(bpda) if bpda is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.bpda is None:
            logits: Tensor = self.model(self.step(x))
        else:
            logits = self.model(_StraightThrough.apply(x, self.step, self._approx))
        return logits

    def describe(self) -> str:
        text = self.step.describe()
        return f"{text}, attacked through BPDA ({self.bpda})" if self.bpda else text


def build_preprocessing(kind: Preprocess, *, bits: int | None = None, size: int | None = None,
                        sigma: float | None = None) -> Preprocessing:
    """A preprocessing step by name: ``bit-depth`` (bits, default 3), ``median`` (size, 3),
    ``noise`` (sigma, 0.3)."""
    if kind == "bit-depth":
        return BitDepth(DEFAULT_BITS if bits is None else bits)
    if kind == "median":
        return MedianFilter(DEFAULT_SIZE if size is None else size)
    if kind == "noise":
        return GaussianNoise(DEFAULT_SIGMA if sigma is None else sigma)
    raise RobustkitError(f"unknown preprocessing {kind!r}; choose {', '.join(PREPROCESSING)}")


def with_bpda(model: nn.Module, approximation: Approximation) -> Defended:
    """``model`` (a :class:`Defended`) attacked through BPDA with ``approximation``; shares its
    modules."""
    if not isinstance(model, Defended):
        raise RobustkitError(
            f"BPDA ({approximation}) replaces the backward pass of a preprocessing defence, but "
            "the model has none: declare one (a defence table in the config, --defence on the "
            "command line) or drop bpda")
    return Defended(model.model, model.step, approximation)


def is_random(model: nn.Module) -> bool:
    """Whether ``model`` declares a randomised preprocessing step."""
    return any(getattr(m, "random", False) for m in model.modules())
