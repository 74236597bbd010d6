"""A distribution of differentiable image transformations, and EOT (Athalye et al., 2018).

Expectation over Transformation makes an adversarial example that survives a distribution ``T``
of transformations (a camera's viewpoint, lighting and noise) or a model whose forward pass is
random. Each attack step ascends the expected objective, estimated with ``K`` samples::

    ∇_x E_{t∼T}[L(f(t(x)), y)]  ≈  (1/K) Σ_{k=1..K} ∇_x L(f(t_k(x)), y),    t_k ∼ T

so the transformations must be differentiable in ``x``: rotation, scaling and translation are one
affine map resampled bilinearly (``affine_grid`` + ``grid_sample``, zero padding: MNIST's
background), blur is a per-sample Gaussian convolution, lighting and noise are pointwise.

One draw ``t`` applies, in this order (each only when its range is not the identity)::

    affine:     x ← x ∘ A⁻¹,  A(p) = s·R(θ)·p + τ     θ ∼ U[−rotate°, rotate°], s ∼ U[scale],
                                                       τ ∼ U[−translate, translate]² pixels
    blur:       x ← G_σ ∗ x                            σ ∼ U[blur] pixels (σ = 0: unchanged)
    lighting:   x ← c·(x − ½) + ½ + b                  c ∼ U[contrast], b ∼ U[brightness]
    noise:      x ← x + σ_n·n                          n ∼ N(0, I)
    box:        x ← clamp(x, 0, 1)

The identity distribution returns its input unchanged (the same tensor), so EOT with ``K = 1``
and no transformation is exactly the plain attack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.losses import is_adversarial, judge, objective
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Loss

Range = tuple[float, float]


@dataclass(frozen=True)
class Transform:
    """The distribution ``T``; every range is sampled uniformly and independently per image.

    Attributes:
        rotate: ``θ ∼ U[−rotate, rotate]`` degrees.
        translate: shift ``∼ U[−translate, translate]`` pixels on each axis.
        scale: zoom factor range (``(1, 1)``: none).
        brightness: additive offset range in pixel units.
        contrast: gain range around mid-grey (``(1, 1)``: none).
        noise: standard deviation of additive Gaussian noise, pixel units.
        blur: Gaussian blur ``σ`` range in pixels (``(0, 0)``: none).
    """

    rotate: float = 0.0
    translate: float = 0.0
    scale: Range = (1.0, 1.0)
    brightness: Range = (0.0, 0.0)
    contrast: Range = (1.0, 1.0)
    noise: float = 0.0
    blur: Range = (0.0, 0.0)

    def __post_init__(self) -> None:
        for name in ("rotate", "translate", "noise"):
            if not getattr(self, name) >= 0:
                raise RobustkitError(f"transform {name} must be >= 0, got {getattr(self, name)}")
        for name in ("scale", "brightness", "contrast", "blur"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise RobustkitError(f"transform {name} range must have low <= high, got "
                                     f"{lo:g}:{hi:g}")
        if self.scale[0] <= 0 or self.contrast[0] < 0 or self.blur[0] < 0:
            raise RobustkitError("transform scale must be > 0, contrast and blur >= 0")

    @property
    def is_identity(self) -> bool:
        return self == Transform()

    @property
    def affine(self) -> bool:
        return self.rotate > 0 or self.translate > 0 or self.scale != (1.0, 1.0)

    def describe(self) -> str:
        """``rotate=15,translate=2,scale=0.9:1.1`` (the ``--transform`` syntax); ``identity``."""
        parts = []
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if value != default:
                text = f"{value[0]:g}:{value[1]:g}" if isinstance(value, tuple) else f"{value:g}"
                parts.append(f"{f.name}={text}")
        return ",".join(parts) or "identity"

    def sample(self, n: int, generator: torch.Generator | None, like: Tensor) -> Draw:
        """Draw ``n`` transformations (parameters for images shaped like ``like[0]``)."""

        where = generator.device if generator is not None else like.device

        def uniform(lo: float, hi: float) -> Tensor:
            u = torch.rand(n, generator=generator, dtype=torch.float64, device=where)
            return (lo + (hi - lo) * u).to(device=like.device, dtype=like.dtype)

        angle = uniform(-self.rotate, self.rotate) * (math.pi / 180)
        shift = torch.stack([uniform(-self.translate, self.translate) for _ in range(2)], 1)
        zoom = uniform(*self.scale)
        sigma = uniform(*self.blur)
        gain = uniform(*self.contrast)
        offset = uniform(*self.brightness)
        noise = (torch.randn((n, *like.shape[1:]), generator=generator, dtype=like.dtype,
                             device=where).to(like.device) * self.noise
                 if self.noise > 0 else None)
        return Draw(angle, shift, zoom, sigma, gain, offset, noise)

    def apply(self, x: Tensor, draw: Draw) -> Tensor:
        """``t(x)`` for the drawn ``t`` of each row of ``x`` (differentiable in ``x``)."""
        if self.is_identity:
            return x
        if self.affine:
            x = _affine(x, draw.angle, draw.shift, draw.zoom)
        if self.blur[1] > 0:
            x = _gaussian_blur(x, draw.sigma, radius=math.ceil(3 * self.blur[1]))
        if self.contrast != (1.0, 1.0) or self.brightness != (0.0, 0.0):
            x = draw.gain.view(-1, 1, 1, 1) * (x - 0.5) + 0.5 + draw.offset.view(-1, 1, 1, 1)
        if draw.noise is not None:
            x = x + draw.noise
        return x.clamp(0.0, 1.0)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One fresh transformation per row of ``x``."""
        if self.is_identity:
            return x
        return self.apply(x, self.sample(x.shape[0], generator, x))


