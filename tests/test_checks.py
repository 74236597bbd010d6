"""Tests for robustkit.checks: each check flags the failure it is for and passes a sound setup."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks import steepest_step
from robustkit.checks import (
    CHECK_COLUMNS,
    Check,
    check_accuracy_at_large_eps,
    check_accuracy_monotone_in_eps,
    check_accuracy_monotone_in_eps_from_scratch,
    check_attack_converged,
    check_batch_independent,
    check_forward_deterministic,
    check_input_gradients_usable,
    check_iterative_beats_single_step,
    check_noise_weaker_than_attack,
    check_outputs_are_logits,
    check_pgd_step_budget,
    checks_from_results,
    main_attack,
    run_checks,
)
from robustkit.config import AttackConfig, to_dict
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.evaluation import evaluate, wilson_interval
from robustkit.models.loading import check_logits as load_check_logits
from tests.test_attacks import saturated_pair

EPS = [0.0, 0.1, 0.2, 0.3]


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only contend


def results_frame(
    curves: dict[str, list[float]], n: int = 500, eps: list[float] = EPS, norm: str = "linf"
) -> pd.DataFrame:
    rows = []
    for attack, accuracies in curves.items():
        for e, acc in zip(eps, accuracies, strict=True):
            correct = round(acc * n)
            low, high = wilson_interval(correct, n)
            rows.append(
                {
                    "model": "m",
                    "attack": attack,
                    "norm": norm,
                    "eps": e,
                    "n": n,
                    "correct": correct,
                    "accuracy": correct / n,
                    "ci_low": low,
                    "ci_high": high,
                    "grad_evals": 0,
                }
            )
    return pd.DataFrame(rows)


def settings_for(*attacks: AttackConfig, eps: list[float] = EPS) -> dict[str, Any]:
    return {"eps": eps, "attacks": [to_dict(a) for a in attacks], "n": 500}


FGSM, PGD = AttackConfig(name="fgsm"), AttackConfig(name="pgd", steps=10)


# --------------------------------------------------------------------------- from results


def test_monotone_passes_falling_accuracy_and_flags_a_rise() -> None:
    falling = results_frame({"fgsm": [0.98, 0.6, 0.3, 0.1]})
    assert check_accuracy_monotone_in_eps(falling).status == "pass"
    rising = results_frame({"fgsm": [0.98, 0.6, 0.7, 0.1]})
    check = check_accuracy_monotone_in_eps(rising)
    assert check.status == "fail"
    assert check.value == pytest.approx(0.1)
    assert check.measurements == pytest.approx({"rise": 0.1, "eps_before": 0.1, "eps_after": 0.2,
                                                "accuracy_before": 0.6, "accuracy_after": 0.7})
    small = results_frame({"fgsm": [0.98, 0.6, 0.604, 0.1]})
    assert check_accuracy_monotone_in_eps(small).status == "warn"


def test_fgsm_stronger_than_pgd_is_flagged() -> None:
    settings = settings_for(FGSM, PGD)
    good = results_frame({"fgsm": [0.98, 0.6, 0.3, 0.1], "pgd10": [0.98, 0.5, 0.1, 0.0]})
    assert check_iterative_beats_single_step(good, settings).status == "pass"
    bad = results_frame({"fgsm": [0.98, 0.6, 0.3, 0.1], "pgd10": [0.98, 0.7, 0.5, 0.4]})
    check = check_iterative_beats_single_step(bad, settings)
    assert check.status == "fail"
    assert check.value == pytest.approx(0.3)
    assert "pgd10" in check.detail and "fgsm" in check.detail
    assert check.measurements == pytest.approx({"gap": 0.3, "eps": 0.3, "iterative_accuracy": 0.4,
                                                "single_step_accuracy": 0.1})


def test_apgd_counts_as_iterative_and_is_the_checked_attack_when_strongest() -> None:
    apgd = AttackConfig(name="apgd", steps=10)
    settings = settings_for(FGSM, PGD, apgd)
    frame = results_frame({"fgsm": [0.98, 0.6, 0.3, 0.1], "pgd10": [0.98, 0.5, 0.1, 0.0],
                           "apgd10": [0.98, 0.7, 0.4, 0.2]})
    check = check_iterative_beats_single_step(frame, settings)
    assert check.status == "fail" and "apgd10" in check.detail
    assert main_attack(frame, settings).name == "pgd"
    stronger = results_frame({"fgsm": [0.98, 0.6, 0.3, 0.1], "pgd10": [0.98, 0.5, 0.1, 0.0],
                              "apgd10": [0.98, 0.4, 0.05, 0.0]})
    assert main_attack(stronger, settings) == apgd


def test_iterative_check_ignores_pairs_of_different_norms() -> None:
    l2 = AttackConfig(name="pgd", norm="l2", steps=10)
    frame = pd.concat(
        [
            results_frame({"fgsm": [0.98, 0.6, 0.3, 0.1]}),
            results_frame({"pgd10-l2": [0.98, 0.9, 0.8, 0.7]}, norm="l2"),
        ]
    )
    check = check_iterative_beats_single_step(frame, settings_for(FGSM, l2))
    assert check.status == "pass" and check.value is None


def test_step_budget_flags_steps_that_cannot_reach_eps() -> None:
    assert check_pgd_step_budget(settings_for(PGD)).status == "pass"
    short = AttackConfig(name="pgd", steps=10, step_size=0.01)
    check = check_pgd_step_budget(settings_for(short))
    assert check.status == "fail"
    assert check.value == pytest.approx(0.1 / 0.3)
    long_enough = AttackConfig(name="pgd", steps=40, step_size=0.01)
    assert check_pgd_step_budget(settings_for(long_enough)).status == "pass"


def test_checks_from_results_frame() -> None:
    frame = checks_from_results(results_frame({"fgsm": [0.98, 0.6, 0.3, 0.1]}), settings_for(FGSM))
    assert list(frame.columns) == CHECK_COLUMNS
    assert set(frame["status"]) == {"pass"}
    assert len(frame) == 3


def test_check_rejects_unknown_status() -> None:
    with pytest.raises(ValueError, match="status"):
        Check("x", "ok", None, "", "")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- with a model


def template_data(n: int = 200, seed: int = 0) -> tuple[Split, Tensor]:
    """Ten random binary stroke patterns, and noisy copies of them as labelled images."""
    generator = torch.Generator().manual_seed(seed)
    templates = (torch.rand(10, 1, 28, 28, generator=generator) < 0.25).float()
    labels = torch.arange(n) % 10
    noise = 0.1 * torch.rand(n, 1, 28, 28, generator=generator)
    images = (0.3 + 0.35 * templates[labels] + noise).clamp(0, 1)  # low contrast: breakable
    return Split(images, labels), templates


def linear_model(templates: Tensor, scale: float = 0.05) -> nn.Sequential:
    """Logits z_c = scale · (t_c − mean t) · x: a sound, smooth classifier of template_data."""
    flat = templates.flatten(1)
    layer = nn.Linear(flat.shape[1], 10)
    with torch.no_grad():
        layer.weight.copy_(scale * (flat - flat.mean(0)))
        layer.bias.zero_()
    return nn.Sequential(nn.Flatten(), layer)


class Rounding(nn.Module):
    """Quantises its input first: the gradient through torch.round is zero everywhere."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.inner(torch.round(x * 4) / 4)
        return logits


