"""Training objectives: standard, PGD-AT, FGSM-RS (fast AT) and TRADES.

Each inner maximisation runs with the model in eval mode and frozen parameters
(:func:`robustkit.attacks.attack_mode`) and returns detached inputs in the ε-ball ∩ [0,1]ᵈ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks import attack_mode


def _uniform(x: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(x.shape, generator=generator, device=x.device if generator is None
                   else generator.device, dtype=x.dtype)
    return (2 * u - 1).to(x.device)


def _clip(x: Tensor, delta: Tensor, eps: float) -> Tensor:
    """Π_{B∞(0,ε)} then the box: δ ← clip(x + clip(δ, −ε, ε), 0, 1) − x."""
    return (x + delta.clamp(-eps, eps)).clamp(0.0, 1.0) - x


def pgd_examples(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float,
    random_start: bool = True, generator: torch.Generator | None = None,
) -> Tensor:
    """Madry et al. (2018): δ ← Π(δ + α·sign ∇_δ CE(f(x + δ), y)), δ₀ ~ U(−ε, ε)ᵈ.

    With ``steps=1`` and ``α = 1.25ε`` this is FGSM with random start (Wong et al., 2020).
    The last iterate is returned, as in both papers.
    """
    delta = eps * _uniform(x, generator) if random_start else torch.zeros_like(x)
    delta = _clip(x, delta, eps)
    with attack_mode(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            delta = _clip(x, delta.detach() + step_size * grad.sign(), eps)
    return (x + delta).detach()


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
