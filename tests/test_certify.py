"""Certified bounds (#35): closed forms on a hand-built net, containment of sampled points and
of attacks' examples, CROWN at least as tight as IBP, BatchNorm with a negative scale, the
normalisation wrapper, unsupported layers, and no certified sample broken by an attack."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks import pgd
from robustkit.certify import METHODS, margin_bounds
from robustkit.errors import RobustkitError
from robustkit.models.zoo import Normalized

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
    import os
    import subprocess
    import sys
    from pathlib import Path

    from robustkit.config import AttackConfig
    from robustkit.evaluation import evaluate
    from robustkit.models import load_model
    from robustkit.sources import load_data

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-m", "robustkit", "certify", "--model",
                           "zoo:mnist_mlp", "--eps", "0,0.01,0.02", "--n", "100", "--json"],
                          capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    model, _ = load_model("zoo:mnist_mlp")
    split = load_data(None, val_size=0, parts=("test",)).test.take(100)
    attacked = evaluate(model, split, [AttackConfig(name="pgd", steps=40)], [0.0, 0.01, 0.02])
    accuracy = dict(zip(attacked.results["eps"], attacked.results["accuracy"], strict=True))
    for row in rows:
        assert row["accuracy"] <= accuracy[row["eps"]] + 1e-12, row
    assert {r["accuracy"] for r in rows if r["eps"] == 0} == {accuracy[0.0]}
    refused = subprocess.run([sys.executable, "-m", "robustkit", "certify", "--model",
                              "zoo:mnist_cnn", "--eps", "0.01", "--n", "5", "--method",
                              "crown"], capture_output=True, text=True, env=env, cwd=repo,
                             timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("error: CROWN does not cover MaxPool2d: use the IBP bound "
                                      "for this model (--method ibp), or pool with AvgPool2d "
                                      "or a strided convolution")
