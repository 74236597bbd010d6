"""Certified bounds (#35): closed forms on hand-built nets (L∞ and L2, BatchNorm with a
negative scale, the normalisation wrapper), containment of sampled points and of attacks'
examples (a hypothesis property over random nets, both norms), CROWN at least as tight as IBP,
unsupported layers (API and CLI), the certified radius by bisection, and the stage's
consistency check failing on a deliberately broken bound."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from robustkit.attacks import pgd
from robustkit.certify import BOUND_NORMS, METHODS, margin_bounds
from robustkit.errors import RobustkitError
from robustkit.models.zoo import Normalized
from tests.conftest import run

pytestmark = pytest.mark.usefixtures("single_thread")


def hand_net() -> nn.Sequential:
    """z = W₂ relu(W₁ x + b₁): W₁ = [[1, −1], [2, 1]], b₁ = [0, −1], W₂ = [[1, 1], [−1, 2]]."""
    first, second = nn.Linear(2, 2), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
        first.bias.copy_(torch.tensor([0.0, -1.0]))
        second.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 2.0]]))
    return nn.Sequential(first, nn.ReLU(), second)


def test_bounds_equal_the_closed_form_on_a_hand_built_net() -> None:
    """x = (0.5, 0.5), ε = 0.1, label 1: margin m = z₁ − z₀ = −2 relu(x₁ − x₂) + relu(2x₁ +
    x₂ − 1). The box is [0.4, 0.6]²: x₁ − x₂ ∈ [−0.2, 0.2] (unstable), 2x₁ + x₂ − 1 ∈
    [0.2, 0.8] (active). IBP with C folded into the last layer: m ≥ −2·0.2 + 0.2 = −0.2.
    CROWN: the unstable ReLU under a negative coefficient takes its upper line
    ½(z + 0.2), so m ≥ −(x₁ − x₂) − 0.2 + 2x₁ + x₂ − 1 = x₁ + 2x₂ − 1.2 ≥ 0.0 on the box.
    The true minimum is 0.2 (at x₁ = 0.6, x₂ = 0.4, and at (0.4, 0.4))."""
    x, y = torch.tensor([[0.5, 0.5]]), torch.tensor([1])
    ibp = margin_bounds(hand_net(), x, y, 0.1, "ibp").margins
    crown = margin_bounds(hand_net(), x, y, 0.1, "crown").margins
    assert float(ibp) == pytest.approx(-0.2, abs=1e-12)
    assert float(crown) == pytest.approx(0.0, abs=1e-12)
    grid = torch.cartesian_prod(torch.linspace(0.4, 0.6, 41), torch.linspace(0.4, 0.6, 41))
    with torch.no_grad():
        logits = hand_net()(grid)
    assert float((logits[:, 1] - logits[:, 0]).min()) == pytest.approx(0.2, abs=1e-6)


def test_the_input_box_is_clipped_to_pixels() -> None:
    """At x = 0.05 with ε = 0.1 the box is [0, 0.15], not [−0.05, 0.15]: for z = x the IBP
    margin bound against a zero logit is 0 (clipped), not −0.05."""
    layer = nn.Linear(1, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [0.0]]))
        layer.bias.zero_()
    net = nn.Sequential(layer)
    bound = margin_bounds(net, torch.tensor([[0.05]]), torch.tensor([0]), 0.1, "ibp")
    assert float(bound.margins) == pytest.approx(0.0, abs=1e-12)


def random_nets(seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(36, 20), nn.ReLU(), nn.Linear(20, 16),
                        nn.ReLU(), nn.Linear(16, 4))
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.7, -2.0]))  # two negative scales
        bn.bias.normal_()
    bn.running_mean = torch.randn(3)
    bn.running_var = torch.rand(3) * 1.5 + 0.5
    conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), bn, nn.ReLU(),
                         nn.AvgPool2d(2), nn.Conv2d(3, 4, 2, stride=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 4))
    normalised = Normalized(nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.ReLU(),
                                          nn.Linear(12, 4)), [0.3], [0.2])
    return {"mlp": mlp.eval(), "conv-bn-negative": conv.eval(), "normalised": normalised.eval()}


def _margins(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The margins at ``x``, computed in float64 as the bounds are."""
    import copy

    with torch.no_grad():
        z: Tensor = copy.deepcopy(model).double()(x.double())
    others = ~nn.functional.one_hot(y, z.shape[1]).bool()
    return (z.gather(1, y[:, None]) - z)[others].view(len(y), -1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["mlp", "conv-bn-negative", "normalised"])
