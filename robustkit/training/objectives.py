"""Training objectives: standard, PGD-AT, FGSM-RS (fast AT) and TRADES.

Each inner maximisation runs with the model in eval mode and frozen parameters
(:func:`robustkit.attacks.attack_mode`) and returns detached inputs in the ε-ball ∩ [0,1]ᵈ.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks import attack_mode


def _uniform(x: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(x.shape, generator=generator, device=x.device if generator is None
                   else generator.device, dtype=x.dtype)
    return (2 * u - 1).to(x.device)


def _clip(x: Tensor, delta: Tensor, eps: float | Tensor) -> Tensor:
    """Π_{B∞(0,ε)} then the box: δ ← clip(x + clip(δ, −ε, ε), 0, 1) − x."""
    limited = delta.clamp(-eps, eps)  # type: ignore[arg-type]  # a 0-d tensor works too
    return (x + limited).clamp(0.0, 1.0) - x


def pgd_examples(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float,
    random_start: bool = True, generator: torch.Generator | None = None,
) -> Tensor:
    """Madry et al. (2018): δ ← Π(δ + α·sign ∇_δ CE(f(x + δ), y)), δ₀ ~ U(−ε, ε)ᵈ.

    With ``steps=1`` and ``α = 1.25ε`` this is FGSM with random start (Wong et al., 2020).
    The last iterate is returned, as in both papers.
    """
    u = _uniform(x, generator) if random_start else torch.zeros_like(x)
    with attack_mode(model):
        return pgd_from(model, x, y, u, eps=eps, steps=steps, step_size=step_size)


def pgd_from(model: nn.Module, x: Tensor, y: Tensor, u: Tensor, *, eps: float | Tensor,
             steps: int, step_size: float | Tensor) -> Tensor:
    """The iterations of :func:`pgd_examples` from ``δ₀ = Π(ε·u)``, the model in attack mode;
    ``ε`` and ``α`` may be 0-d tensors (what a recorded CUDA graph reads)."""
    delta = _clip(x, eps * u, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = _clip(x, delta.detach() + step_size * grad.sign(), eps)
    return (x + delta).detach()


#: The signature of :func:`pgd_examples` (and of a :class:`CapturedPGD`).
PGDExamples = Callable[..., Tensor]

#: ``record(fn)`` runs ``fn`` (which reads and writes fixed buffers) once under capture and
#: returns a function that replays it; :func:`cuda_graph` on CUDA.
Recorder = Callable[[Callable[[], None]], Callable[[], None]]


def cuda_graph(fn: Callable[[], None]) -> Callable[[], None]:
    """Record ``fn`` as a CUDA graph after three warm-up calls on a side stream (cuDNN and
    cuBLAS choose their kernels and workspaces there); return the graph's ``replay``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class CapturedPGD:
    """:func:`pgd_examples` for one model, replayed from a recorded CUDA graph per batch shape.

    On a small batch a PGD-AT step is bound by kernel launches (about 30 per attack step, 10
    steps a batch); one graph replay launches them all. The start noise ``u`` is drawn eagerly
    from the same generator as :func:`pgd_examples`, then ``x``, ``y``, ``u``, ``ε`` and ``α``
    are copied into the buffers the graph reads, so the graph computes :func:`pgd_from` on the
    same inputs with the same kernels. The first call of each shape also runs the eager
    iterations and returns their result; when the replay disagrees with them (more than
    ``tolerance`` of the values differ) the graphs are dropped with a warning and every later
    call is eager. Calls for another model, or after a failure, are plain :func:`pgd_examples`.
    """

    def __init__(self, model: nn.Module, record: Recorder = cuda_graph,
                 tolerance: float = 1e-3) -> None:
        self.model, self.record, self.tolerance = model, record, tolerance
        self.graphs: dict[tuple[Any, ...], tuple[Callable[[], None], dict[str, Tensor]]] = {}
        self.failed: str | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int,
                 step_size: float, random_start: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
        if model is not self.model or self.failed is not None:
            return pgd_examples(model, x, y, eps=eps, steps=steps, step_size=step_size,
                                random_start=random_start, generator=generator)
        u = _uniform(x, generator) if random_start else torch.zeros_like(x)
        key = (tuple(x.shape), x.dtype, steps)
        if key in self.graphs:
            replay, buffers = self.graphs[key]
            _load(buffers, x, y, u, eps, step_size)
            replay()
            return buffers["out"].clone()
        with attack_mode(model):
            eager = pgd_from(model, x, y, u, eps=eps, steps=steps, step_size=step_size)
        try:
            replay, buffers = self._capture(x, y, u, eps, step_size, steps)
            replay()
            differ = float((buffers["out"] != eager).float().mean())
        except Exception as error:  # whatever stops the recording, eager is still right
            self._fail(f"recording failed ({type(error).__name__}: {error})")
            return eager
        if differ > self.tolerance:
            self._fail(f"the replay differs from the eager iterations in {differ:.2%} of values")
        else:
            self.graphs[key] = (replay, buffers)
        return eager

    def _capture(self, x: Tensor, y: Tensor, u: Tensor, eps: float, step_size: float,
                 steps: int) -> tuple[Callable[[], None], dict[str, Tensor]]:
        """Buffers loaded with this batch (the warm-up and recording run on real values), and
        the replay of the iterations that read them."""
        buffers = {"x": torch.empty_like(x), "y": torch.empty_like(y), "u": torch.empty_like(x),
                   "eps": x.new_zeros(()), "alpha": x.new_zeros(()), "out": torch.empty_like(x)}
        _load(buffers, x, y, u, eps, step_size)
        model = self.model

        def run() -> None:
            with attack_mode(model), torch.enable_grad():
                buffers["out"].copy_(pgd_from(model, buffers["x"], buffers["y"], buffers["u"],
                                              eps=buffers["eps"], steps=steps,
                                              step_size=buffers["alpha"]))

        if x.is_cuda:  # record on the batch's device, whichever is current
            with torch.cuda.device(x.device):
                return self.record(run), buffers
        return self.record(run), buffers

    def _fail(self, why: str) -> None:
        self.failed = why
        self.graphs.clear()
        warnings.warn(f"PGD-AT on a CUDA graph turned off, eager from now on: {why}",
                      stacklevel=3)