class SaturatedLogSoftmax(nn.Module):
    """log(softmax(T·z)) with a huge temperature: probabilities saturate to 0/1."""

    def __init__(self, inner: nn.Module, temperature: float = 1e4) -> None:
        super().__init__()
        self.inner, self.temperature = inner, temperature

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(torch.softmax(self.temperature * self.inner(x), dim=1))


class EvalDropout(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.inner(nn.functional.dropout(x, 0.5, training=True))
        return logits


@pytest.fixture(scope="module")
def data() -> tuple[Split, Tensor]:
    return template_data()


def test_probability_outputs_are_flagged(data: tuple[Split, Tensor]) -> None:
    split, templates = data
    probs = nn.Sequential(linear_model(templates), nn.Softmax(dim=1))
    check = check_outputs_are_logits(probs, split.images[:50])
    assert check.status == "fail"
    assert "probabilities" in check.detail
    assert check_outputs_are_logits(linear_model(templates), split.images[:50]).status == "pass"
    log_probs = nn.Sequential(linear_model(templates), nn.LogSoftmax(dim=1))
    passed = check_outputs_are_logits(log_probs, split.images[:50])
    assert passed.status == "pass" and "log-probabilities" in passed.detail


def test_rounding_model_masks_gradients(data: tuple[Split, Tensor]) -> None:
    split, templates = data
    masked = Rounding(linear_model(templates))
    check = check_input_gradients_usable(masked, split.images, split.labels)
    assert check.status == "fail"
    assert check.value == 1.0
    large = check_accuracy_at_large_eps(masked, split.images, split.labels, AttackConfig(steps=10))
    assert large.status != "pass"
    sound = check_input_gradients_usable(linear_model(templates), split.images, split.labels)
    assert sound.status == "pass"


def test_saturated_softmax_masks_gradients(data: tuple[Split, Tensor]) -> None:
    split, templates = data
    check = check_input_gradients_usable(
        SaturatedLogSoftmax(linear_model(templates)), split.images, split.labels
    )
    assert check.status in {"warn", "fail"}
    assert check.value is not None and check.value > 0.01


def test_gradient_check_counts_exactly_the_rows_whose_attack_step_vanishes() -> None:
    """Margins 60 (gradient ~9e-25, its float32 norm underflows), 10 (ordinary) and 300 (the
    gradient is exactly 0): a row is zero for the check iff the attacks' L2 step is 0."""
    model, x, y = saturated_pair([60.0, 10.0, 300.0])
    x_in = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x_in), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_in)
    vanishing = int((steepest_step(grad, "l2").flatten(1) == 0).all(1).sum())
    assert vanishing == 1  # only the exactly-zero gradient
    check = check_input_gradients_usable(model, x, y)
    assert check.measurements == {"zero_gradients": vanishing, "non_finite_gradients": 0,
                                  "samples": 3}
    assert check.value == pytest.approx(1 / 3)
    assert check_input_gradients_usable(model, x[:2], y[:2]).status == "pass"


