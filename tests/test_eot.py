"""EOT, the transformation distribution, preprocessing defences and BPDA."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from robustkit.attacks import apgd, pgd
from robustkit.attacks.losses import objective
from robustkit.attacks.transforms import EOT, Draw, Transform, fooled_fraction
from robustkit.checks import check_forward_deterministic, check_input_gradients_usable
from robustkit.models.defences import (
    BitDepth,
    Defended,
    GaussianNoise,
    MedianFilter,
    with_bpda,
)

FULL = Transform(rotate=20, translate=3, scale=(0.8, 1.2), brightness=(-0.3, 0.3),
                 contrast=(0.5, 1.5), noise=0.2, blur=(0.0, 1.5))


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only contend


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 26 * 26, 10)).double().eval()


def batch(n: int = 12, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 10, (n,), generator=g)


def seeded(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- transformations


def one_draw(n: int, **values: Any) -> Draw:
    fields = {"angle": 0.0, "zoom": 1.0, "sigma": 0.0, "gain": 1.0, "offset": 0.0}
    fields.update({k: v for k, v in values.items() if k in fields})
    shift = torch.tensor([values.get("shift", (0.0, 0.0))], dtype=torch.float64).expand(n, 2)
    return Draw(shift=shift, noise=None,
                **{k: torch.full((n,), float(v), dtype=torch.float64) for k, v in fields.items()})


def test_identity_returns_its_input() -> None:
    x, _ = batch()
    assert Transform()(x, seeded()) is x
    assert Transform().is_identity and not FULL.is_identity


def test_translation_by_one_pixel_moves_the_image() -> None:
    x, _ = batch(2)
    moved = Transform(translate=1).apply(x, one_draw(2, shift=(1.0, 0.0)))
    torch.testing.assert_close(moved[..., 1:], x[..., :-1], atol=1e-12, rtol=0)
    assert bool((moved[..., 0] == 0).all())  # zero padding enters from the left
    down = Transform(translate=1).apply(x, one_draw(2, shift=(0.0, 2.0)))
    torch.testing.assert_close(down[..., 2:, :], x[..., :-2, :], atol=1e-12, rtol=0)


def test_quarter_turn_is_a_pixel_rotation() -> None:
    x, _ = batch(2)
    turned = Transform(rotate=90).apply(x, one_draw(2, angle=math.pi / 2))
    torch.testing.assert_close(turned, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-9, rtol=0)


def test_lighting_is_gain_about_grey_plus_offset() -> None:
    x = torch.full((1, 1, 28, 28), 0.6, dtype=torch.float64)
    lit = Transform(contrast=(0.5, 2.0), brightness=(-0.2, 0.2)).apply(
        x, one_draw(1, gain=2.0, offset=-0.1))
    torch.testing.assert_close(lit, torch.full_like(x, 2.0 * 0.1 + 0.5 - 0.1))


def test_blur_keeps_the_mean_of_an_interior_spot_and_spreads_it() -> None:
    x = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    x[0, 0, 14, 14] = 1.0
    blurred = Transform(blur=(0.0, 1.0)).apply(x, one_draw(1, sigma=1.0))
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-9)
    w = math.exp(-0.5)
    ratio = float(blurred[0, 0, 14, 15] / blurred[0, 0, 14, 14])
    assert ratio == pytest.approx(w)  # a Gaussian of σ = 1: one pixel away, e^(−1/2)
    unchanged = Transform(blur=(0.0, 1.0)).apply(x, one_draw(1, sigma=0.0))
    torch.testing.assert_close(unchanged, x)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_every_transformed_image_stays_in_the_box(seed: int) -> None:
    x, _ = batch(8, seed)
    out = FULL(x, seeded(seed))
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)


def test_draws_are_reproducible_from_the_generator() -> None:
    x, _ = batch()
    torch.testing.assert_close(FULL(x, seeded(5)), FULL(x, seeded(5)), rtol=0, atol=0)
    assert not torch.equal(FULL(x, seeded(5)), FULL(x, seeded(6)))


def test_transformations_are_differentiable() -> None:
    x, _ = batch(4)
    x = x.requires_grad_(True)
    FULL(x, seeded()).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


# --------------------------------------------------------------------------- EOT


@pytest.mark.parametrize("attack", [pgd, apgd])
def test_one_identity_sample_is_the_plain_attack_bit_for_bit(attack: Any) -> None:
    model, (x, y) = small_cnn(), batch()
    plain = attack(model, x, y, eps=0.1, steps=12, generator=seeded(), restarts=2)
    eot = attack(model, x, y, eps=0.1, steps=12, generator=seeded(), restarts=2,
                 eot=EOT(Transform(), samples=1, generator=seeded(9)))
    assert torch.equal(plain.x_adv, eot.x_adv)
    assert torch.equal(plain.success, eot.success)
    assert plain.grad_evals == eot.grad_evals


def test_eot_gradient_is_the_mean_of_per_draw_gradients() -> None:
    model, (x, y) = small_cnn(), batch(6)
    k = 5
    value, _, grad = EOT(FULL, samples=k, generator=seeded(11)).probe(
        model, x, y, "ce", False, gradient=True)
    draws = FULL.sample(k * len(x), seeded(11), x)
    grads, values = [], []
    for j in range(k):
        x_in = x.clone().requires_grad_(True)
        loss = objective(model(FULL.apply(x_in, draws.rows(slice(j * len(x), (j + 1) * len(x))))),
                         y, "ce", False)
        (g,) = torch.autograd.grad(loss.sum(), x_in)
        grads.append(g)
        values.append(loss.detach())
    torch.testing.assert_close(grad, torch.stack(grads).mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(value, torch.stack(values).mean(0), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(grad, grads[0])  # the draws differ: a mean, not one draw


def test_eot_success_needs_every_draw_fooled() -> None:
    x, y = batch(4)

    class Alternating(nn.Module):  # row r of the batched pass predicts class r % 2
        def forward(self, x: Tensor) -> Tensor:
            rows = torch.arange(len(x)) % 2
            return nn.functional.one_hot(rows, 10).double() * 5

    y = torch.zeros(4, dtype=torch.long)
    _, adv, _ = EOT(Transform(), samples=2).probe(Alternating(), x, y, "ce", False,
                                                  gradient=False)
    # 4 samples × 2 draws: draw 0 = rows 0..3 (classes 0,1,0,1), draw 1 = rows 4..7 (0,1,0,1)
    assert adv.tolist() == [False, True, False, True]


def test_eot_examples_stay_in_the_ball_before_transformation() -> None:
    model, (x, y) = small_cnn(), batch()
    for attack in (pgd, apgd):
        result = attack(model, x, y, eps=0.05, steps=8, generator=seeded(),
                        eot=EOT(FULL, samples=3, generator=seeded(4)))
        assert float((result.x_adv - x).abs().max()) <= 0.05 + 1e-12
        assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
        assert result.grad_evals % 3 == 0 and result.grad_evals > 0


# --------------------------------------------------------------------------- defences and BPDA


def centroid_model(mnist: Any, n: int = 3000) -> nn.Module:
    """Nearest class mean as a linear model: z_c = ⟨μ_c, x⟩ − ½‖μ_c‖² (about 80% on MNIST)."""
    x, y = mnist.train.images[:n].flatten(1), mnist.train.labels[:n]
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    layer = nn.Linear(784, 10)
    with torch.no_grad():
        layer.weight.copy_(means)
        layer.bias.copy_(-0.5 * (means**2).sum(1))
    return nn.Sequential(nn.Flatten(), layer).eval()


def test_preprocessing_steps_by_hand() -> None:
    x = torch.tensor([[[[0.0, 0.1, 0.2], [0.5, 0.6, 0.95], [1.0, 0.3, 0.4]]]])
    torch.testing.assert_close(BitDepth(1)(x), (x > 0.5).float())  # 0.5: half to even
    assert sorted(BitDepth(2)(x).unique().tolist()) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    med = MedianFilter(3)(x)
    assert float(med[0, 0, 1, 1]) == pytest.approx(0.4)  # median of the 9 values
    noisy = GaussianNoise(0.2)
    assert noisy.random and not BitDepth(3).random
    assert not torch.equal(noisy(x), noisy(x))


def test_bpda_keeps_predictions_and_passes_gradients_through() -> None:
    model = small_cnn().float()
    x, _ = batch(5)
    x = x.float()
    defended = Defended(model, BitDepth(3))
    through = with_bpda(defended, "identity")
    torch.testing.assert_close(through(x), defended(x), rtol=0, atol=0)
    x_in = x.clone().requires_grad_(True)
    defended(x_in).sum().backward()
    assert x_in.grad is not None and float(x_in.grad.abs().max()) == 0.0  # rounding: ∇ = 0
    x_in.grad = None
    through(x_in).sum().backward()
    q = BitDepth(3)(x).requires_grad_(True)  # identity BPDA: ∇ at g(x), passed straight back
    model(q).sum().backward()
    torch.testing.assert_close(x_in.grad, q.grad)


def test_mean_filter_approximation_gives_the_box_filter_gradient() -> None:
    model = small_cnn().float()
    x, _ = batch(2)
    x = x.float().requires_grad_(True)
    with_bpda(Defended(model, MedianFilter(3)), "mean-filter")(x).sum().backward()
    med = MedianFilter(3)(x.detach()).requires_grad_(True)
    model(med).sum().backward()
    box = x.detach().clone().requires_grad_(True)
    windows = MedianFilter(3)._windows(box).mean(dim=2).view_as(box)
    (expected,) = torch.autograd.grad(windows, box, med.grad)
    torch.testing.assert_close(x.grad, expected)


def test_bpda_refuses_what_does_not_fit() -> None:
    from robustkit.errors import RobustkitError

    with pytest.raises(RobustkitError, match=r"mean-filter.*bit-depth"):
        Defended(small_cnn(), BitDepth(3), bpda="mean-filter")
    with pytest.raises(RobustkitError, match="has none"):
        with_bpda(small_cnn(), "identity")


def test_bpda_breaks_bit_depth_reduction_that_plain_pgd_cannot(mnist: Any) -> None:
    model = Defended(centroid_model(mnist), BitDepth(3))
    x, y = mnist.test.images[:200], mnist.test.labels[:200]
    keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    flagged = check_input_gradients_usable(model, x, y)
    assert flagged.status == "fail" and flagged.value == 1.0  # the check flags it first
    assert check_input_gradients_usable(with_bpda(model, "identity"), x, y).status == "pass"
    plain = pgd(model, x, y, eps=0.25, steps=20, random_start=False)
    bpda = pgd(with_bpda(model, "identity"), x, y, eps=0.25, steps=20, random_start=False)
    assert float(plain.success.float().mean()) == 0.0  # no gradient: PGD never moves
    assert float(bpda.success.float().mean()) > 0.8
    assert bool((model(bpda.x_adv).argmax(1) != y)[bpda.success].all())  # judged undefended


def test_eot_beats_plain_pgd_on_a_randomised_defence(mnist: Any) -> None:
    model = Defended(centroid_model(mnist), GaussianNoise(0.5))
    torch.manual_seed(0)
    x, y = mnist.test.images[:200], mnist.test.labels[:200]
    keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    assert check_forward_deterministic(model, x).status == "fail"
    assert "EOT" in check_forward_deterministic(model, x).detail

    def fresh_success(eot: EOT | None) -> float:
        torch.manual_seed(1)
        x_adv = pgd(model, x, y, eps=0.2, steps=30, generator=seeded(), eot=eot).x_adv
        torch.manual_seed(2)  # the model's noise: fresh draws, none of those the attack saw
        return float(fooled_fraction(model, x_adv, y, Transform(), 50).mean())

    plain, eot = fresh_success(None), fresh_success(EOT(Transform(), samples=16))
    assert eot > plain + 0.25, (plain, eot)  # measured: 0.31 plain, 0.71 EOT
    assert eot > 0.6
