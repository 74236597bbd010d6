"""The L1 threat model (#37 item 4): the exact projection onto the L1 ball ∩ the [0, 1] box
against brute-force references, l1-APGD against the closed-form worst case of a linear model,
the ε schedule, and the config/CLI errors of an attack that does not run in L1."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks.apgd import apgd
from robustkit.attacks.apgd_l1 import EPS_SCHEDULE, NO_SCHEDULE, phases
from robustkit.attacks.norms import enforce_ball, project_l1_box, random_unit_ball, sparse_step
from robustkit.config import config_from_dict
from robustkit.errors import RobustkitError

pytestmark = pytest.mark.usefixtures("single_thread")


def _bisection(v: Tensor, x: Tensor, eps: float) -> Tensor:
    """The projection of one vector by bisection on the multiplier ``λ`` of the L1 constraint
    (``δ_i(λ) = clamp(soft(v_i, λ), −x_i, 1 − x_i)``; ``‖δ(λ)‖₁`` falls as ``λ`` grows): no
    sorting, no kinks, 200 halvings in float64."""
    v, x = v.double(), x.double()

    def at(lam: float) -> Tensor:
        soft = v.sign() * (v.abs() - lam).clamp_min(0)
        return torch.minimum(torch.maximum(soft, -x), 1 - x)

    if float(at(0.0).abs().sum()) <= eps:
        return at(0.0)
    low, high = 0.0, float(v.abs().max())
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if float(at(mid).abs().sum()) > eps else (low, mid)
    return at(high)


def _project(v: Tensor, x: Tensor, eps: float) -> Tensor:
    """``project_l1_box`` on one vector (as a 1×1×1×d batch), in float64."""
    d = v.numel()
    out = project_l1_box(v.double().view(1, 1, 1, d), x.double().view(1, 1, 1, d),
                         torch.full((1, 1, 1, 1), eps, dtype=torch.float64))
    return out.view(-1)


@pytest.mark.parametrize("seed", range(6))
def test_l1_box_projection_is_the_nearest_point_of_a_fine_grid(seed: int) -> None:
    """In 2-D, brute force: every point of a 601×601 grid over the box that lies in the L1
    ball; the projection is feasible and no grid point is nearer (beyond the grid's spacing)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, generator=gen, dtype=torch.float64)
    v = 3 * torch.randn(2, generator=gen, dtype=torch.float64)
    eps = float(0.1 + 0.8 * torch.rand(1, generator=gen, dtype=torch.float64))
    p = _project(v, x, eps)
    assert float(p.abs().sum()) <= eps + 1e-12
    assert bool(((x + p >= -1e-12) & (x + p <= 1 + 1e-12)).all())
    axis = torch.linspace(0, 1, 601, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis) - x  # δ = grid point − x
    feasible = grid[grid.abs().sum(1) <= eps]
    nearest = float((feasible - v).norm(dim=1).min())
    spacing = 1 / 600
    assert float((p - v).norm()) <= nearest + 1e-12
    assert float((p - v).norm()) >= nearest - 2 * spacing


@pytest.mark.parametrize(("d", "seed"), list(itertools.product((1, 3, 6, 50), range(4))))
def test_l1_box_projection_matches_bisection_and_the_variational_inequality(
        d: int, seed: int) -> None:
    """Against a bisection on the multiplier (an independent computation), and the defining
    property of a projection onto a convex set S: ``⟨v − P(v), z − P(v)⟩ ≤ 0`` for all z ∈ S,
    tried on random points of S (box points shrunk into the ball, which keeps them in the box
    since the box holds δ = 0) and on S's vertices along the coordinate axes."""
    gen = torch.Generator().manual_seed(100 * d + seed)
    x = torch.rand(d, generator=gen, dtype=torch.float64)
    x[torch.rand(d, generator=gen) < 0.3] = 0.0  # MNIST-like: many pixels at the box's edge
    v = 2 * torch.randn(d, generator=gen, dtype=torch.float64)
    eps = float(torch.rand(1, generator=gen)) * min(d, 6) * 0.7 + 0.05
    p = _project(v, x, eps)
    assert float(p.abs().sum()) <= eps * (1 + 1e-12)
    assert bool(((x + p >= -1e-12) & (x + p <= 1 + 1e-12)).all())
    assert torch.allclose(p, _bisection(v, x, eps), atol=1e-9)
    box = torch.rand(2000, d, generator=gen, dtype=torch.float64) - x
    size = box.abs().sum(1, keepdim=True)
    z = box * torch.clamp(eps / size, max=1) * torch.rand(2000, 1, generator=gen,
                                                         dtype=torch.float64)
    up = torch.diag(torch.clamp(1 - x, max=eps))  # the extreme points ±min(ε, room)·e_i
    down = -torch.diag(torch.clamp(x, max=eps))
    z = torch.cat((z, up, down))
    assert float(((v - p) * (z - p)).sum(1).max()) <= 1e-9


def test_clamping_after_the_ball_is_not_the_projection() -> None:
    """Why the exact projection: with a pixel at the box's edge, projecting onto the ball and
    then clamping leaves budget unspent and lands farther away than the exact projection."""
    x = torch.tensor([1.0, 0.5], dtype=torch.float64)
    v = torch.tensor([2.0, 1.0], dtype=torch.float64)  # the first pixel cannot go up
    exact = _project(v, x, 1.0)
    ball = v * 1.0 / 3.0 if float(v.abs().sum()) > 1 else v  # not even the ball's projection
    soft = v.sign() * (v.abs() - 1.0).clamp_min(0)  # the ball's projection: λ = 1
    clamped = torch.minimum(torch.maximum(soft, -x), 1 - x)
    assert torch.allclose(exact, torch.tensor([0.0, 0.5], dtype=torch.float64))
    assert float((clamped - v).norm()) > float((exact - v).norm()) + 0.1
    assert float(ball.abs().sum()) == pytest.approx(1.0)


def test_enforce_ball_holds_l1_results_and_leaves_inside_points_alone() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 5, 5, generator=gen)
    eps = torch.full((6, 1, 1, 1), 2.0)
    far = (x + torch.randn(6, 1, 5, 5, generator=gen)).clamp(0, 1)
    held = enforce_ball(far, x, eps, "l1")
    assert bool(((held - x).flatten(1).abs().sum(1) <= 2.0 * (1 + 1e-6)).all())
    assert bool(((held >= 0) & (held <= 1)).all())
    near = x + project_l1_box(0.01 * torch.randn(6, 1, 5, 5, generator=gen), x, eps)
    assert torch.equal(enforce_ball(near, x, eps, "l1"), near)