def _load(buffers: dict[str, Tensor], x: Tensor, y: Tensor, u: Tensor, eps: float,
          step_size: float) -> None:
    buffers["x"].copy_(x)
    buffers["y"].copy_(y)
    buffers["u"].copy_(u)
    buffers["eps"].fill_(eps)
    buffers["alpha"].fill_(step_size)


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per-sample KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) from logits."""
    log_p, log_q = F.log_softmax(p_logits, dim=1), F.log_softmax(q_logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def trades_examples(
    model: nn.Module, x: Tensor, *, eps: float, steps: int, step_size: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Zhang et al. (2019): x' = argmax_{x' ∈ B∞(x,ε)} KL(f(x) ‖ f(x')), from x + 0.001·N(0, I)."""
    with attack_mode(model):
        clean_logits = model(x).detach()
        noise = torch.randn(x.shape, generator=generator, device=x.device if generator is None
                            else generator.device, dtype=x.dtype).to(x.device)
        delta = _clip(x, 0.001 * noise, eps)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = kl_divergence(clean_logits, model(x + delta)).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            delta = _clip(x, delta.detach() + step_size * grad.sign(), eps)
    return (x + delta).detach()


def trades_loss(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, beta: float
                ) -> tuple[Tensor, Tensor]:
    """CE(f(x), y) + β·KL(f(x) ‖ f(x')), averaged over the batch; also returns f(x)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y) + beta * kl_divergence(logits, model(x_adv)).mean()
    return loss, logits
