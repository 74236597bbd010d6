"""Square as AutoAttack runs it (issue #33, item 4): the fixed square-size schedule, the stripe
start taken whatever its margin, the ball and the box, the query count; and the batched search
against a one-sample-at-a-time reference written from the paper's Algorithm 2."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks.losses import is_adversarial, margin
from robustkit.attacks.square import (
    SquareNoise,
    _l1_proposal,
    eta,
    square,
    square_fraction,
    square_side,
)
from robustkit.vocabulary import Norm

pytestmark = pytest.mark.usefixtures("single_thread")
DTYPE = torch.float64


class Recorder(nn.Module):
    """Constant logits (class 0 by a margin of 1, whatever the input), recording every input:
    no proposal is ever accepted, so each query differs from the start on its square alone."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        logits = torch.zeros(len(x), 3, dtype=x.dtype)
        logits[:, 0] = 1.0
        return logits


class DistanceFromClean(nn.Module):
    """Margin ``1 + ‖x' − x₀‖₁`` for class 0: the clean point ``x₀`` has the lowest margin of
    all, so any start raises it."""

    def __init__(self, x0: Tensor) -> None:
        super().__init__()
        self.x0 = x0

    def forward(self, x: Tensor) -> Tensor:
        distance = (x - self.x0).abs().flatten(1).sum(1)
        return torch.stack([1.0 + distance, torch.zeros_like(distance)], dim=1)


def small_cnn(seed: int = 0, k: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, k)).to(DTYPE)


def images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def bank_noise(n: int, steps: int, width: int, seed: int = 5) -> SquareNoise:
    bank = torch.rand(steps + 1, n, width, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)

    def noise(step: int, m: int) -> Tensor:
        return bank[step + 1, :, :m]

    return noise


# --------------------------------------------------------------------------- the schedule


def test_square_fraction_halves_where_autoattack_halves_at_any_budget() -> None:
    halvings = [i for i in range(4999) if square_fraction(0.8, i + 1) < square_fraction(0.8, i)]
    assert halvings == [10, 50, 200, 500, 1000, 2000, 4000]  # AutoAttack at 5,000 queries
    assert square_fraction(0.8, 4998) == 0.8 / 128
    assert square_side(0.8 / 128, 28, 28, "linf") == 2  # the last 1,000 iterations: 2 × 2
    # rescaled (the Square paper's code): stretched over the budget, ten times faster at 1,000
    stretched = [i for i in range(999)
                 if square_fraction(0.8, i + 1, 1000) < square_fraction(0.8, i, 1000)]
    assert stretched == [1, 5, 20, 50, 100, 200, 400, 600, 800]
    assert square_side(0.8, 28, 28, "linf") == 25
    assert square_side(0.001, 28, 28, "l2") == 3
    assert square_side(0.05, 28, 28, "l2") == 7  # round(√39.2) = 6, made odd


def sides_used(seen: list[Tensor]) -> list[int]:
    """The square side of each query after the start: the rows where it differs from the
    start (the square covers whole columns of the stripes it changes, and at least one)."""
    start = seen[1]
    return [int((q != start).any(dim=3).any(dim=1).sum()) for q in seen[2:]]


@pytest.mark.parametrize("rescale", [False, True])
def test_the_attack_halves_its_square_after_autoattack_iterations(rescale: bool) -> None:
    """The sides the attack really queries at 5,000 queries on one 28 × 28 image."""
    model = Recorder()
    x = torch.full((1, 1, 28, 28), 0.5)
    result = square(model, x, torch.tensor([0]), eps=0.1, budget=5000, rescale=rescale,
                    generator=torch.Generator().manual_seed(0))
    assert result.queries == 5000 and len(model.seen) == 5001  # the clean pass + 5,000
    sides = sides_used(model.seen)
    assert len(sides) == 4999
    changes = [i - 1 for i in range(1, len(sides)) if sides[i] != sides[i - 1]]
    if rescale:  # the stretched schedule: 1×1 squares for the last 999 iterations (p halves
        # after 3000 too, but p/128 and p/256 both give 2 × 2 squares on 28 × 28)
        assert changes == [5, 25, 100, 250, 500, 1000, 2000, 4000]
        assert sides[-1] == 1 and sides.count(1) == 998
    else:
        assert changes == [10, 50, 200, 500, 1000, 2000, 4000]
        assert sides[:11] == [25] * 11 and sides[-1] == 2
        assert sides.count(2) == 4998 - 4000


# --------------------------------------------------------------------------- the start