def test_l1_start_noise_lies_in_the_unit_ball_and_the_sparse_step_has_unit_l1_norm() -> None:
    u = random_unit_ball((50, 1, 6, 6), "l1", torch.Generator().manual_seed(0))
    assert bool((u.flatten(1).abs().sum(1) <= 1 + 1e-6).all())
    g = torch.tensor([[0.1, -3.0, 2.0, 0.0, -0.5]]).view(1, 1, 1, 5)
    step = sparse_step(g, torch.tensor([0.4]))  # k = 40% of 5: the two largest |g_i|
    assert step.view(-1).tolist() == [0.0, -0.5, 0.5, 0.0, 0.0]
    assert sparse_step(torch.zeros_like(g), torch.tensor([0.4])).abs().sum() == 0


def test_the_eps_schedule_splits_the_steps_as_autoattack_does() -> None:
    assert phases(100, EPS_SCHEDULE) == [(3.0, 30), (2.0, 30), (1.0, 40)]
    assert phases(5, EPS_SCHEDULE) == [(3.0, 2), (2.0, 2), (1.0, 1)]
    assert phases(1, EPS_SCHEDULE) == [(3.0, 0), (2.0, 0), (1.0, 1)]
    assert phases(0, EPS_SCHEDULE) == [(3.0, 0), (2.0, 0), (1.0, 0)]
    assert phases(100, NO_SCHEDULE) == [(1.0, 100)]


class Linear(nn.Module):
    """Two classes with logits ``(w·x + b, 0)``: the margin of class 0 is linear in x."""

    def __init__(self, w: Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x: Tensor) -> Tensor:
        m = (x * self.w).flatten(1).sum(1) + self.b
        return torch.stack((m, torch.zeros_like(m)), dim=1)


def _closed_form(w: Tensor, x: Tensor, eps: float) -> float:
    """``min w·δ`` over ``‖δ‖₁ ≤ ε``, ``x + δ ∈ [0, 1]^d`` — a fractional knapsack: spend the
    budget against ``sign(w_i)`` on the largest ``|w_i|`` first, each up to its room in the
    box (``x_i`` when ``w_i > 0``, ``1 − x_i`` otherwise)."""
    w, x = w.flatten().double(), x.flatten().double()
    room = torch.where(w > 0, x, 1 - x)
    total, left = 0.0, eps
    for i in w.abs().argsort(descending=True).tolist():
        take = min(float(room[i]), left)
        total -= abs(float(w[i])) * take
        left -= take
    return total


