"""FAB-T (Croce & Hein, 2020): the projection onto the linearised boundary ∩ box against
brute-force references, the closed-form minimal perturbation of an affine binary model in
L2, L∞ and L1, the verdict at ε, and the ensemble's FAB-T stage."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks.fab import boundary_step, fab_minimal, fab_targeted
from robustkit.attacks.norms import lp_norm
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Norm

pytestmark = pytest.mark.usefixtures("single_thread")
DTYPE = torch.float64


def size(delta: Tensor, norm: Norm) -> float:
    return float(lp_norm(delta.view(1, -1), norm)[0])


# ------------------------------------------------------ brute-force references, small d


def dykstra_l2(p: Tensor, w: Tensor, c: Tensor, iterations: int = 20000) -> Tensor:
    """Per row, ``argmin ‖δ‖₂`` on ``{⟨w, δ⟩ = c} ∩ [−p, 1 − p]``: the Euclidean projection of
    0 onto the intersection of a hyperplane and a box, by Dykstra's alternating projections."""
    delta = torch.zeros_like(p)
    fix_plane, fix_box = torch.zeros_like(p), torch.zeros_like(p)
    for _ in range(iterations):
        moved = delta + fix_plane
        on_plane = moved + ((c - (w * moved).sum(1)) / (w * w).sum(1)).unsqueeze(1) * w
        fix_plane = moved - on_plane
        moved = on_plane + fix_box
        delta = torch.clamp(moved, -p, 1 - p)
        fix_box = moved - delta
    return delta


def vertices_l1(p: Tensor, w: Tensor, c: float) -> float:
    """``min ‖δ‖₁`` by enumeration: the objective is linear between the breakpoints ``δ_i ∈
    {−p_i, 0, 1 − p_i}``, so an optimum has every coordinate but one at a breakpoint and that
    one solved from ``⟨w, δ⟩ = c`` (``inf`` when the set is empty)."""
    d, best = len(p), math.inf
    for free in range(d):
        others = [i for i in range(d) if i != free]
        for choice in itertools.product(*[(-float(p[i]), 0.0, 1 - float(p[i])) for i in others]):
            if w[free] == 0:
                continue
            rest = sum(float(w[i]) * v for i, v in zip(others, choice, strict=True))
            last = (c - rest) / float(w[free])
            if -float(p[free]) - 1e-12 <= last <= 1 - float(p[free]) + 1e-12:
                best = min(best, sum(abs(v) for v in choice) + abs(last))
    return best


def bisection_linf(p: Tensor, w: Tensor, c: float) -> float:
    """``min ‖δ‖∞``: the smallest ``t`` for which the box ``[max(−p, −t), min(1 − p, t)]``
    still reaches ``⟨w, δ⟩ = c`` (the largest ``⟨w, δ⟩`` over a box is coordinate-wise)."""

    def reach(t: float) -> float:
        lo, hi = torch.clamp(-p, min=-t), torch.clamp(1 - p, max=t)
        return float(torch.maximum(w * lo, w * hi).sum() if c > 0 else -torch.minimum(
            w * lo, w * hi).sum())

    low, high = 0.0, 1.0
    if reach(high) < abs(c):
        return math.inf
    for _ in range(200):
        low, high = (low, (low + high) / 2) if reach((low + high) / 2) >= abs(c) else (
            (low + high) / 2, high)
    return high