@pytest.mark.parametrize("budget", [1, 30])
def test_the_stripe_start_is_taken_even_where_it_raises_the_margin(budget: int) -> None:
    x = torch.full((3, 2, 6, 5), 0.5, dtype=DTYPE)
    model = DistanceFromClean(x)
    eps = 0.1
    noise = bank_noise(3, budget, 2 * 5 + 2 * 25 + 1)
    result = square(model, x, torch.zeros(3, dtype=torch.long), eps=eps, budget=budget,
                    noise=noise)
    stripes = torch.where(noise(-1, 10) < 0.5, -1.0, 1.0).to(DTYPE).view(3, 2, 1, 5)
    # every query keeps ‖δ‖₁ = ε·d, so nothing is ever accepted after the start
    assert torch.equal(result.x_adv, x + eps * stripes.expand_as(x))
    assert bool((margin(model(result.x_adv), torch.zeros(3, dtype=torch.long))
                 > margin(model(x), torch.zeros(3, dtype=torch.long))).all())
    assert not bool(result.success.any())


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("rescale", [False, True])
def test_square_stays_in_the_ball_and_the_box(norm: Norm, rescale: bool) -> None:
    model = small_cnn(3)
    g = torch.Generator().manual_seed(4)
    x = images(40, seed=4)
    x[:10] = torch.randint(0, 2, (10, 1, 8, 8), generator=g).to(DTYPE)  # on the box's faces
    y = model(x).argmax(1)
    scale = {"linf": 0.6, "l2": 4.0, "l1": 20.0}[norm]
    eps = torch.rand(40, generator=g, dtype=DTYPE) * scale
    eps[:3] = 0.0
    result = square(model, x, y, eps=eps, norm=norm, budget=80, rescale=rescale,
                    generator=torch.Generator().manual_seed(1))
    delta = (result.x_adv - x).flatten(1)
    size = {"linf": delta.abs().amax(1), "l2": delta.norm(dim=1),
            "l1": delta.abs().sum(1)}[norm]
    assert bool((size <= eps * (1 + 1e-9) + 1e-12).all())
    assert bool(((result.x_adv >= 0) & (result.x_adv <= 1)).all())
    assert torch.equal(result.x_adv[:3], x[:3])
    assert torch.equal(result.success, is_adversarial(model(result.x_adv), y))
    assert bool(result.success.any()) and not bool(result.success.all())


