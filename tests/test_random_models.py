"""Issue #33 items 3 and 6: a random model is recognised as random (not as batch statistics) and
evaluated with EOT by the sweep and the checks alike; the gradient-free check runs at every ε
where the gradient attacks leave samples robust, so masking confined to a small ε is caught."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from robustkit.checks import check_batch_independent, check_gradient_free_finds_no_more, run_checks
from robustkit.config import AttackConfig
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.evaluation import evaluate
from robustkit.models.defences import Defended, GaussianNoise
from robustkit.models.loading import check_logits
from robustkit.models.randomness import batch_effect, output_spread
from tests.conftest import run
from tests.test_autoattack import synthetic_split
from tests.test_checks import BatchStatistics, linear_model, settings_for, template_data

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parent.parent
PGD_AT_MLP = REPO / "reports" / "mnist_mlp_pgd_at" / "model.safetensors"


@pytest.fixture(scope="module")
def data() -> tuple[Split, Tensor]:
    return template_data()


def noisy(inner: nn.Module, sigma: float = 0.25) -> Defended:
    """``f(clamp(x + σ·n))`` with fresh noise in every pass (the issue's defence)."""
    return Defended(inner, GaussianNoise(sigma)).eval()


class OwnGenerator(nn.Module):
    """Noise from a generator the model keeps: seeding torch's generators does not repeat it,
    so only averaging over passes can hold it fixed."""

    def __init__(self, inner: nn.Module, sigma: float = 0.25) -> None:
        super().__init__()
        self.inner, self.sigma = inner, sigma
        self.generator = torch.Generator().manual_seed(1)

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.generator)
        logits: Tensor = self.inner((x + self.sigma * noise).clamp(0, 1))
        return logits


# --------------------------------------------------------------------------- random or batch


def test_randomness_is_told_apart_from_batch_statistics(data: tuple[Split, Tensor]) -> None:
    """Two passes over the same batch differ for a random model, not for batch statistics;
    with the randomness held fixed (the same draws, else means over passes) only batch
    statistics change the shared images' logits."""
    split, templates = data
    x = split.images[:40]
    sound = linear_model(templates)
    assert output_spread(noisy(sound), x).random
    assert not output_spread(BatchStatistics(sound), x).random

    random = batch_effect(noisy(sound), x, 10)
    assert random.comparison == "same draws" and not random.dependent
    assert random.difference == 0.0  # the same draws at the same positions: exact
    statistics = batch_effect(BatchStatistics(sound), x, 10)
    assert statistics.comparison == "one pass" and statistics.dependent
    both = batch_effect(noisy(BatchStatistics(sound)), x, 10)  # random *and* batch statistics
    assert both.comparison == "same draws" and both.dependent

    own = batch_effect(OwnGenerator(sound), x, 10)
    assert own.comparison == "averaged" and not own.dependent, own
    # averaging sees a batch effect that stands out of the noise's standard error over the
    # passes (here the noise is smaller than the batch statistics' shift)
    own_statistics = batch_effect(OwnGenerator(BatchStatistics(sound), 0.05), x, 10)
    assert own_statistics.comparison == "averaged" and own_statistics.dependent, own_statistics


def test_a_random_model_loads_and_batch_statistics_are_still_refused(
        data: tuple[Split, Tensor]) -> None:
    split, templates = data
    sound = linear_model(templates)
    for random in (noisy(sound), OwnGenerator(sound)):
        check_logits(random, split.images[:8], 10)  # not refused: random, not batch statistics
    with pytest.raises(RobustkitError, match="normalises with batch statistics"):
        check_logits(noisy(BatchStatistics(sound)), split.images[:8], 10)
    check = check_batch_independent(noisy(sound), split.images[:40])
    assert check.status == "pass" and "with the same random draws" in check.detail
    assert check_batch_independent(noisy(BatchStatistics(sound)),
                                   split.images[:40]).status == "fail"


# --------------------------------------------------------------------------- the checks


def quick_checks(model: nn.Module, split: Split, attacks: list[AttackConfig],
                 eps: list[float], n: int = 60) -> pd.DataFrame:
    evaluation = evaluate(model, split, attacks, eps, seed=0)
    return run_checks(model, split, evaluation.results, settings_for(*attacks, eps=eps), n=n,
                      level="quick", per_sample=evaluation.per_sample).set_index("name")


