"""Tests for robustkit.attacks: closed-form answers on linear models, plus invariants."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from robustkit.attacks import (
    AttackResult,
    StartNoise,
    adversarial_loss,
    apgd,
    attack_mode,
    fgsm,
    is_adversarial,
    pgd,
    project,
    random_unit_ball,
    steepest_step,
)
from robustkit.attacks.apgd import apgd_step, checkpoints
from robustkit.attacks.norms import LP_NORMS
from robustkit.config import AttackConfig
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Loss, Norm

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only contend


def linear_model(weight: Tensor, bias: Tensor) -> nn.Module:
    """z = W · flatten(x) + b, in float64."""
    k, d = weight.shape
    layer = nn.Linear(d, k, dtype=DTYPE)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), layer)


def mlp(d: int, k: int, seed: int, hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k)).to(
        DTYPE
    )


def distances(result: AttackResult, x: Tensor, norm: Norm) -> Tensor:
    diff = (result.x_adv - x).flatten(1)
    return diff.abs().amax(dim=1) if norm == "linf" else diff.norm(dim=1)


# --------------------------------------------------------------------------- FGSM, analytic


def test_fgsm_equals_analytic_linear_gradient() -> None:
    """For z = Wx + b and CE: ∇_x CE = Wᵀ(softmax(z) − onehot(y)); x_adv = clip(x + ε·sign)."""
    g = torch.Generator().manual_seed(0)
    n, shape, k, eps = 7, (1, 2, 3), 4, 0.07
    d = math.prod(shape)
    weight = torch.randn(k, d, generator=g, dtype=DTYPE)
    bias = torch.randn(k, generator=g, dtype=DTYPE)
    x = torch.rand(n, *shape, generator=g, dtype=DTYPE)
    y = torch.randint(0, k, (n,), generator=g)
    model = linear_model(weight, bias)

    z = x.flatten(1) @ weight.T + bias
    residual = torch.softmax(z, dim=1) - nn.functional.one_hot(y, k).to(DTYPE)
    grad = (residual @ weight).view_as(x)
    expected = (x + eps * grad.sign()).clamp(0, 1)
    result = fgsm(model, x, y, eps=eps)
    assert torch.equal(result.x_adv, expected)
    assert result.grad_evals == n
    assert torch.equal(result.success, model(expected).argmax(1) != y)

    # targeted: maximise −CE(z, t), i.e. step against the gradient of CE(z, t)
    expected_t = (x - eps * grad.sign()).clamp(0, 1)
    assert torch.equal(fgsm(model, x, y, eps=eps, targeted=True).x_adv, expected_t)


def test_fgsm_hand_computed_example() -> None:
    """W = [[1, 2], [3, −1]], b = 0, y = 0.

    x = (0.5, 0.5): z = (1.5, 1.0), p − e₀ = (−a, a) with a = σ(−0.5) > 0, so
    ∇ = Wᵀ(−a, a) = (2a, −3a) and x_adv = (0.6, 0.4) at ε = 0.1.
    x = (0.95, 0.05): z = (1.05, 2.8), same sign pattern, clipped to (1.0, 0.0).
    """
    model = linear_model(torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.zeros(2))
    x = torch.tensor([[0.5, 0.5], [0.95, 0.05]], dtype=DTYPE).view(2, 1, 1, 2)
    y = torch.tensor([0, 0])
    result = fgsm(model, x, y, eps=0.1)
    expected = torch.tensor([[0.6, 0.4], [1.0, 0.0]], dtype=DTYPE).view(2, 1, 1, 2)
    assert torch.equal(result.x_adv, expected)
    assert bool(result.success[1])  # z(1, 0) = (1, 3): predicts class 1


# --------------------------------------------------------------------------- PGD, closed form


def binary_problem(norm: Norm) -> tuple[nn.Module, Tensor, Tensor, float, Tensor]:
    """z = (0, w·x + b). The worst case within the ε-ball moves w·x by ε‖w‖_* (‖·‖₁ for L∞,
    ‖·‖₂ for L2), so a correctly classified point survives iff |w·x + b| > ε‖w‖_*.
    Points lie in [0.3, 0.7] and ε < 0.3, so the [0, 1] box never binds.
    """
    g = torch.Generator().manual_seed(1)
    n, shape = 300, (2, 2, 2)
    d = math.prod(shape)
    w = torch.randn(d, generator=g, dtype=DTYPE)
    b = -0.5 * w.sum()
    x = 0.3 + 0.4 * torch.rand(n, *shape, generator=g, dtype=DTYPE)
    s = x.flatten(1) @ w + b
    eps = 0.05 if norm == "linf" else 0.1
    radius = eps * (w.abs().sum() if norm == "linf" else w.norm())
    keep = ((s.abs() - radius).abs() > 0.03) & (s.abs() > 1e-3)  # no near-ties
    x, s = x[keep], s[keep]
    y = (s > 0).long()
    flip = torch.rand(len(y), generator=g) < 0.15
    y = torch.where(flip, 1 - y, y)
    weight = torch.stack([torch.zeros(d, dtype=DTYPE), w])
    model = linear_model(weight, torch.stack([torch.zeros((), dtype=DTYPE), b]))
    robust = (y == (s > 0).long()) & (s.abs() > radius)
    return model, x, y, eps, robust


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize("attack", [pgd, apgd])
def test_reaches_closed_form_robust_accuracy(attack: Any, norm: Norm, loss: Loss) -> None:
    model, x, y, eps, robust = binary_problem(norm)
    assert 0.2 < robust.double().mean() < 0.7  # the check is not trivial
    gen = torch.Generator().manual_seed(0)
    result = attack(model, x, y, eps=eps, norm=norm, loss=loss, steps=30, generator=gen)
    assert torch.equal(~result.success, robust)
    assert bool((distances(result, x, norm) <= eps + 1e-6).all())
    assert torch.equal(result.success, is_adversarial(model(result.x_adv), y))


def test_grad_evals_counts_active_samples() -> None:
    model, x, y, eps, robust = binary_problem("linf")
    clean_correct = int((model(x).argmax(1) == y).sum())
    full = pgd(model, x, y, eps=eps, steps=10, early_stop=False)
    early = pgd(model, x, y, eps=eps, steps=10, early_stop=True)
    assert full.grad_evals == 10 * clean_correct  # misclassified points never run
    assert int(robust.sum()) * 10 <= early.grad_evals < full.grad_evals


# --------------------------------------------------------------------------- invariants


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 4),
    channels=st.sampled_from([1, 3]),
    side=st.integers(1, 4),
    eps=st.floats(0.0, 1.0),
    norm=st.sampled_from(["linf", "l2"]),
    loss=st.sampled_from(["ce", "margin"]),
    steps=st.integers(0, 3),
    restarts=st.integers(1, 2),
    targeted=st.booleans(),
    early_stop=st.booleans(),
)
def test_pgd_stays_in_ball_and_box(
    seed: int,
    n: int,
    channels: int,
    side: int,
    eps: float,
    norm: Norm,
    loss: Loss,
    steps: int,
    restarts: int,
    targeted: bool,
    early_stop: bool,
) -> None:
    k = 3
    model = mlp(channels * side * side, k, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, side, side, generator=g, dtype=DTYPE)
    x[0].view(-1)[0] = 0.0  # exact box edges occur in real images
    x[-1].view(-1)[-1] = 1.0
    y = torch.randint(0, k, (n,), generator=g)
    result = pgd(
        model, x, y, eps=eps, norm=norm, loss=loss, steps=steps, restarts=restarts,
        targeted=targeted, early_stop=early_stop, generator=g,
    )  # fmt: skip
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert bool((distances(result, x, norm) <= eps + 1e-6).all())
    assert bool(((result.x_adv >= 0) & (result.x_adv <= 1)).all())
    assert torch.equal(result.success, is_adversarial(model(result.x_adv), y, targeted))
    assert 0 <= result.grad_evals <= n * steps * restarts

    one_step = fgsm(model, x, y, eps=eps, targeted=targeted, loss=loss)
    assert bool((distances(one_step, x, "linf") <= eps + 1e-6).all())
    assert bool(((one_step.x_adv >= 0) & (one_step.x_adv <= 1)).all())


def test_zero_eps_returns_x_unchanged() -> None:
    model = mlp(12, 3, seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 2, 2, generator=g, dtype=DTYPE)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0
    x[2, 0, 0, 0], x[3, 0, 0, 0] = -1e-7, 1 + 1e-7  # rounding noise is tolerated, never moved
    y = torch.randint(0, 3, (4,), generator=g)
    for norm in LP_NORMS:  # PGD's balls
        result = pgd(model, x, y, eps=0.0, norm=norm, generator=g)
        assert torch.equal(result.x_adv, x)
        assert torch.equal(result.success, model(x).argmax(1) != y)
        assert result.grad_evals == 0
    assert torch.equal(fgsm(model, x, y, eps=0.0).x_adv, x)
    l1 = apgd(model, x, y, eps=0.0, norm="l1", generator=g)
    assert torch.equal(l1.x_adv, x) and l1.grad_evals == 0

    eps = torch.tensor([0.0, 0.3, 0.0, 0.2])
    for norm in LP_NORMS:
        result = pgd(model, x, y, eps=eps, norm=norm, generator=g, restarts=2)
        assert torch.equal(result.x_adv[[0, 2]], x[[0, 2]])
        assert bool((distances(result, x, norm) <= eps.to(DTYPE) + 1e-6).all())
        assert not torch.equal(result.x_adv[[1, 3]], x[[1, 3]])
    result = fgsm(model, x, y, eps=eps)
    assert torch.equal(result.x_adv[[0, 2]], x[[0, 2]])
    assert bool(((result.x_adv[[1, 3]] - x[[1, 3]]).abs() > 0).any())


def small_problem(seed: int = 6, n: int = 96) -> tuple[nn.Module, Tensor, Tensor]:
    """A 12-input MLP with a steep first layer, so that its loss surface has several local
    maxima within small ε-balls and random restarts matter."""
    model = mlp(12, 4, seed, hidden=32)
    first = model[1]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        first.weight.mul_(20)
        first.bias.uniform_(-20, 20)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 2, 2, generator=g, dtype=DTYPE)
    y = model(x).argmax(1).detach()  # all clean-correct, so only the attack breaks them
    return model, x, y


def test_restarts_never_raise_accuracy() -> None:
    model, x, y = small_problem()
    kwargs: dict[str, Any] = {"eps": 0.06, "steps": 2, "loss": "margin"}
    one = pgd(model, x, y, restarts=1, generator=torch.Generator().manual_seed(0), **kwargs)
    five = pgd(model, x, y, restarts=5, generator=torch.Generator().manual_seed(0), **kwargs)
    broken = one.success
    assert 0 < int(broken.sum()) < len(y)  # the comparison is not trivial
    assert bool(five.success[broken].all())
    assert torch.equal(five.x_adv[broken], one.x_adv[broken])
    assert int(five.success.sum()) > int(broken.sum())  # later restarts broke more samples
    assert five.grad_evals > one.grad_evals
    # unbroken samples keep their highest-objective candidate, and restart 1's are candidates
    objective = {r: adversarial_loss(model(r.x_adv), y, "margin").detach() for r in (one, five)}
    survivors = ~five.success
    assert bool((objective[five][survivors] >= objective[one][survivors] - 1e-12).all())
    assert bool((objective[five] >= adversarial_loss(model(x), y, "margin") - 1e-12).all())


def test_early_stop_never_weaker_than_full_run() -> None:
    model, x, y = small_problem()

    def noise(restart: int) -> Tensor:
        g = torch.Generator().manual_seed(100 + restart)
        return random_unit_ball(x.shape, "linf", g, dtype=DTYPE)

    for loss in ("ce", "margin"):
        kwargs: dict[str, Any] = {"eps": 0.06, "steps": 5, "restarts": 3, "loss": loss}
        kwargs["start_noise"] = noise
        early = pgd(model, x, y, early_stop=True, **kwargs)
        full = pgd(model, x, y, early_stop=False, **kwargs)
        assert 0 < int(full.success.sum()) < len(y)
        assert int(early.success.sum()) >= int(full.success.sum())
        assert early.grad_evals < full.grad_evals
        # the full run keeps each sample's FIRST adversarial iterate, as early stopping does
        both = early.success & full.success
        assert torch.allclose(full.x_adv[both], early.x_adv[both], atol=1e-9)


@pytest.mark.parametrize(("norm", "eps"), [("l2", 0.2), ("linf", 0.06)])
def test_start_noise_makes_results_independent_of_batch(norm: Norm, eps: float) -> None:
    """With start noise indexed by sample, attacking a sub-batch gives the same per-sample result,
    even though the restarts run on different subsets (clean-misclassified samples never run)."""
    model, x, y = small_problem(n=40)
    flip = torch.rand(40, generator=torch.Generator().manual_seed(7)) < 0.2
    y = torch.where(flip, (y + 1) % 4, y)

    def noise_for(rows: Tensor) -> StartNoise:
        def noise(restart: int) -> Tensor:
            g = torch.Generator().manual_seed(restart)
            return random_unit_ball(x.shape, norm, g, dtype=DTYPE)[rows]

        return noise

    everyone = torch.arange(len(y))
    kwargs: dict[str, Any] = {"eps": eps, "norm": norm, "steps": 2, "restarts": 3}
    whole = pgd(model, x, y, start_noise=noise_for(everyone), **kwargs)
    half = everyone[::2]
    part = pgd(model, x[half], y[half], start_noise=noise_for(half), **kwargs)
    assert int(flip.sum()) < int(whole.success.sum()) < len(y)
    assert torch.equal(part.success, whole.success[half])
    assert torch.allclose(part.x_adv, whole.x_adv[half], atol=1e-9)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_targeted_attack_reaches_target(norm: Norm, loss: Loss) -> None:
    """Nearest-prototype classifier z_k = 10(2 c_k·x − ‖c_k‖²), i.e. argmax z = argmin ‖x − c_k‖₂.
    With x, c_k ∈ [0.3, 0.7]^4 the target prototype c_t lies within ‖x − c_t‖ ≤ 0.8 (both norms),
    so every target is reachable at ε = 0.8."""
    g = torch.Generator().manual_seed(8)
    k, n = 3, 30
    centres = 0.3 + 0.4 * torch.rand(k, 4, generator=g, dtype=DTYPE)
    model = linear_model(20 * centres, -10 * (centres**2).sum(1))
    x = 0.3 + 0.4 * torch.rand(n, 1, 2, 2, generator=g, dtype=DTYPE)
    target = ((model(x).argmax(1) + 1) % k).detach()
    result = pgd(model, x, target, eps=0.8, norm=norm, targeted=True, loss=loss, generator=g)
    assert bool(result.success.all())
    assert torch.equal(model(result.x_adv).argmax(1), target)


# --------------------------------------------------------------------------- pieces


def test_targeted_attack_with_true_labels_keeps_the_first_misclassified_iterate() -> None:
    """1-D picture: the class is 0 below 0.4, 2 in (0.4, 0.6), 1 above; the target is 1, the
    true class 0. At ε = 0.5 the attack passes through class 2 on its way to the target."""
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-5.0] * 4, [5.0] * 4, [0.0] * 4]))
        layer.bias.copy_(torch.tensor([8.0, -12.0, 0.0]))
    model = nn.Sequential(nn.Flatten(), layer)
    x, target, label = torch.full((1, 1, 2, 2), 0.3), torch.tensor([1]), torch.tensor([0])
    for attack in (pgd, apgd):
        pure = attack(model, x, target, eps=0.2, steps=10, targeted=True, random_start=False)
        judged = attack(model, x, target, eps=0.2, steps=10, targeted=True, random_start=False,
                        labels=label)
        assert not bool(pure.success[0]) and bool(judged.success[0])
        assert int(model(judged.x_adv).argmax(1)[0]) == 2
    # PGD's steps of 2.5·0.5/10 reach class 2 (s = 0.425) first and the target later
    far = pgd(model, x, target, eps=0.5, steps=10, targeted=True, random_start=False,
              labels=label, early_stop=False)
    assert bool(far.success[0]) and int(model(far.x_adv).argmax(1)[0]) == 2
    one_step = fgsm(model, x, target, eps=0.2, targeted=True, labels=label)
    assert bool(one_step.success[0])
    with pytest.raises(RobustkitError, match="targeted=True"):
        pgd(model, x, label, eps=0.2, labels=label)


def test_losses_match_hand_computation() -> None:
    z = torch.tensor([[1.0, 3.0, 2.0], [4.0, 0.0, -1.0]])
    y = torch.tensor([0, 0])
    t = torch.tensor([1, 2])
    # untargeted margin: max_{j≠y} z_j − z_y
    assert adversarial_loss(z, y, "margin").tolist() == [2.0, -4.0]
    # targeted margin: z_t − max_{j≠t} z_j
    assert adversarial_loss(z, t, "margin", targeted=True).tolist() == [1.0, -5.0]
    lse = [
        math.log(math.exp(1) + math.exp(3) + math.exp(2)),
        math.log(math.exp(4) + 1 + math.e**-1),
    ]
    ce = adversarial_loss(z, y, "ce")
    assert torch.allclose(ce, torch.tensor([lse[0] - 1.0, lse[1] - 4.0]))
    ce_t = adversarial_loss(z, t, "ce", targeted=True)
    assert torch.allclose(ce_t, torch.tensor([3.0 - lse[0], -1.0 - lse[1]]))
    assert is_adversarial(z, y).tolist() == [True, False]
    assert is_adversarial(z, t, targeted=True).tolist() == [True, False]


def test_norm_helpers() -> None:
    grad = torch.tensor([[3.0, -4.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    assert torch.equal(steepest_step(grad, "linf").flatten(1), torch.tensor([[1.0, -1.0], [0, 0]]))
    unit = steepest_step(grad, "l2").flatten(1)
    assert torch.allclose(unit, torch.tensor([[0.6, -0.8], [0.0, 0.0]]))

    delta = torch.tensor([[3.0, -4.0], [0.3, 0.4]]).view(2, 1, 1, 2)
    assert torch.allclose(
        project(delta, 1.0, "l2").flatten(1), torch.tensor([[0.6, -0.8], [0.3, 0.4]])
    )
    assert torch.equal(
        project(delta, 0.35, "linf").flatten(1), torch.tensor([[0.35, -0.35], [0.3, 0.35]])
    )
    eps = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    assert torch.equal(project(delta, eps, "l2")[1], torch.zeros(1, 1, 2))

    g = torch.Generator().manual_seed(9)
    box = random_unit_ball((4000, 1, 1, 2), "linf", g)
    assert float(box.abs().max()) <= 1.0 and float(box.abs().max()) > 0.99
    disk = random_unit_ball((4000, 1, 1, 2), "l2", g).flatten(1).norm(dim=1)
    assert float(disk.max()) <= 1.0 + 1e-6
    assert abs(float((disk < 0.5).double().mean()) - 0.25) < 0.03  # area ratio of radius 1/2
    same = random_unit_ball((3, 2, 2, 2), "l2", torch.Generator().manual_seed(1))
    assert torch.equal(same, random_unit_ball((3, 2, 2, 2), "l2", torch.Generator().manual_seed(1)))


def saturated_pair(margins: list[float]) -> tuple[nn.Module, Tensor, Tensor]:
    """A float32 two-class linear model and one 2×2 image per margin ``z_0 − z_1``.

    Logits ``z_1 − z_0 = 100·(Σ_j x_j − 1.6)``; image ``i`` is constant, chosen so the margin
    is ``margins[i]``. The cross-entropy input gradient is ``≈ e^{−margin}·100`` per entry:
    about 9e-25 at margin 60, a norm that underflows to 0 in float32, although the direction
    (all ones) is perfectly usable.
    """
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-50.0] * 4, [50.0] * 4]))
        layer.bias.copy_(torch.tensor([80.0, -80.0]))
    # z_0 − z_1 = 160 − 400·x for a constant image x
    x = torch.tensor([(160.0 - m) / 400.0 for m in margins]).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    return nn.Sequential(nn.Flatten(), layer), x.contiguous(), torch.zeros(len(margins),
                                                                         dtype=torch.long)


def test_l2_step_survives_gradients_whose_norm_underflows() -> None:
    grad = torch.tensor([[3e-25, -4e-25], [3e30, -4e30], [1e-44, 0.0]]).view(3, 1, 1, 2)
    unit = steepest_step(grad, "l2").flatten(1)
    assert torch.allclose(unit, torch.tensor([[0.6, -0.8], [0.6, -0.8], [1.0, 0.0]]))
    assert float(grad.flatten(1)[0].norm()) == 0.0  # the float32 norm the old step divided by


@pytest.mark.parametrize("attack", [pgd, apgd])
def test_l2_attacks_break_a_confident_model_with_tiny_gradients(attack: Any) -> None:
    """Margin 60, ε = 1: the boundary lies 0.6 away in L2; the input gradient is ~9e-25."""
    model, x, y = saturated_pair([60.0])
    x_in = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x_in), y)
    (grad,) = torch.autograd.grad(loss, x_in)
    assert 0 < float(grad.abs().max()) < 1e-22
    result = attack(model, x, y, eps=1.0, norm="l2", steps=10, random_start=False)
    assert bool(result.success.all())
    assert float((result.x_adv - x).flatten(1).norm(dim=1).max()) <= 1.0 + 1e-6


def test_attack_mode_restores_modes_and_flags() -> None:
    hidden, norm, head = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)
    model = nn.Sequential(nn.Flatten(), hidden, norm, head)
    model.train()
    norm.eval()  # a deliberately frozen BatchNorm
    head.weight.requires_grad_(False)
    with attack_mode(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
    assert model.training and hidden.training and not norm.training
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, False, True]

    with pytest.raises(RuntimeError), attack_mode(model):
        raise RuntimeError("boom")
    assert model.training and not norm.training and head.bias.requires_grad
    assert not head.weight.requires_grad


def test_attacks_leave_training_model_untouched() -> None:
    torch.manual_seed(10)
    norm = nn.BatchNorm1d(8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), norm, nn.Linear(8, 3))
    model.train()
    assert norm.running_mean is not None
    stats = norm.running_mean.clone()
    x = torch.rand(6, 3, 2, 2)
    y = torch.randint(0, 3, (6,))
    pgd(model, x, y, eps=0.1, steps=3)
    fgsm(model, x, y, eps=0.1)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(norm.running_mean, stats)  # BN ran in eval mode


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": -0.1}, r"eps must lie in \[0, 1\].*-0\.1"),
        ({"eps": 8}, r"eps must lie in \[0, 1\].*8/255.*got 8"),
        ({"eps": torch.tensor([0.1, 2.0])}, r"got 2\b"),
        ({"eps": torch.tensor([0.1, 0.1, 0.1])}, r"shape \[2\]"),
        ({"eps": 0.1, "norm": "l3"}, r"unknown norm 'l3'"),
        ({"eps": 0.1, "loss": "hinge"}, r"unknown attack loss 'hinge'"),
        ({"eps": 0.1, "restarts": 0}, r"restarts"),
        ({"eps": 0.1, "steps": -1}, r"steps"),
        ({"eps": 0.1, "start_noise": lambda r: torch.zeros(3)}, r"start_noise"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    model = mlp(4, 2, seed=0)
    x = torch.rand(2, 1, 2, 2, dtype=DTYPE)
    y = torch.tensor([0, 1])
    with pytest.raises(RobustkitError, match=match):
        pgd(model, x, y, **kwargs)  # type: ignore[arg-type]


def test_bad_inputs_raise() -> None:
    model = mlp(4, 2, seed=0)
    x = torch.rand(2, 1, 2, 2, dtype=DTYPE)
    y = torch.tensor([0, 1])
    with pytest.raises(RobustkitError, match="eps"):
        fgsm(model, x, y, eps=1.5)
    with pytest.raises(RobustkitError, match="unknown attack loss"):
        fgsm(model, x, y, eps=0.1, loss="mse")  # type: ignore[arg-type]  # not a Loss: on purpose
    with pytest.raises(RobustkitError, match=r"\[N, C, H, W\]"):
        pgd(model, x[0], y, eps=0.1)
    with pytest.raises(RobustkitError, match=r"\[0, 1\]"):
        pgd(model, x * 255, y, eps=0.1)
    with pytest.raises(RobustkitError, match="int64"):
        pgd(model, x, y.float(), eps=0.1)
    with pytest.raises(RobustkitError, match="int64"):
        pgd(model, x, y[:1], eps=0.1)
    with pytest.raises(RobustkitError, match="labels must lie"):
        pgd(model, x, torch.tensor([0, 5]), eps=0.1)
    with pytest.raises(RobustkitError, match="unknown norm"):
        project(x, 0.1, "l3")  # type: ignore[arg-type]  # not a Norm: on purpose
    with pytest.raises(RobustkitError, match="does not run in l1"):
        project(x, 0.1, "l1")  # L1 has its own projection onto the ball ∩ box


# --------------------------------------------------------------------------- APGD


def test_apgd_checkpoints_follow_the_recurrence() -> None:
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99, 1.05: w_j = ⌈p_j·T⌉ below T
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9]  # ⌈2.2⌉, ⌈4.1⌉, ⌈5.7⌉, 7, 8, ⌈8.7⌉
    assert checkpoints(1) == []


def test_apgd_first_step_is_two_eps_then_projected() -> None:
    """z⁽¹⁾ = P(x + 2ε·sign ∇L): on a linear model every coordinate ends at x ± ε exactly."""
    model, x, y, eps, _ = binary_problem("linf")
    correct = model(x).argmax(1) == y
    result = apgd(model, x, y, eps=eps, steps=1, random_start=False)
    x_in = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(adversarial_loss(model(x_in), y).sum(), x_in)
    expected = x + eps * grad.sign()
    assert torch.allclose(result.x_adv[correct], expected[correct], atol=1e-12)
    assert result.grad_evals == int(correct.sum())


def test_apgd_step_by_hand() -> None:
    """x = 0.5, ε = 0.1, x⁽ᵏ⁾ = 0.55, x⁽ᵏ⁻¹⁾ = 0.5, ∇L < 0, η = 0.2:
    z = clamp(0.55 − 0.2, 0.4, 0.6) = 0.4; x⁽ᵏ⁺¹⁾ = 0.55 + 0.75·(0.4 − 0.55) + 0.25·0.05 = 0.45.
    In L2 along one axis the same numbers hold (the ball is the segment [0.4, 0.6])."""
    x = torch.full((1, 1, 1, 1), 0.5, dtype=DTYPE)
    args = (x, x + 0.05, x, -torch.ones_like(x), torch.full_like(x, 0.2), torch.full_like(x, 0.1))
    for norm in LP_NORMS:  # L1 takes its own step (attacks/apgd_l1.py)
        assert apgd_step(*args, norm).item() == pytest.approx(0.45, abs=1e-12)
        assert apgd_step(*args, norm, first=True).item() == pytest.approx(0.4, abs=1e-12)
    # the box binds at x = 0.05: z = max(0.05 − 0.1, 0) = 0, x⁽ᵏ⁺¹⁾ = 0.05 + 0.75·(0 − 0.05)
    low = torch.full_like(x, 0.05)
    args = (low, low, low, -torch.ones_like(x), torch.full_like(x, 0.2), torch.full_like(x, 0.1))
    assert apgd_step(*args, "linf", first=True).item() == 0.0
    assert apgd_step(*args, "linf").item() == pytest.approx(0.0125, abs=1e-12)


class _Bowl(nn.Module):
    """z = (0, −k·‖x − c‖²): the cross-entropy of class 0 peaks at the interior point x = c."""

    def __init__(self, centre: Tensor, k: float = 50.0) -> None:
        super().__init__()
        self.centre, self.k = centre, k

    def forward(self, x: Tensor) -> Tensor:
        z1 = -self.k * (x - self.centre).flatten(1).pow(2).sum(1)
        return torch.stack([torch.zeros_like(z1), z1], dim=1)


def test_apgd_halves_its_step_to_close_in_on_an_interior_maximum() -> None:
    """A fixed step of 2ε keeps jumping over a maximum inside the ball; APGD's halving at the
    checkpoints (and its restart from the best point) must bring it within ε/50 of it."""
    g = torch.Generator().manual_seed(3)
    eps, n = 0.1, 16
    x = torch.full((n, 1, 2, 4), 0.5, dtype=DTYPE)
    centre = x + 0.6 * eps * (2 * torch.rand(x.shape, generator=g, dtype=DTYPE) - 1)
    model, y = _Bowl(centre), torch.zeros(n, dtype=torch.long)
    adaptive = apgd(model, x, y, eps=eps, steps=100, generator=torch.Generator().manual_seed(0))
    fixed = pgd(model, x, y, eps=eps, steps=100, step_size=2 * eps,
                generator=torch.Generator().manual_seed(0))
    assert not bool(adaptive.success.any())  # z₁ ≤ 0 = z₀: never adversarial
    gap = (adaptive.x_adv - centre).flatten(1).abs().amax(1)
    assert bool((gap < eps / 50).all()), gap
    assert bool(((fixed.x_adv - centre).flatten(1).abs().amax(1) > eps / 50).all())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_stays_in_ball_and_box(norm: Norm) -> None:
    model, x, y = small_problem()
    x = torch.where(torch.arange(x.numel()).view(x.shape) % 3 == 0, torch.zeros_like(x), x)
    eps = torch.linspace(0.0, 0.3, len(y), dtype=DTYPE)
    result = apgd(model, x, y, eps=eps, norm=norm, steps=15, restarts=2,
                  generator=torch.Generator().manual_seed(1))
    assert bool((distances(result, x, norm) <= eps + 1e-9).all())
    assert bool((result.x_adv >= 0).all() and (result.x_adv <= 1).all())
    assert torch.equal(result.x_adv[0], x[0])  # ε = 0 is never attacked
    assert torch.equal(result.success, is_adversarial(model(result.x_adv), y))


def test_apgd_restarts_never_raise_accuracy_and_early_stop_changes_nothing() -> None:
    model, x, y = small_problem()

    def noise(restart: int) -> Tensor:
        return random_unit_ball(x.shape, "linf", torch.Generator().manual_seed(7 + restart),
                                dtype=DTYPE)

    kwargs: dict[str, Any] = {"eps": 0.06, "steps": 3, "loss": "margin", "start_noise": noise}
    one = apgd(model, x, y, restarts=1, **kwargs)
    four = apgd(model, x, y, restarts=4, **kwargs)
    assert 0 < int(one.success.sum()) < int(four.success.sum()) < len(y)
    assert bool(four.success[one.success].all())
    assert torch.equal(four.x_adv[one.success], one.x_adv[one.success])
    # every per-sample update is row-wise, so dropping broken rows leaves the others' paths alone
    full = apgd(model, x, y, restarts=4, early_stop=False, **kwargs)
    assert torch.equal(full.success, four.success)
    assert torch.allclose(full.x_adv, four.x_adv, atol=1e-12)
    assert four.grad_evals < full.grad_evals


def test_apgd_config_title_and_bad_arguments() -> None:
    assert AttackConfig(name="apgd", steps=100, restarts=2, loss="margin").title == (
        "apgd100x2-margin"
    )
    model, x, y, eps, _ = binary_problem("linf")
    with pytest.raises(RobustkitError, match="steps must be an integer >= 0"):
        apgd(model, x, y, eps=eps, steps=-1)
    with pytest.raises(RobustkitError, match="eps must lie in"):
        apgd(model, x, y, eps=2.0)