@dataclass(frozen=True)
class Draw:
    """Parameters of ``n`` drawn transformations (row ``i`` transforms image ``i``)."""

    angle: Tensor  # [n] radians
    shift: Tensor  # [n, 2] pixels (x, y)
    zoom: Tensor  # [n]
    sigma: Tensor  # [n] blur σ, pixels
    gain: Tensor  # [n] contrast
    offset: Tensor  # [n] brightness
    noise: Tensor | None  # [n, C, H, W] already scaled by σ_n

    def rows(self, index: slice) -> Draw:
        """The transformations of rows ``index``."""
        return Draw(self.angle[index], self.shift[index], self.zoom[index], self.sigma[index],
                    self.gain[index], self.offset[index],
                    None if self.noise is None else self.noise[index])


def _affine(x: Tensor, angle: Tensor, shift: Tensor, zoom: Tensor) -> Tensor:
    """Resample ``x`` so that content at ``p`` moves to ``A(p) = s·R(θ)·p + τ``.

    ``affine_grid`` maps output coordinates to input ones, so its matrix is ``A⁻¹``:
    ``p_in = R(−θ)·(p_out − τ)/s``, in normalised coordinates (a pixel is ``2/W`` wide).
    """
    n, _, h, w = x.shape
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tau_x, tau_y = shift[:, 0] * (2 / w), shift[:, 1] * (2 / h)
    theta = torch.stack([
        torch.stack([cos, sin, -(cos * tau_x + sin * tau_y)], 1),
        torch.stack([-sin, cos, -(-sin * tau_x + cos * tau_y)], 1),
    ], 1)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Per-sample Gaussian blur with std ``sigma[i]`` (a separable, normalised kernel; zero
    padding). ``σ = 0`` leaves the image unchanged."""
    n, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp(min=1e-6).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = torch.where(sigma.view(-1, 1) > 0, kernel, (offsets == 0).to(x.dtype))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n·c, k]
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), padding=(0, radius), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), padding=(radius, 0), groups=n * c)
    return flat.view(n, c, h, w)


@dataclass(frozen=True)
class EOT:
    """Expectation over Transformation with ``samples`` = ``K`` draws per step.

    Plugged into :func:`~robustkit.attacks.pgd` or :func:`~robustkit.attacks.apgd` as ``eot=``,
    it replaces the one pass at the iterate ``x`` by ``K`` passes at ``t_k(x)``:

    * objective ``L̄(x) = (1/K) Σ_k L(f(t_k(x)), y)`` and its gradient (the mean of the
      per-draw gradients), which the attack ascends and keeps its worst case by;
    * success: the iterate is adversarial under **every** one of its ``K`` draws, so an
      example is only kept as a success once it holds up across the distribution.

    The draws are fresh at every step (and for every row of a randomised model's forward pass).
    With ``K = 1`` and the identity transformation this is the plain attack, bit for bit.
    """

    transform: Transform
    samples: int = 1
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise RobustkitError(f"eot_samples must be an integer >= 1, got {self.samples!r}")

    def probe(self, model: nn.Module, x_cur: Tensor, y: Tensor, kind: Loss, targeted: bool, *,
              gradient: bool, truth: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """As :func:`~robustkit.attacks.iterative.probe`: ``L̄`` ``[n]``, success under all ``K``
        draws ``[n]`` (:func:`~robustkit.attacks.losses.judge`, with the true labels ``truth`` of
        a targeted attack), and ``∇L̄`` (empty without ``gradient``). Row ``k·n + i`` of the one
        batched pass is draw ``k`` of sample ``i``."""
        k, n = self.samples, x_cur.shape[0]
        x_in = x_cur.detach().requires_grad_(gradient)
        y_all = y.repeat(k)
        with torch.set_grad_enabled(gradient):
            logits = model(self.transform(x_in.repeat(k, 1, 1, 1), self.generator))
            value = objective(logits, y_all, kind, targeted).view(k, n).mean(0)
        truth_all = None if truth is None else truth.repeat(k)
        adv = judge(logits.detach(), y_all, targeted, truth_all).view(k, n).all(0)
        if not gradient:
            return value.detach(), adv, x_cur.new_empty(0)
        (grad,) = torch.autograd.grad(value.sum(), x_in)
        return value.detach(), adv, grad


@torch.no_grad()
def fooled_fraction(model: nn.Module, x: Tensor, y: Tensor, transform: Transform, draws: int,
                    generator: torch.Generator | None = None) -> Tensor:
    """Per sample, the fraction of ``draws`` fresh transformations ``t`` with
    ``argmax f(t(x_i)) ≠ y_i``: how often an (adversarial) image survives the camera."""
    fooled = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
    for _ in range(draws):
        fooled += is_adversarial(model(transform(x, generator)), y).to(fooled.dtype)
    return fooled / draws