def test_bounds_contain_sampled_points_and_attack_examples(name: str, seed: int) -> None:
    model = random_nets(seed)[name]
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 6, 6, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.08
    bounds = {m: margin_bounds(model, x, y, eps, m).margins for m in METHODS}
    points = [x + eps * (2 * torch.rand(x.shape, generator=generator) - 1) for _ in range(200)]
    points += [x + eps * torch.sign(torch.randn(x.shape, generator=generator))
               for _ in range(50)]  # corners
    points.append(pgd(model, x, y, eps=eps, steps=20, loss="margin",
                      generator=generator).x_adv)
    lowest = torch.stack([_margins(model, p.clamp(0, 1), y) for p in points]).amin(0)
    for method, bound in bounds.items():
        assert bool((bound <= lowest + 1e-9).all()), (method, (bound - lowest).max())


def test_crown_is_tighter_than_ibp_on_a_trained_net(mnist: object) -> None:
    """The released 784-512-10 MLP (standard training) on 100 test images at ε = 0.01:
    CROWN's margin bounds are at least IBP's on every sample and margin, and certify more."""
    from robustkit.models import load_model

    model, _ = load_model("zoo:mnist_mlp")
    split = mnist.test.take(100)  # type: ignore[attr-defined]
    bounds = {m: margin_bounds(model, split.images, split.labels, 0.01, m) for m in METHODS}
    assert bool((bounds["crown"].margins >= bounds["ibp"].margins - 1e-9).all())
    counts = {m: int(b.certified.sum()) for m, b in bounds.items()}
    assert counts["crown"] > counts["ibp"], counts


def test_unsupported_layers_are_one_line() -> None:
    with pytest.raises(RobustkitError, match=r"cannot bound the layer Tanh at 1: "
                                             r"certification covers Linear, Conv2d, ReLU"):
        margin_bounds(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)),
                      torch.rand(2, 4), torch.tensor([0, 1]), 0.1, "ibp")
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                           nn.Linear(2 * 2 * 2, 3))
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    assert margin_bounds(pooled, x, y, 0.01, "ibp").margins.shape == (2, 2)  # IBP covers it
    with pytest.raises(RobustkitError, match="CROWN does not cover MaxPool2d"):
        margin_bounds(pooled, x, y, 0.01, "crown-ibp")


