"""One contract over every declared attack (#34, after adversarial-library's test_attacks.py):
inside the ball and the box, success as the engine re-judges it, ε = 0 returns x, the model's
modes and ``requires_grad`` restored, and ``grad_evals``/``queries`` equal to what hooks count.
Then a test-only attack, declared from here, goes through the config, the CLI, the sweep and
the checks with no other file changed."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from robustkit.attack_specs import SPECS, AttackSpec, register_spec
from robustkit.attacks import AttackResult, attack_mode, registry
from robustkit.attacks.registry import RUNNERS, Draws, Runner, Settings, register_runner
from robustkit.config import AttackConfig, config_from_dict
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Norm

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parent.parent
EPS = 0.1


class Counting(nn.Module):
    """A small CNN on 1×12×12 images that counts, per sample, the input gradients computed
    through it and the forward passes made without one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 10 * 10, 5))
        self.gradient_rows = 0
        self.plain_rows = 0

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            x.register_hook(lambda g: self._count(len(g)))
        else:
            self.plain_rows += len(x)
        logits: Tensor = self.net(x)
        return logits

    def _count(self, rows: int) -> None:
        self.gradient_rows += rows


#: The L1 and L2 budgets of the contract (pixel units, on 144-value images).
EPS_L1 = 2.0
EPS_L2 = 1.0


def settings(name: str, norm: Norm = "linf") -> AttackConfig:
    """Each attack at a small budget."""
    spec = SPECS[name]
    small: dict[str, object] = {"steps": 5} if "steps" in spec.options else {}
    if "queries" in spec.options:
        small["queries"] = 20
    if "targets" in spec.options:
        small["targets"] = 2
    return AttackConfig(name=name, norm=norm, **small)  # type: ignore[arg-type]


def outside_ball(delta: Tensor, norm: Norm) -> str | None:
    """What is wrong when ``delta`` leaves the contract's ball in ``norm``."""
    if norm == "l1":
        size = delta.flatten(1).abs().sum(1)
        if bool((size > EPS_L1 * (1 + 1e-6)).any()):
            return f"outside the ball: max ‖δ‖₁ {float(size.max()):.4f} > ε = {EPS_L1}"
        return None
    if norm == "l2":
        length = delta.flatten(1).norm(dim=1)
        if bool((length > EPS_L2 * (1 + 1e-6)).any()):
            return f"outside the ball: max ‖δ‖₂ {float(length.max()):.4f} > ε = {EPS_L2}"
        return None
    size = delta.abs().amax(dim=(1, 2, 3))
    if bool((size > EPS + 1e-6).any()):
        return f"outside the ball: max |δ| {float(size.max()):.4f} > ε = {EPS}"
    return None


def contract_problems(name: str, runner: Runner, norm: Norm = "linf") -> list[str]:
    """How ``runner`` breaks the attack contract on a batch of 16 (empty when it keeps it)."""
    model = Counting()
    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    model.plain_rows = 0
    model.train()
    config = settings(name, norm)
    eps = {"l1": EPS_L1, "l2": EPS_L2}.get(norm, EPS)
    draws = Draws(starts=torch.Generator().manual_seed(2))
    result: AttackResult = runner(model, config, x, y, eps, draws, None, True)
    problems = []
    leak = outside_ball(result.x_adv - x, norm)
    if leak:
        problems.append(leak)
    if bool((result.x_adv < 0).any() or (result.x_adv > 1).any()):
        problems.append("outside the box [0, 1]")
    if not model.training or not all(p.requires_grad for p in model.parameters()):
        problems.append("the model's mode or requires_grad was not restored")
    if result.grad_evals != model.gradient_rows:
        problems.append(f"grad_evals {result.grad_evals} but hooks counted "
                        f"{model.gradient_rows} input gradients")
    if SPECS[name].family == "gradient-free" and result.queries != model.plain_rows - len(x):
        problems.append(f"queries {result.queries} but hooks counted "
                        f"{model.plain_rows - len(x)} forward passes after the clean one")
    with torch.no_grad(), attack_mode(model):
        judged = model(result.x_adv).argmax(1) != y
    if not torch.equal(judged, result.success):
        problems.append("success differs from the verdict on the returned examples")
    zero = runner(model, config, x, y, 0.0, draws, None, True)
    if not torch.equal(zero.x_adv, x):
        problems.append("ε = 0 did not return x")
    return problems


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_declared_attack_keeps_the_contract(name: str) -> None:
    runner, _ = RUNNERS[name]
    assert contract_problems(name, runner) == []