def random_problems(count: int, d: int = 5) -> list[tuple[Tensor, Tensor, float]]:
    g = torch.Generator().manual_seed(7)
    problems = []
    for k in range(count):
        p = torch.rand(d, generator=g, dtype=DTYPE)
        w = torch.randn(d, generator=g, dtype=DTYPE)
        if k % 4 == 0:
            w[k % d] = 0.0
        c = float(torch.randn(1, generator=g, dtype=DTYPE)) * (0.2, 1.0, 3.0)[k % 3]
        problems.append((p, w, c))
    return problems


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_the_boundary_projection_is_the_brute_force_minimum(norm: Norm) -> None:
    feasible = 0
    problems = random_problems(60)
    if norm == "l2":
        references = dykstra_l2(torch.stack([q[0] for q in problems]),
                                torch.stack([q[1] for q in problems]),
                                torch.tensor([q[2] for q in problems], dtype=DTYPE))
    for k, (p, w, c) in enumerate(problems):
        delta = boundary_step(p[None], w[None], torch.tensor([c], dtype=DTYPE), norm)[0]
        assert bool(((p + delta >= -1e-12) & (p + delta <= 1 + 1e-12)).all())  # in the box
        if norm == "l2":
            reference = references[k]
            reachable = abs(float(w @ reference) - c) < 1e-6
        else:
            best = vertices_l1(p, w, c) if norm == "l1" else bisection_linf(p, w, c)
            reachable = math.isfinite(best)
        if not reachable:  # the box's corner closest to the hyperplane along w
            corner = torch.where(w * math.copysign(1, c) > 0, 1 - p, -p) * (w != 0)
            assert torch.allclose(delta, corner, atol=1e-12)
            continue
        feasible += 1
        assert float(w @ delta) == pytest.approx(c, abs=1e-9)  # on the hyperplane
        if norm == "l2":
            assert torch.allclose(delta, reference, atol=1e-6)  # the unique minimiser
        else:
            assert size(delta, norm) == pytest.approx(best, abs=1e-9)
    assert 25 < feasible < 60  # both cases were met


def test_the_projection_moves_by_the_cheapest_coordinates_in_each_norm() -> None:
    """Hand-computed: w = (1, 2, 2, 4), need ⟨w, δ⟩ = 1 from p = (.5, .5, .5, .9), where the
    last coordinate has room 0.1 only."""
    p = torch.tensor([[0.5, 0.5, 0.5, 0.9]], dtype=DTYPE)
    w = torch.tensor([[1.0, 2.0, 2.0, 4.0]], dtype=DTYPE)
    c = torch.tensor([1.0], dtype=DTYPE)
    # L1: the last coordinate to the box (0.4 of progress), then 0.3 of the 2s: ‖δ‖₁ = 0.4
    assert size(boundary_step(p, w, c, "l1"), "l1") == pytest.approx(0.4)
    # L∞: 4·0.1 + (1 + 2 + 2)·t = 1, t = 0.12
    assert torch.allclose(boundary_step(p, w, c, "linf"),
                          torch.tensor([[0.12, 0.12, 0.12, 0.1]], dtype=DTYPE))
    # L2: δ = (λ, 2λ, 2λ, 0.1) with 0.4 + 9λ = 1
    assert torch.allclose(boundary_step(p, w, c, "l2"),
                          torch.tensor([[1 / 15, 2 / 15, 2 / 15, 0.1]], dtype=DTYPE))
    # the other side of the hyperplane: the signs flip, the room is towards 0
    assert torch.allclose(boundary_step(p, w, -c, "linf"), -torch.tensor(
        [[1 / 9, 1 / 9, 1 / 9, 1 / 9]], dtype=DTYPE))


# --------------------------------------------------- an affine binary model: closed form


class Affine(nn.Module):
    """Two classes, ``z = (0, ⟨v, x⟩ + b)``: class 1 iff ``⟨v, x⟩ + b > 0``."""

    def __init__(self, v: Tensor, b: float) -> None:
        super().__init__()
        self.v = nn.Parameter(v.to(DTYPE))
        self.b = b

    def forward(self, x: Tensor) -> Tensor:
        score = x.flatten(1) @ self.v + self.b
        return torch.stack((torch.zeros_like(score), score), 1)