class NoiseGate(nn.Module):
    """A "detector" defence on 8×8 images: z₁ − z₀ = 100·(mean x − 0.53) while the pixels are
    quiet (std < 0.1), a constant −1 (class 0, no gradient) once they are noisy. PGD breaks a
    grey 0.5 image at ε = 0.05; at ε = 0.3 its random start is noisy and it is stuck."""

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        linear = 100 * (flat.mean(1) - 0.53)
        diff = torch.where(flat.std(1) < 0.1, linear, torch.full_like(linear, -1.0))
        return torch.stack([torch.zeros_like(diff), diff], dim=1)


def test_monotone_check_re_attacks_from_scratch_and_can_fail_with_shortcuts_on() -> None:
    model, eps = NoiseGate(), [0.0, 0.05, 0.3]
    split = Split(torch.full((20, 1, 8, 8), 0.5), torch.zeros(20, dtype=torch.long))
    attack = AttackConfig(name="pgd", steps=10)
    evaluation = evaluate(model, split, [attack], eps)
    assert evaluation.results["accuracy"].tolist() == [1.0, 0.0, 0.0]  # reuse hides the stall
    assert check_accuracy_monotone_in_eps(evaluation.results).status == "pass"
    scratch = check_accuracy_monotone_in_eps_from_scratch(
        model, split.images, split.labels, attack, eps)
    assert scratch.status == "fail" and scratch.value == 1.0
    assert scratch.measurements == {"rise": 1.0, "eps_before": 0.05, "eps_after": 0.3,
                                    "accuracy_before": 0.0, "accuracy_after": 1.0}
    frame = run_checks(model, split, evaluation.results, settings_for(attack, eps=eps), n=20)
    row = frame.set_index("name").loc["accuracy_monotone_in_eps"]
    assert row["status"] == "fail" and "from scratch" in row["detail"]
    sound = check_accuracy_monotone_in_eps_from_scratch(
        model, split.images, split.labels, attack, [0.0, 0.03, 0.05])
    assert sound.status == "pass" and "from scratch at each ε on 20 samples" in sound.detail