def test_certified_samples_resist_the_attack() -> None:
    """A small ε on a random MLP: what the bounds certify, PGD never breaks (the consistency
    that the report's check will hold every evaluation to)."""
    model = random_nets(3)["mlp"]
    x = torch.rand(64, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.01
    certified = margin_bounds(model, x, y, eps, "crown").certified
    assert int(certified.sum()) > 0
    broken = pgd(model, x, y, eps=eps, steps=50, generator=torch.Generator().manual_seed(0)
                 ).success
    assert not bool((certified & broken).any())


def test_certify_command_brackets_the_attack(tmp_path: object, mnist_root: object) -> None:
    """``robustkit certify`` on the released MLP: certified accuracy never above PGD's robust
    accuracy on the same images, clean accuracy at ε = 0, and one-line errors."""
    import json

    from robustkit.config import AttackConfig
    from robustkit.evaluation import evaluate
    from robustkit.models import load_model
    from robustkit.sources import load_data

    done = run("certify", "--model", "zoo:mnist_mlp", "--eps", "0,0.01,0.02", "--n", "100",
               "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    rows = document["table"]
    assert len(document["per_sample"]) == 100 and document["norm"] == "linf"
    assert {r["method"] for r in rows} == {"ibp", "crown-ibp", "best"}
    model, _ = load_model("zoo:mnist_mlp")
    split = load_data(None, val_size=0, parts=("test",)).test.take(100)
    attacked = evaluate(model, split, [AttackConfig(name="pgd", steps=40)], [0.0, 0.01, 0.02])
    accuracy = dict(zip(attacked.results["eps"], attacked.results["accuracy"], strict=True))
    for row in rows:
        assert row["accuracy"] <= accuracy[row["eps"]] + 1e-12, row
    assert {r["accuracy"] for r in rows if r["eps"] == 0} == {accuracy[0.0]}
    for methods in (("--method", "crown"), ()):  # the default ibp,crown-ibp too
        # up front, before the data (an empty --data-dir) and before any IBP pass
        refused = run("certify", "--model", "zoo:mnist_cnn", "--eps", "0.01", *methods,
                      "--data-dir", str(tmp_path))
        assert refused.returncode == 2
        assert refused.stderr.strip() == ("error: CROWN does not cover MaxPool2d: certify this "
                                          "model with IBP alone (--method ibp), or pool with "
                                          "AvgPool2d or a strided convolution")


# ------------------------------------------------------------------------ L2, closed forms


def test_l2_bounds_equal_the_closed_form_on_a_hand_built_net() -> None:
    """The hand net at x = (0.5, 0.5), label 1, L2 ε = 0.1. First layer: h₁ = x₁ − x₂
    (‖row‖₂ = √2), h₂ = 2x₁ + x₂ − 1 (‖row‖₂ = √5), so IBP gives h₁ ∈ ±0.1√2 (the box's
    ±0.2 is looser) and h₂ ∈ 0.5 ∓ 0.1√5: m ≥ −2·0.1√2 + 0.5 − 0.1√5. CROWN (and CROWN-IBP,
    whose only intermediate box is this one): the unstable ReLU's upper line ½(h₁ + 0.1√2)
    gives m ≥ x₁ + 2x₂ − 1 − 0.1√2, whose minimum over the ball is 0.5 − 0.1√2 − 0.1√5 (the
    box's 0.4 + 0.8 − 1 − 0.1√2 is lower). A bound that ignored L2 (the box) would give
    −0.2 and 0.0."""
    import math

    x, y = torch.tensor([[0.5, 0.5]]), torch.tensor([1])
    root2, root5 = math.sqrt(2), math.sqrt(5)
    expected = {"ibp": 0.5 - 0.2 * root2 - 0.1 * root5,
                "crown-ibp": 0.5 - 0.1 * root2 - 0.1 * root5,
                "crown": 0.5 - 0.1 * root2 - 0.1 * root5}
    for method, value in expected.items():
        bound = margin_bounds(hand_net(), x, y, 0.1, method, "l2").margins  # type: ignore[arg-type]
        assert float(bound) == pytest.approx(value, abs=1e-12), method


def test_l2_uses_the_pixel_box_where_it_is_tighter() -> None:
    """z₀ = x₁ + x₂ against z₁ = 0 at x = (0.02, 0.02), label 0, L2 ε = 0.5: the ball alone
    gives 0.04 − 0.5√2 < 0, but every point of the clipped set has x' ≥ 0, and the box
    [0, 0.52]² gives the exact minimum 0 (IBP folds C into the last layer: exact here)."""
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    for method in METHODS:
        bound = margin_bounds(nn.Sequential(layer), torch.tensor([[0.02, 0.02]]),
                              torch.tensor([0]), 0.5, method, "l2").margins
        assert float(bound) == pytest.approx(0.0, abs=1e-12), method


def test_batchnorm_with_a_negative_scale_closed_form() -> None:
    """h = BN(x) with γ = −2, β = 0.625, mean 0.25, var + eps = 1: h = −2x + 1.125;
    z₀ = relu(h), z₁ = 0, label 0. At x = 0.375, ε = 0.125 (L∞ and L2 agree in 1-D; every
    value exact in binary): h ∈ [0.125, 0.625] (radius |−2|·0.125), so every bound is 0.125,
    the true minimum (at x = 0.5). Reading the scale's sign into the radius would give 0.625."""
    bn = nn.BatchNorm1d(1, eps=0.25)  # var + eps = 0.75 + 0.25, exact in float32
    with torch.no_grad():
        bn.weight.fill_(-2.0)
        bn.bias.fill_(0.625)
    assert bn.running_mean is not None and bn.running_var is not None
    bn.running_mean.fill_(0.25)
    bn.running_var.fill_(0.75)
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [0.0]]))
    net = nn.Sequential(bn, nn.ReLU(), head).eval()
    for norm in BOUND_NORMS:
        for method in METHODS:
            bound = margin_bounds(net, torch.tensor([[0.375]]), torch.tensor([0]), 0.125,
                                  method, norm).margins
            assert float(bound) == pytest.approx(0.125, abs=1e-12), (norm, method)