V = torch.tensor([1.0, 2.0, 2.0, 4.0], dtype=DTYPE)
#: Two class-1 points 1 above the boundary (``⟨v, x⟩ + b = 1``): in the middle of the box, and
#: one whose strongest pixel has room 0.1 (towards 0); the minimal distances in closed form
#: (as in the projection test above). On the boundary the logits tie and ``argmax`` says 0, so
#: the closest point itself breaks a class-1 sample.
POINTS = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.1]], dtype=DTYPE)
Y = torch.ones(1, dtype=torch.int64)
CLOSED_FORM: dict[Norm, list[float]] = {
    "l2": [1 / 5, math.sqrt(0.05)],     # |f| / ‖v‖₂; then (1/15, 2/15, 2/15, 0.1)
    "linf": [1 / 9, 0.12],              # |f| / ‖v‖₁; then 0.12
    "l1": [1 / 4, 0.4],                 # |f| / ‖v‖∞; then 0.1 + 0.3
}


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_fab_finds_the_closed_form_minimal_perturbation_of_an_affine_model(norm: Norm) -> None:
    for row, expected in enumerate(CLOSED_FORM[norm]):
        model = Affine(V, 1.0 - float(V @ POINTS[row]))
        x = POINTS[row].view(1, 1, 2, 2)
        found = fab_minimal(model, x, Y, norm=norm, steps=20, targets=1)
        assert model(found.x_adv).argmax(1).item() == 0  # adversarial
        distance = float(found.distance[0])
        assert distance == pytest.approx(size(found.x_adv - x, norm))
        # in the middle of the box the final search lands on the minimum; where the box binds,
        # FAB's last point is off the minimum's ray and the search along its segment stops
        # within 0.5% of it (0.1–0.3% here)
        tolerance = 1e-6 if row == 0 else 5e-3
        assert expected * (1 - 1e-9) <= distance <= expected * (1 + tolerance), (row, distance)
        assert found.grad_evals == 20  # one per step: ∇(z_t − z_y) is one backward pass


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_fab_at_eps_breaks_exactly_the_points_within_their_distance(norm: Norm) -> None:
    for row, expected in enumerate(CLOSED_FORM[norm]):
        model = Affine(V, 1.0 - float(V @ POINTS[row]))
        x = POINTS[row].view(1, 1, 2, 2).repeat(2, 1, 1, 1)
        eps = torch.tensor([0.99 * expected, 1.01 * expected], dtype=DTYPE)
        result = fab_targeted(model, x, Y.repeat(2), eps=eps, norm=norm, steps=20, targets=1)
        assert result.success.tolist() == [False, True]
        assert torch.equal(result.x_adv[0], x[0])  # not broken: the clean point
        assert size(result.x_adv[1] - x[1], norm) <= float(eps[1])
        assert model(result.x_adv).argmax(1).tolist() == [1, 0]


def test_the_final_search_moves_the_point_towards_the_boundary() -> None:
    model = Affine(V, 1.0 - float(V @ POINTS[0]))
    x = POINTS[0].view(1, 1, 2, 2)
    y = Y
    coarse = fab_minimal(model, x, y, norm="l2", steps=1, targets=1, search_steps=0)
    searched = fab_minimal(model, x, y, norm="l2", steps=1, targets=1)
    assert float(coarse.distance[0]) == pytest.approx(1.05 / 5)  # one step overshoots by η
    assert float(searched.distance[0]) == pytest.approx(1 / 5, rel=1e-9)  # on the boundary


def test_fab_stops_spending_on_samples_found_within_eps() -> None:
    model = Affine(V, 1.0 - float(V @ POINTS[0]))
    x = POINTS[0].view(1, 1, 2, 2)
    y = Y
    early = fab_targeted(model, x, y, eps=0.3, norm="l2", steps=20, targets=1)
    full = fab_targeted(model, x, y, eps=0.3, norm="l2", steps=20, targets=1, early_stop=False)
    assert early.success.item() and full.success.item()
    assert early.grad_evals == 1 and full.grad_evals == 20  # the first step already broke it


def test_fab_refuses_bad_settings() -> None:
    model = Affine(V, 0.0)
    x = POINTS[0].view(1, 1, 2, 2)
    y = Y
    with pytest.raises(RobustkitError, match="targets must be at most K - 1 = 1"):
        fab_minimal(model, x, y, targets=2)
    with pytest.raises(RobustkitError, match="pass eps with restarts > 1"):
        fab_minimal(model, x, y, targets=1, restarts=2)
    with pytest.raises(RobustkitError, match="steps must be an integer >= 1"):
        fab_minimal(model, x, y, targets=1, steps=0)