class BatchStatistics(nn.Module):
    """BatchNorm that always normalises with the batch's statistics, as a torch.export program
    saved in train mode does (eval() cannot switch it)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        z = self.inner(x)
        return z if len(z) == 1 else nn.functional.batch_norm(z, None, None, training=True)


def test_batch_dependent_outputs_fail_the_check_and_are_refused_at_load(
        data: tuple[Split, Tensor]) -> None:
    split, templates = data
    model = BatchStatistics(linear_model(templates))
    check = check_batch_independent(model, split.images[:40])
    assert check.status == "fail" and "two batches of 40 that differ elsewhere" in check.detail
    # the determinism check cannot see this
    assert check_forward_deterministic(model, split.images[:40]).status == "pass"
    sound = check_batch_independent(linear_model(templates), split.images[:40])
    assert sound.status == "pass"
    with pytest.raises(RobustkitError, match="change with the other images in the batch"):
        load_check_logits(model, split.images[:8], 10)
    frame = run_checks(model, split, pd.DataFrame(
        {"model": "m", "attack": "pgd", "norm": "linf", "eps": [0.0], "accuracy": [1.0]}),
        settings_for(AttackConfig(name="pgd", steps=5), eps=[0.0]), n=40)
    assert frame.set_index("name").loc["batch_independent", "status"] == "fail"


def test_per_class_sigmoid_outputs_are_flagged(data: tuple[Split, Tensor]) -> None:
    split, templates = data
    sigmoid = nn.Sequential(linear_model(templates), nn.Sigmoid())
    check = check_outputs_are_logits(sigmoid, split.images[:50])
    assert check.status == "warn" and "sigmoid" in check.detail


class QuietOnly(nn.Module):
    """A "detector" on 8×8 images that is right only about quiet ones: z₁ − z₀ = 100·(mean x −
    0.5) while the pixels are nearly uniform (std < 0.05), a constant −1 (class 0, no gradient)
    once they are not. Any random noise of ε = 0.3 breaks every sample; a gradient step moves
    all pixels alike, so the attack only breaks the images it can darken below 0.5."""

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        linear = 100 * (flat.mean(1) - 0.5)
        diff = torch.where(flat.std(1) < 0.05, linear, torch.full_like(linear, -1.0))
        return torch.stack([torch.zeros_like(diff), diff], dim=1)


def test_noise_as_strong_as_the_attack_fails_the_noise_check() -> None:
    """Grey images of 0.6 and 0.9, all of class 1. Noise breaks all; PGD without a random start
    (uniform steps) breaks the 0.6 half only: noise does twice the attack's damage. With a
    random start PGD breaks all, exactly as much as noise, which fails too."""
    x = torch.cat([torch.full((10, 1, 8, 8), 0.6), torch.full((10, 1, 8, 8), 0.9)])
    y = torch.ones(20, dtype=torch.long)
    model = QuietOnly()
    weak = AttackConfig(name="pgd", steps=10, random_start=False)
    check = check_noise_weaker_than_attack(model, x, y, weak, 0.3)
    assert check.measurements == {"eps": 0.3, "clean_accuracy": 1.0, "noise_accuracy": 0.0,
                                  "attack_accuracy": 0.5}
    assert check.status == "fail" and check.value == 2.0, check
    as_strong = check_noise_weaker_than_attack(model, x, y, AttackConfig(name="pgd", steps=10),
                                               0.3)
    assert as_strong.measurements["attack_accuracy"] == 0.0
    assert as_strong.status == "fail" and as_strong.value == 1.0, as_strong


def test_random_forward_is_flagged(data: tuple[Split, Tensor]) -> None:
    split, templates = data
    check = check_forward_deterministic(EvalDropout(linear_model(templates)), split.images)
    assert check.status == "fail"
    assert check_forward_deterministic(linear_model(templates), split.images).status == "pass"


def test_sound_linear_model_passes_every_check(data: tuple[Split, Tensor]) -> None:
    split, templates = data
    model = linear_model(templates)
    attacks = [AttackConfig(name="fgsm"), AttackConfig(name="pgd", steps=20)]
    evaluation = evaluate(model, split, attacks, EPS, model_name="linear")
    assert evaluation.results["accuracy"].iloc[0] > 0.95  # a real classifier of the data
    frame = run_checks(model, split, evaluation.results, settings_for(*attacks), n=200)
    assert list(frame.columns) == CHECK_COLUMNS
    assert set(frame["status"]) == {"pass"}, frame.to_string()
    names = set(frame["name"])
    assert {
        "accuracy_at_large_eps",
        "noise_weaker_than_attack",
        "attack_converged",
        "input_gradients_usable",
        "outputs_are_logits",
        "forward_deterministic",
        "accuracy_monotone_in_eps",
        "iterative_beats_single_step",
        "pgd_step_budget",
    } <= names
    values = frame.set_index("name")["value"]
    assert values["accuracy_at_large_eps"] == 0.0
    assert not math.isnan(values["noise_weaker_than_attack"])


def test_convergence_check_catches_a_stalled_pgd_with_apgd(data: tuple[Split, Tensor]) -> None:
    """PGD with steps of 0.001 cannot travel far enough at ε = 0.3, twice the steps or more
    random starts do not fix that on a linear model, but APGD's first step of 2ε does."""
    split, templates = data
    model, x, y = linear_model(templates), split.images[:200], split.labels[:200]
    timid = AttackConfig(name="pgd", steps=10, step_size=0.001)
    check = check_attack_converged(model, x, y, timid, 0.3)
    assert check.status == "fail" and "APGD-100" in check.detail, check.detail
    found = check.measurements
    more_steps_or_restarts = min(found["accuracy_more_steps"], found["accuracy_more_restarts"])
    assert more_steps_or_restarts > found["accuracy"] - 0.05  # only APGD shows the gap
    assert found["accuracy_apgd"] < found["accuracy"] - 0.05
    sound = check_attack_converged(model, x, y, AttackConfig(name="pgd", steps=20), 0.3)
    assert sound.status == "pass", sound.detail


def test_run_checks_flags_a_masked_model(data: tuple[Split, Tensor]) -> None:
    split, templates = data
    attacks = [AttackConfig(name="fgsm"), AttackConfig(name="pgd", steps=10)]
    model = Rounding(linear_model(templates))
    evaluation = evaluate(model, split, attacks, EPS, model_name="rounded")
    frame = run_checks(model, split, evaluation.results, settings_for(*attacks), n=100)
    status = frame.set_index("name")["status"]
    assert status["input_gradients_usable"] == "fail"
    assert (frame["status"] != "pass").sum() >= 2


class BatchSizeNoise(nn.Module):
    """A batch-independent model whose kernels round differently per batch size (as TF32
    convolutions do on a GPU): logits move by 2e-3 when the batch size changes, never when
    only the other samples do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.inner(x) + 2e-3 * (len(x) % 7)
        return logits


def test_batch_size_dependent_rounding_is_not_batch_statistics(
        data: tuple[Split, Tensor]) -> None:
    split, templates = data
    model = BatchSizeNoise(linear_model(templates))
    assert check_batch_independent(model, split.images[:40]).status == "pass"
    load_check_logits(model, split.images[:8], 10)  # not refused