def _folded(normalised: Normalized, inner: nn.Sequential) -> nn.Sequential:
    """The same function with the normalisation folded into the first (unpadded) Conv2d:
    W' = W / std_c, b' = b − Σ W mean_c / std_c."""
    import copy

    folded = copy.deepcopy(inner)
    conv = folded[0]
    assert isinstance(conv, nn.Conv2d) and conv.bias is not None
    mean, std = normalised.mean.view(-1), normalised.std.view(-1)
    with torch.no_grad():
        weight = conv.weight / std.view(1, -1, 1, 1)
        conv.bias.sub_((weight * mean.view(1, -1, 1, 1)).sum((1, 2, 3)))
        conv.weight.copy_(weight)
    return folded


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_normalisation_wrapper_bounds_the_folded_network(norm: str) -> None:
    """``--normalize`` with two channels (mean 0.3/0.6, std 0.2/0.5): the bounds of the wrapper
    equal those of the same network with the normalisation folded into its first layer: ε
    stays in pixel units and is scaled per channel (in L2 through the composed row norms)."""
    torch.manual_seed(4)
    inner = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 8),
                          nn.ReLU(), nn.Linear(8, 3))
    normalised = Normalized(inner, [0.3, 0.6], [0.2, 0.5]).eval()
    folded = _folded(normalised, inner).eval()
    x = torch.rand(5, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = normalised(x).argmax(1)
        assert torch.allclose(normalised(x), folded(x), atol=1e-5)
    eps = 0.05 if norm == "linf" else 0.3
    for method in METHODS:
        a = margin_bounds(normalised, x, y, eps, method, norm).margins  # type: ignore[arg-type]
        b = margin_bounds(folded, x, y, eps, method, norm).margins  # type: ignore[arg-type]
        assert torch.allclose(a, b, atol=1e-5), (method, (a - b).abs().max())


# ------------------------------------------------------ containment: a property over nets


def _random_net(seed: int, kind: str) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        widths = [int(w) for w in torch.randint(3, 12, (2,))]
        return nn.Sequential(nn.Flatten(), nn.Linear(16, widths[0]), nn.ReLU(),
                             nn.Linear(widths[0], widths[1]), nn.ReLU(),
                             nn.Linear(widths[1], 3)).eval()
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(2) * 2)  # either sign
        bn.bias.normal_()
    bn.running_mean = torch.randn(2)
    bn.running_var = torch.rand(2) + 0.3
    inner = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), bn, nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(2, 3, 2, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3, 3))
    return Normalized(inner, [0.4], [0.3]).eval() if kind == "normalised-conv" else inner.eval()


def _points(x: Tensor, eps: float, norm: str, count: int, generator: torch.Generator
            ) -> list[Tensor]:
    """Points of the ε-ball of ``norm`` around ``x`` projected onto [0, 1] (the projection onto
    a convex set holding x keeps them in the ball): uniform ones and ones on its boundary."""
    points = []
    for k in range(count):
        if norm == "linf":
            step = (2 * torch.rand(x.shape, generator=generator) - 1) if k % 2 else torch.sign(
                torch.randn(x.shape, generator=generator))
        else:
            direction = torch.randn(x.shape, generator=generator)
            direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            scale = torch.rand(len(x), 1, 1, 1, generator=generator) if k % 2 else 1.0
            step = direction * scale
        points.append((x + eps * step).clamp(0, 1))
    return points


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["mlp", "conv", "normalised-conv"]),
       norm=st.sampled_from(["linf", "l2"]), scale=st.floats(0.005, 0.3))