@pytest.mark.parametrize("schedule", [EPS_SCHEDULE, NO_SCHEDULE], ids=["schedule", "plain"])
def test_l1_apgd_finds_the_closed_form_worst_case_of_a_linear_model(
        schedule: tuple[tuple[float, float], ...]) -> None:
    """A linear margin's worst case over the L1 ball ∩ box puts the budget on the largest
    ``|w_i|`` subject to the box. l1-APGD (margin loss, 100 steps; the bias keeps every sample
    correct, so nothing stops it early) must come within 2% of it and never beyond it."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1, 1, 8, 8, generator=gen)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    y = torch.zeros(16, dtype=torch.long)
    eps = 3.0
    result = apgd(Linear(w, 100.0), x, y, eps=eps, norm="l1", loss="margin", steps=100,
                  generator=torch.Generator().manual_seed(1), l1_schedule=schedule)
    found = ((result.x_adv - x) * w).flatten(1).sum(1).double()
    best = torch.tensor([_closed_form(w, x[i], eps) for i in range(16)], dtype=torch.float64)
    assert bool((found >= best - 1e-4).all())  # nothing beats the optimum (feasibility)
    ratio = found / best
    floor = 0.98 if schedule == EPS_SCHEDULE else 0.75  # the plain run stalls on a few
    assert float(ratio.min()) >= floor, ratio.tolist()
    assert float(ratio.median()) >= 0.99


def test_l1_apgd_beats_the_dense_l1_direction_on_the_linear_model() -> None:
    """The closed form is sparse; a check that the attack moves few coordinates: the result's
    support is no larger than the optimum's plus a few coordinates of slack, not the d = 64 a
    dense L2-like step would touch."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(1, 1, 8, 8, generator=gen)
    x = torch.rand(8, 1, 8, 8, generator=gen)
    result = apgd(Linear(w, 100.0), x, torch.zeros(8, dtype=torch.long), eps=1.0, norm="l1",
                  loss="margin", steps=100, generator=torch.Generator().manual_seed(1))
    support = ((result.x_adv - x).flatten(1) != 0).sum(1)
    assert int(support.max()) <= 12, support.tolist()


# ------------------------------------------------------------------- config and CLI errors


def test_a_config_names_the_attack_that_does_not_run_in_l1() -> None:
    with pytest.raises(RobustkitError, match=r"attacks\[1\]\.norm: pgd does not run in l1: l1 "
                                             r"attacks are apgd, apgd-t, square, fab-t, "
                                             r"autoattack"):
        config_from_dict({"attacks": [{"name": "apgd", "norm": "l1"},
                                      {"name": "pgd", "norm": "l1"}],
                          "evaluate": {"eps": [0, 10]}})
    config = config_from_dict({"attacks": [{"name": "apgd", "norm": "l1"},
                                           {"name": "autoattack", "norm": "l1"}],
                               "evaluate": {"eps": [0, 10]}})
    assert [a.title for a in config.attacks] == ["apgd100-l1", "autoattack-l1"]
    with pytest.raises(RobustkitError, match=r"L1 budgets at most d = 784"):
        config_from_dict({"attacks": [{"name": "apgd", "norm": "l1"}],
                          "evaluate": {"eps": [0, 785]}})


def test_the_python_api_refuses_l1_for_an_attack_without_it() -> None:
    from robustkit.attacks.pgd import pgd
    from robustkit.attacks.square import square

    x, y = torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    model = Linear(torch.ones(1, 1, 4, 4), 0.0)
    with pytest.raises(RobustkitError, match=r"pgd does not run in l1; it takes linf, l2"):
        pgd(model, x, y, eps=1.0, norm="l1")
    with pytest.raises(RobustkitError, match=r"unknown norm 'l3'; choose one of linf, l2, l1"):
        square(model, x, y, eps=1.0, norm="l3")  # type: ignore[arg-type]


def test_the_cli_refuses_l1_with_pgd_in_one_line_and_keeps_a_preset_to_its_l1_attacks(
) -> None:
    from robustkit.cli import _attack_configs
    from tests.conftest import cli

    result = cli("attack", "--model", "zoo:mnist_softmax", "--attack", "pgd", "--norm", "l1",
                 "--eps", "0,10", "--n", "5", "-q")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "pgd does not run in l1" in lines[0]
    assert "apgd, apgd-t, square, fab-t, autoattack" in lines[0]
    # the standard preset (fgsm + autoattack) in L1 is the ensemble alone
    assert [a.name for a in _attack_configs("standard", norm="l1")] == ["autoattack"]
    assert [a.name for a in _attack_configs("standard", norm="linf")] == ["fgsm", "autoattack"]
    with pytest.raises(RobustkitError, match="fgsm does not run in l1"):
        _attack_configs("fgsm", norm="l1")


def test_l1_eps_range_is_the_image_size() -> None:
    from robustkit.budgets import eps_bound

    assert eps_bound("l1", 784) == 784.0
    assert eps_bound("l1") == math.inf