def test_checks_of_a_random_model_attacked_with_eot_state_it_and_use_eot(
        data: tuple[Split, Tensor]) -> None:
    """The issue's symptom: forward_deterministic failed by construction although the
    evaluation used EOT, batch_independent took the noise for batch statistics, and the
    convergence check ran APGD without EOT. Now: a clean verdict naming the randomness, and the
    checks' own attacks carry the evaluation's EOT."""
    split, templates = data
    model = noisy(linear_model(templates), 0.1)
    eps = [0.0, 0.1, 0.2, 0.3]
    frame = quick_checks(model, split, [AttackConfig(name="apgd", steps=10, eot_samples=4)], eps)
    assert set(frame["status"]) == {"pass"}, frame[["status", "detail"]].to_string()
    detail = frame["detail"]
    assert detail["forward_deterministic"].startswith("the model is random")
    assert "apgd10-eot4: K = 4" in detail["forward_deterministic"]
    assert "batch statistics" not in " ".join(detail)
    assert "apgd10-eot4 from scratch" in detail["accuracy_monotone_in_eps"]  # EOT, not plain
    assert "apgd10-eot4" in detail["attack_converged"]
    assert "judged by 4 fresh passes" in detail["gradient_free_finds_no_more"]

    # the same model attacked without EOT: the determinism check still fails, with the advice
    plain = quick_checks(model, split, [AttackConfig(name="apgd", steps=10)], [0.0, 0.001])
    assert plain.loc["forward_deterministic", "status"] == "fail"
    assert "--eot-samples K" in str(plain.loc["forward_deterministic", "detail"])


def test_a_random_model_with_gradient_attacks_left_without_eot_warns(
        data: tuple[Split, Tensor]) -> None:
    split, templates = data
    model = noisy(linear_model(templates), 0.1)
    attacks = [AttackConfig(name="apgd", steps=5, eot_samples=2), AttackConfig(name="fgsm")]
    evaluation = evaluate(model, split, attacks[:1], [0.0, 0.02])  # FGSM would fail re-judging
    frame = run_checks(model, split, evaluation.results, settings_for(*attacks, eps=[0.0, 0.02]),
                       n=40, level="quick", per_sample=evaluation.per_sample).set_index("name")
    assert frame.loc["forward_deterministic", "status"] == "warn"
    assert "fgsm ran on one draw per step" in str(frame.loc["forward_deterministic", "detail"])


# --------------------------------------------------------------------------- the command line


def test_noise_defence_with_eot_runs_the_default_preset_with_a_clean_verdict(
        tmp_path: Path, mnist_root: Path) -> None:
    """``--defence noise:0.25`` in front of the PGD-AT MLP with the default preset: it exited 2
    after FGSM; with ``--eot-samples`` it runs AutoAttack's version for randomised models and
    the checks name the model random."""
    out = tmp_path / "noise"
    result = run("attack", "--model", str(PGD_AT_MLP), "--defence", "noise:0.25",
                 "--eot-samples", "4", "--steps", "10", "--eps", "0,0.1", "--n", "30", "-q",
                 "--out", str(out), "--data-dir", str(mnist_root))
    assert result.returncode == 0, result.stderr
    assert ("in the standard preset, fgsm, which takes no EOT, is left out; autoattack runs as "
            "AutoAttack runs randomised models") in result.stderr
    results = pd.read_csv(out / "results.csv")
    assert set(results["attack"]) == {"apgd10-eot4", "apgd10-dlr-eot4", "any"}
    checks = pd.read_csv(out / "checks.csv").set_index("name")
    # no check fails and none misreads the randomness; on 30 samples of a random model one
    # sample more broken by the convergence check's APGD-20 (3.3%) may warn, which is its job
    not_passed = checks[checks["status"] != "pass"]
    assert set(not_passed["status"]) <= {"warn"}, checks[["status", "detail"]].to_string()
    assert set(not_passed.index) <= {"attack_converged"}, checks[["status", "detail"]].to_string()
    assert str(checks.loc["forward_deterministic", "detail"]).startswith("the model is random")
    assert "(unreliable)" not in result.stdout and "batch statistics" not in result.stdout