def test_bounds_contain_every_point_of_the_ball_and_pgd_examples(seed: int, kind: str,
                                                                 norm: str, scale: float) -> None:
    """For random nets (BatchNorm of either sign, average pooling, the wrapper), inputs and ε:
    every method's lower bound is at most the margin at random points of the clipped ball, at
    its boundary, and at PGD's examples (margin loss, no early stop)."""
    model = _random_net(seed, kind)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 4, 4, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = scale if norm == "linf" else 4 * scale  # L2 budgets of the same reach on 16 pixels
    bounds = {m: margin_bounds(model, x, y, eps, m, norm).margins  # type: ignore[arg-type]
              for m in METHODS}
    points = _points(x, eps, norm, 60, generator)
    points.append(pgd(model, x, y, eps=eps, norm=norm, steps=20, loss="margin",  # type: ignore[arg-type]
                      early_stop=False, generator=generator).x_adv)
    lowest = torch.stack([_margins(model, p, y) for p in points]).amin(0)
    for method, bound in bounds.items():
        assert bool((bound <= lowest + 1e-6).all()), (method, float((bound - lowest).max()))


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.01), ("l2", 0.3)])
def test_crown_is_tighter_than_ibp_in_both_norms(mnist: object, norm: str, eps: float) -> None:
    """The released MLP on 50 test images: CROWN's margins are at least IBP's everywhere and
    certify more, in L∞ and in L2 (where the ball enters both at the first layer)."""
    from robustkit.models import load_model

    model, _ = load_model("zoo:mnist_mlp")
    split = mnist.test.take(50)  # type: ignore[attr-defined]
    ibp = margin_bounds(model, split.images, split.labels, eps, "ibp", norm)  # type: ignore[arg-type]
    crown = margin_bounds(model, split.images, split.labels, eps, "crown", norm)  # type: ignore[arg-type]
    assert bool((crown.margins >= ibp.margins - 1e-9).all())
    assert int(crown.certified.sum()) > int(ibp.certified.sum())


# ------------------------------------------------------------- the sweep and its radii


def threshold_net() -> nn.Sequential:
    """z₀ = x − 0.2, z₁ = 0 on one pixel: label 0 is certified at ε exactly while
    max(x − ε, 0) > 0.2, so the radius is x − 0.2 in either norm (when below the sweep's
    top)."""
    layer = nn.Linear(1, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [0.0]]))
        layer.bias.copy_(torch.tensor([-0.2, 0.0]))
    return nn.Sequential(nn.Flatten(), layer)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_certified_radius_is_bisected_within_the_sweeps_bracket(norm: str) -> None:
    """Pixels 0.5, 0.33, 0.9, 0.1 with label 0: true radii 0.3, 0.13, 0.7 and none (the last
    is misclassified). Sweep 0, 0.1, 0.2, 0.4: the radius is bisected to within the tolerance
    below the truth inside its bracket (0.2–0.4, 0.1–0.2), kept at the top of the sweep (0.4
    for 0.9) and NaN for the misclassified pixel; the table reads the radii (a sample counts
    at every ε up to its radius) with Wilson intervals."""
    from robustkit.certify.evaluate import certify_sweep
    from robustkit.data import Split
    from robustkit.evaluation import wilson_interval

    split = Split(torch.tensor([0.5, 0.33, 0.9, 0.1]).view(4, 1, 1, 1), torch.zeros(4).long())
    tolerance = 1e-4
    result = certify_sweep(threshold_net(), split, [0, 0.1, 0.2, 0.4], ["ibp", "crown"],
                           norm=norm, tolerance=tolerance)
    for method in ("ibp", "crown", "best"):
        radius = result.radius(method)
        assert 0.3 - tolerance <= radius[0] < 0.3
        assert 0.13 - tolerance <= radius[1] < 0.13
        assert radius[2] == 0.4 and np.isnan(radius[3])
    table = result.table.set_index(["method", "eps"])
    assert table.loc[("ibp", 0.2), "certified"] == 2  # 0.5 and 0.9 (0.33 stops at 0.13)
    assert table.loc[("ibp", 0.4), "certified"] == 1
    assert table.loc[("best", 0.0), "certified"] == 3
    assert tuple(table.loc[("crown", 0.1), ["ci_low", "ci_high"]]) == wilson_interval(3, 4)
    assert result.certified_at(0.2).tolist() == [True, False, True, False]
    assert list(result.per_sample.columns) == ["index", "label", "clean_pred", "ibp_eps",
                                               "crown_eps", "best_eps"]