@pytest.mark.parametrize("name", sorted(n for n, spec in SPECS.items() if "l1" in spec.norms))
def test_every_l1_attack_keeps_the_contract_in_l1(name: str) -> None:
    """The same contract in the L1 ball ∩ box (#37): APGD, APGD-T and the ensemble."""
    runner, _ = RUNNERS[name]
    assert contract_problems(name, runner, "l1") == []


@pytest.mark.parametrize("name", sorted(n for n, spec in SPECS.items() if "l2" in spec.norms))
def test_every_l2_attack_keeps_the_contract_in_l2(name: str) -> None:
    runner, _ = RUNNERS[name]
    assert contract_problems(name, runner, "l2") == []


def test_fab_breaks_samples_in_every_norm_of_the_contract() -> None:
    """FAB-T breaks samples of the contract's batch in each norm (so the checks above see its
    adversarial points), and a FAB-T that counted one gradient per run instead of one per
    step would be caught."""
    from robustkit.attacks.fab import fab_targeted

    runner, _ = RUNNERS["fab-t"]
    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    for norm, eps in (("linf", EPS), ("l2", EPS_L2), ("l1", EPS_L1)):
        model = Counting()
        y = model(x).argmax(1).detach()
        result = fab_targeted(model, x, y, eps=eps, norm=norm,  # type: ignore[arg-type]
                              steps=5, targets=2)
        assert int(result.success.sum()) > 0, norm

    def undercounting(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float,
                      draws: Draws, labels: Tensor | None, early_stop: bool) -> AttackResult:
        result = runner(model, s, x, y, eps, draws, labels, early_stop)
        return dataclasses.replace(result, grad_evals=result.grad_evals // s.steps)

    assert any(p.startswith("grad_evals") for p in contract_problems("fab-t", undercounting))


def test_the_l1_contract_catches_a_leak() -> None:
    apgd_runner, _ = RUNNERS["apgd"]

    def leaky(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float, draws: Draws,
              labels: Tensor | None, early_stop: bool) -> AttackResult:
        return apgd_runner(model, s, x, y, 3 * eps, draws, labels, early_stop)

    assert any("outside the ball" in p for p in contract_problems("apgd", leaky, "l1"))
    x = torch.rand(4, 1, 12, 12)
    model = Counting()
    register_runner("leaky-apgd", leaky, lambda s: 7)
    register_spec(dataclasses.replace(SPECS["apgd"], name="leaky-apgd"))
    try:
        result = registry.run(model, AttackConfig(name="leaky-apgd", norm="l1", steps=5), x,
                              model(x).argmax(1).detach(), EPS_L1, Draws())
    finally:
        del SPECS["leaky-apgd"], RUNNERS["leaky-apgd"]
    assert float((result.x_adv - x).flatten(1).abs().sum(1).max()) <= EPS_L1 * (1 + 1e-6)


def test_the_contract_catches_a_planted_leak_and_a_miscount() -> None:
    pgd_runner, _ = RUNNERS["pgd"]

    def leaky(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float, draws: Draws,
              labels: Tensor | None, early_stop: bool) -> AttackResult:
        result = pgd_runner(model, s, x, y, 2 * eps, draws, labels, early_stop)
        return result  # steps up to 2ε: outside the ball

    def miscounting(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float,
                    draws: Draws, labels: Tensor | None, early_stop: bool) -> AttackResult:
        result = pgd_runner(model, s, x, y, eps, draws, labels, early_stop)
        return dataclasses.replace(result, grad_evals=result.grad_evals // 2)

    assert any("outside the ball" in p for p in contract_problems("pgd", leaky))
    assert any(p.startswith("grad_evals") for p in contract_problems("pgd", miscounting))
    # the framework holds a leaky attack to the ball before any verdict
    x = torch.rand(4, 1, 12, 12)
    model = Counting()
    register_runner("leaky-pgd", leaky, lambda s: 7)
    register_spec(dataclasses.replace(SPECS["pgd"], name="leaky-pgd"))
    try:
        result = registry.run(model, AttackConfig(name="leaky-pgd", steps=5), x,
                              model(x).argmax(1).detach(), EPS, Draws())
    finally:
        del SPECS["leaky-pgd"], RUNNERS["leaky-pgd"]
    assert float((result.x_adv - x).abs().max()) <= EPS + 1e-7


# ------------------------------------------------------- a new attack through every door


def _uniform_sign(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float,
                  draws: Draws, labels: Tensor | None, early_stop: bool) -> AttackResult:
    """A test-only attack: one query at a random corner of the L∞ ball, ``x + ε·sign(u)``,
    kept where it breaks the sample (else the clean point)."""
    generator = draws.starts or torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(x.shape, generator=generator) < 0.5, -1.0, 1.0)
    corner = (x + eps * signs.to(x)).clamp(0, 1)
    with torch.no_grad(), attack_mode(model):
        clean_wrong = model(x).argmax(1) != y
        success = clean_wrong | (model(corner).argmax(1) != y)
    keep = (success & ~clean_wrong).view(-1, 1, 1, 1)
    return AttackResult(x_adv=torch.where(keep, corner, x), success=success, grad_evals=0,
                        queries=len(x))


@pytest.fixture
def corner_attack() -> Iterator[str]:
    register_spec(AttackSpec("corner", "gradient-free", "a random corner of the ball", None,
                             frozenset(), searches_freely=False))
    register_runner("corner", _uniform_sign, lambda s: 2)
    yield "corner"
    del SPECS["corner"], RUNNERS["corner"]


def test_a_declared_attack_goes_through_every_door(corner_attack: str, tmp_path: Path,
                                                   mnist_root: Path) -> None:
    from tests.conftest import cli

    config = config_from_dict({"attacks": [{"name": corner_attack}]})
    assert config.attacks[0].title == "corner5000"  # a gradient-free recipe's title
    with pytest.raises(RobustkitError, match=r"steps is not a setting of corner"):
        config_from_dict({"attacks": [{"name": corner_attack, "steps": 5}]})
    assert contract_problems(corner_attack, _uniform_sign) == []
    out = tmp_path / "out"
    result = cli("attack", "--model", "zoo:mnist_softmax", "--attack", f"fgsm,{corner_attack}",
                 "--eps", "0,0.1", "--n", "40", "-q", "--out", str(out))
    assert result.returncode == 0, result.stderr
    import pandas as pd

    results = pd.read_csv(out / "results.csv")
    assert set(results["attack"]) == {"fgsm", "corner5000", "any"}
    checks = pd.read_csv(out / "checks.csv")
    assert len(checks) == 11


def test_no_module_outside_the_tables_compares_attack_names() -> None:
    """Attack kinds are read from the spec table, never from comparing names (#34)."""
    names = "|".join(re.escape(n) for n in SPECS)
    quoted = rf"""["']({names})["']"""
    compare = re.compile(rf"(==|!=|\bin)\s*\(?{quoted}|{quoted}\s*(==|!=|\bin\b)"
                         rf"|\(\s*{quoted}\s*,")
    offenders = []
    for path in sorted((REPO / "robustkit").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith("robustkit/attacks/") or relative == "robustkit/attack_specs.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if compare.search(line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert offenders == []