@pytest.mark.slow
def test_a_random_torchscript_model_is_not_refused_as_batch_statistics(
        tmp_path: Path, mnist_root: Path) -> None:
    """The same noise inside a TorchScript file: it was refused at load as "normalises with
    batch statistics"; now it loads, is attacked with EOT and named random by the checks."""
    from robustkit.models.loading import load_model

    net, _ = load_model(str(PGD_AT_MLP), device=torch.device("cpu"))
    scripted = torch.jit.script(noisy(net.eval()))
    file = tmp_path / "noisy.pt"
    scripted.save(str(file))
    out = tmp_path / "ts"
    result = run("attack", "--model", str(file), "--trust-model-file", "--eot-samples", "4",
                 "--attack", "apgd", "--steps", "10", "--eps", "0,0.1", "--n", "30", "-q",
                 "--out", str(out), "--data-dir", str(mnist_root))
    assert result.returncode == 0, result.stderr
    checks = pd.read_csv(out / "checks.csv").set_index("name")
    # no check fails and none misreads the randomness; on 30 samples of a random model one
    # sample more broken by the convergence check's APGD-20 (3.3%) may warn, which is its job
    not_passed = checks[checks["status"] != "pass"]
    assert set(not_passed["status"]) <= {"warn"}, checks[["status", "detail"]].to_string()
    assert set(not_passed.index) <= {"attack_converged"}, checks[["status", "detail"]].to_string()
    assert str(checks.loc["forward_deterministic", "detail"]).startswith("the model is random")


# --------------------------------------------------------------------------- masking at small ε


class MaskedNearData(nn.Module):
    """A decoy whose gradient is masked only for perturbations smaller than ``radius``: within
    ``radius`` (L∞) of one of the images it was given, its logits are the sound model's but
    their gradient is a small random linear term's (no information); farther away the sound
    model's own gradient. Its predictions are the sound model's everywhere, so the sound
    model's adversarial examples at a small ε exist, but gradient attacks see them only once
    their start lies beyond ``radius``."""

    def __init__(self, inner: nn.Module, images: Tensor, radius: float) -> None:
        super().__init__()
        self.inner, self.radius = inner, radius
        self.images: Tensor
        self.register_buffer("images", images.flatten(1).clone())
        self.a: Tensor
        self.register_buffer("a", torch.randn(10, images[0].numel(),
                                              generator=torch.Generator().manual_seed(0)))

    def forward(self, x: Tensor) -> Tensor:
        sound: Tensor = self.inner(x)
        flat = x.flatten(1)
        near = torch.cdist(flat.detach(), self.images, p=float("inf")).amin(1) < self.radius
        decoy = 1e-4 * (flat @ self.a.T)
        masked = sound.detach() + decoy - decoy.detach()
        return torch.where(near.unsqueeze(1), masked, sound)


def test_masking_confined_to_a_small_eps_is_caught() -> None:
    """Gradient attacks see nothing at ε = 0.05 (below the mask's radius 0.06) but break the
    decoy as readily as the sound model at ε = 0.07. The single-ε check ran at the ε where
    accuracy is nearest half the clean accuracy (0.07) and missed it; run at every ε where
    samples stay robust it catches it (Square breaks at ε = 0.05 what APGD left)."""
    sound, split = synthetic_split(100, seed=4)
    decoy = MaskedNearData(sound, split.images, radius=0.06).eval()
    eps = [0.0, 0.05, 0.07]
    attack = AttackConfig(name="apgd")
    evaluation = evaluate(decoy, split, [attack], eps)
    accuracy = evaluation.results.set_index("eps")["accuracy"]
    assert accuracy[0.05] >= accuracy[0.0] - 0.02  # the masking works at the small ε
    assert 0 < accuracy[0.07] < 0.2  # and not beyond the mask's radius
    frame = run_checks(decoy, split, evaluation.results, settings_for(attack, eps=eps), n=100,
                       level="quick", per_sample=evaluation.per_sample).set_index("name")
    check = frame.loc["gradient_free_finds_no_more"]
    assert check["status"] == "fail", str(check["detail"])
    assert "at ε=0.05" in str(check["detail"])

    # what the one-ε check saw: at the middle ε the gradient attack is sound
    x, y = split.images[:50], split.labels[:50]
    middle = check_gradient_free_finds_no_more(decoy, x, y, attack, 0.07, budget=200)
    assert middle.status == "pass", middle.detail