def test_the_sweep_agrees_with_direct_bounds_and_takes_the_better_method() -> None:
    """On a random MLP: IBP's bounds are monotone in ε, so its table equals direct
    certification at each ε; the best radius is the larger of the two methods' per sample,
    and its table never falls below either method's; widths grow with ε and CROWN's are the
    smaller."""
    from robustkit.certify import certified_accuracy
    from robustkit.certify.evaluate import certify_sweep
    from robustkit.data import Split

    model = random_nets(7)["mlp"]
    x = torch.rand(40, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 4  # three misclassified samples
    eps = [0.0, 0.005, 0.01, 0.02]
    result = certify_sweep(model, Split(x, y), eps, ["ibp", "crown"], batch_size=16)
    correct = torch.ones(40, dtype=torch.bool)
    correct[:3] = False
    for e in eps[1:]:
        direct = certified_accuracy(model, x, y, e, "ibp") & correct
        assert result.certified_at(e, "ibp").tolist() == direct.tolist()
    best = result.radius("best")
    assert np.array_equal(best, np.fmax(result.radius("ibp"), result.radius("crown")),
                          equal_nan=True)
    assert np.isnan(best[:3]).all()
    count = {(str(m), float(e)): int(c) for m, e, c in
             result.table[["method", "eps", "certified"]].itertuples(index=False)}
    for e in eps:
        assert count["best", e] >= max(count["ibp", e], count["crown", e])
    width = {m: result.table[result.table["method"] == m]["width_mean"].to_numpy(float)
             for m in ("ibp", "crown")}
    assert width["ibp"][0] == 0 and bool((np.diff(width["ibp"]) > 0).all())
    assert bool((width["crown"] <= width["ibp"] + 1e-12).all())


# ------------------------------------------------- the consistency check on the radii


def _per_sample(broken: dict[float, Tensor]) -> pd.DataFrame:
    """An evaluation's per-sample table from PGD's success at each ε: ``pgd_eps``, the
    smallest ε that broke the sample (inf where none did)."""
    smallest = torch.full((len(next(iter(broken.values()))),), math.inf, dtype=torch.float64)
    for e in sorted(broken, reverse=True):
        smallest = torch.where(broken[e], e, smallest)
    return pd.DataFrame({"index": np.arange(len(smallest)), "pgd_eps": smallest.numpy()})


def test_the_radii_pass_the_consistency_check_and_a_broken_bound_fails_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's bisected radii on a random MLP against PGD's smallest breaking ε pass the
    stage's ``certified_not_broken``; with the input box shrunk to the clean point (a bound too
    loose in the wrong direction: it certifies what it has not proven) the same check fails on
    the samples PGD breaks, naming them."""
    from robustkit.certify import bounds
    from robustkit.certify.evaluate import certify_sweep
    from robustkit.data import Split
    from robustkit.stages.certified import check_certified_not_broken

    model = random_nets(3)["mlp"]
    x = torch.rand(64, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = [0.01, 0.05]
    per_sample = _per_sample({e: pgd(model, x, y, eps=e, steps=50,
                                     generator=torch.Generator().manual_seed(0)).success
                              for e in eps})

    def check() -> Any:
        result = certify_sweep(model, Split(x, y), eps, ["ibp", "crown"], batch_size=32)
        return check_certified_not_broken(result.radius(), per_sample)

    sound = check()
    assert sound.status == "pass" and "none of the" in sound.detail
    monkeypatch.setattr(bounds, "input_box", lambda x, eps: (x.double(), x.double()))
    unsound = check()
    broken = int(np.isfinite(per_sample["pgd_eps"]).sum())
    assert broken > 0 and unsound.status == "fail" and unsound.value == float(broken)
    assert f"{broken} sample(s) certified at an ε where an attack broke them" in unsound.detail


# -------------------------------------------------------------------------- the CLI


def test_certify_refuses_an_unsupported_layer_and_a_norm_in_one_line(tmp_path: Path) -> None:
    """A factory network with a Tanh: exit 2 and one line naming the layer, its place and what
    is covered; an L1 ball and a zero tolerance likewise."""
    (tmp_path / "tanhnet.py").write_text(
        "from torch import nn\n\n\ndef net():\n    return nn.Sequential(nn.Flatten(), "
        "nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10))\n")

    def refused(*args: str) -> str:
        done = run("certify", "--eps", "0,0.01", "--n", "4", *args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr.strip()

    assert refused("--model", "tanhnet:net", "--app-dir", str(tmp_path)) == (
        "error: cannot bound the layer Tanh at 2: certification covers Linear, Conv2d, ReLU, "
        "Flatten, BatchNorm (eval), AvgPool2d, MaxPool2d (IBP only), Identity, Dropout, and "
        "--normalize; write the network as an nn.Sequential of those")
    assert refused("--model", "zoo:mnist_mlp", "--norm", "l1") == (
        "error: --norm 'l1': certification covers linf, l2")
    assert refused("--model", "zoo:mnist_mlp", "--tolerance", "0").startswith(
        "error: --tolerance 0: give a positive width")