class RowCounter(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += len(x)
        logits: Tensor = self.inner(x)
        return logits


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_queries_are_the_forward_passes_after_the_clean_one(norm: Norm) -> None:
    counter = RowCounter(small_cnn(5))
    x = images(50, seed=5)
    with torch.no_grad():
        y = counter(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10  # misclassified from the start: never queried
    counter.rows = 0
    eps = {"linf": 0.2, "l2": 0.8, "l1": 3.0}[norm]
    result = square(counter, x, y, eps=eps, norm=norm, budget=60,
                    generator=torch.Generator().manual_seed(6))
    assert result.queries == counter.rows - len(x)
    unbroken = int((~result.success).sum())
    assert 0 < unbroken < 46
    assert 60 * unbroken < result.queries <= 60 * 46


def test_a_larger_budget_extends_the_smaller_one() -> None:
    """AutoAttack's schedule does not depend on the budget: with the same draws, 200 queries
    replay the 50 first, so they break every sample the 50 broke, with the same example."""
    model = small_cnn(7)
    x = images(60, seed=7)
    y = model(x).argmax(1)
    noise = bank_noise(60, 200, 8 + 25 + 1)
    short = square(model, x, y, eps=0.15, budget=50, noise=noise)
    long = square(model, x, y, eps=0.15, budget=200, noise=noise)
    assert bool((short.success <= long.success).all())
    assert int(long.success.sum()) > int(short.success.sum())
    assert torch.equal(long.x_adv[short.success], short.x_adv[short.success])
    kept = ~long.success
    assert bool((margin(model(long.x_adv), y)[kept]
                 <= margin(model(short.x_adv), y)[kept]).all())


# --------------------------------------------------------------------------- L1


def test_the_l1_pattern_is_the_hand_computed_pyramid_pair() -> None:
    """s = 3: the top row is a 1 × 3 pyramid (weights 1 + 1/2⁴ at the centre, 1/2⁴ beside it,
    mass 19/16), the bottom two rows a 2 × 3 one (centre 17/16 in its lower row, 1/16 elsewhere,
    mass 22/16), negated; each half unit mass, the whole unit mass."""
    pattern = eta(3, 3, dtype=DTYPE, device=torch.device("cpu"), norm="l1")
    expected = torch.tensor([[1 / 38, 17 / 38, 1 / 38],
                             [-1 / 44, -1 / 44, -1 / 44],
                             [-1 / 44, -17 / 44, -1 / 44]], dtype=DTYPE)
    assert torch.allclose(pattern, expected, atol=1e-15)
    l2 = eta(3, 3, dtype=DTYPE, device=torch.device("cpu"))  # 1/(k+1)² weights, unit L2 norm
    assert float(l2.norm()) == pytest.approx(1.0)
    assert float(l2[0, 1] / l2[0, 0]) == pytest.approx(5.0)  # (1 + 1/2²) / (1/2²)


def test_an_l1_step_moves_the_windows_mass_and_the_unused_budget_into_its_square() -> None:
    """Away from the box's faces the projection is idle: the proposal spends the whole budget,
    ``‖δ_new‖₁ = (‖δ̂‖₁ − mass in W₁ ∪ W₂) + (ε − ‖δ̂‖₁) + mass in W₁ ∪ W₂ = ε``, nothing
    outside W₁ ∪ W₂ changes and W₂ ∖ W₁ is emptied."""
    g = torch.Generator().manual_seed(3)
    k, h = 6, 12
    x = torch.full((k, 1, h, h), 0.5, dtype=DTYPE)
    delta = (torch.rand(k, 1, h, h, generator=g, dtype=DTYPE) - 0.5) * 0.01  # mass ≈ 0.36
    eps = torch.full((k, 1, 1, 1), 1.0, dtype=DTYPE)
    u = torch.rand(k, 6, generator=g, dtype=DTYPE)
    s = 3
    proposal = _l1_proposal(x, x + delta, eps, s, u)
    new = proposal - x
    assert torch.allclose(new.flatten(1).abs().sum(1), torch.ones(k, dtype=DTYPE), atol=1e-9)
    for i in range(k):
        top1, left1 = (min(int(u[i, j] * (h - s + 1)), h - s) for j in (0, 1))
        top2, left2 = (min(int(u[i, j] * (h - s + 1)), h - s) for j in (2, 3))
        inside1 = torch.zeros(h, h, dtype=torch.bool)
        inside1[top1:top1 + s, left1:left1 + s] = True
        inside2 = torch.zeros(h, h, dtype=torch.bool)
        inside2[top2:top2 + s, left2:left2 + s] = True
        outside = ~(inside1 | inside2)
        assert torch.allclose(new[i, 0][outside], delta[i, 0][outside], atol=1e-12)
        assert bool((new[i, 0][inside2 & ~inside1] == 0).all())


def test_the_l1_search_breaks_what_a_start_alone_does_not() -> None:
    """With the same draws a longer L1 search breaks a superset (the schedule is the same)
    and more than its start alone."""
    model = small_cnn(9)
    x = images(60, seed=9)
    y = model(x).argmax(1)
    noise = bank_noise(60, 150, 8 + 25 + 1)
    start = square(model, x, y, eps=2.0, norm="l1", budget=1, noise=noise)
    search = square(model, x, y, eps=2.0, norm="l1", budget=150, noise=noise)
    assert bool((start.success <= search.success).all())
    assert int(search.success.sum()) > int(start.success.sum())


# --------------------------------------------------------------------------- a reference


def reference_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float, budget: int,
                   noise: SquareNoise) -> tuple[Tensor, Tensor]:
    """Algorithm 2, one sample at a time, from the module docstring: the stripe start, then
    per iteration one ``s × s`` square set to ``clip(x ± ε)`` (signs flipped when that changes
    nothing), accepted iff the margin falls or the sample breaks."""
    n, c, h, w = x.shape
    adv, broken = x.clone(), torch.zeros(n, dtype=torch.bool)
    u_start = noise(-1, c * w + c * 25 + 1)
    u_all = [noise(i, c + 5) for i in range(1, budget)]
    for k in range(n):
        x_k, y_k = x[k:k + 1], y[k:k + 1]
        if bool(is_adversarial(model(x_k), y_k)):
            broken[k] = True
            continue
        signs = torch.where(u_start[k, :c * w] < 0.5, -1.0, 1.0).to(x.dtype).view(1, c, 1, w)
        x_hat = (x_k + eps * signs).clamp(0, 1)
        logits = model(x_hat)
        m_hat = margin(logits, y_k)
        done = bool(is_adversarial(logits, y_k))
        for i in range(1, budget):
            if done:
                break
            s = square_side(square_fraction(0.8, i - 1), h, w, "linf")
            u = u_all[i - 1][k]
            top = min(math.floor(float(u[0]) * (h - s + 1)), h - s)
            left = min(math.floor(float(u[1]) * (w - s + 1)), w - s)
            sign = torch.where(u[5:5 + c] < 0.5, -1.0, 1.0).to(x.dtype).view(1, c, 1, 1)
            window = (..., slice(top, top + s), slice(left, left + s))
            proposal = x_hat.clone()
            proposal[window] = (x_k[window] + eps * sign).clamp(0, 1)
            if torch.equal(proposal, x_hat):
                proposal[window] = (x_k[window] - eps * sign).clamp(0, 1)
            logits = model(proposal)
            m_new = margin(logits, y_k)
            done = bool(is_adversarial(logits, y_k))
            if done or bool(m_new < m_hat):
                x_hat, m_hat = proposal, m_new
        adv[k], broken[k] = x_hat[0], done
    return adv, broken


def test_the_batched_search_equals_a_one_sample_reference() -> None:
    """Compaction, buffers and per-sample squares change no iterate: the batch gives each
    sample exactly what it gets alone."""
    model = small_cnn(8)
    x = images(30, seed=8)
    x[:5] = x[:5].round()  # on the faces: the flipped-sign branch
    with torch.no_grad():
        y = model(x).argmax(1)
        y[:2] = (y[:2] + 3) % 10
        noise = bank_noise(30, 120, 2 * 8 + 2 * 25 + 1, seed=9)
        result = square(model, x, y, eps=0.12, budget=120, noise=noise)
        adv, broken = reference_linf(model, x, y, 0.12, 120, noise)
    assert torch.equal(result.success, broken)
    assert 2 < int(broken.sum()) < 30
    assert torch.allclose(result.x_adv, adv, rtol=0, atol=1e-12)
