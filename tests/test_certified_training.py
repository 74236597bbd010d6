"""Certified training (IBP, CROWN-IBP): the loss by hand, the float32 bounds against the
float64 ones, the schedules, the initialisation, resume, and the config's errors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from robustkit.certify.bounds import margin_bounds
from robustkit.config import CertifiedConfig, config_from_dict
from robustkit.data import Dataset, Split
from robustkit.errors import RobustkitError
from robustkit.models.loading import load_checkpoint
from robustkit.models.zoo import ARCHITECTURES, build_model
from robustkit.training import loop as training_loop
from robustkit.training import train
from robustkit.training.certified import (
    CertifiedStep,
    certified_loss,
    ibp_initialise,
    live_steps,
    margin_lower_bounds,
    ramp_progress,
    robust_cross_entropy,
    schedule,
    smooth_ramp,
)
from robustkit.vocabulary import MAX_POOLING_ARCHS
from tests.conftest import run

REPO = Path(__file__).resolve().parent.parent


def tiny_net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Two pixels → 2 ReLUs → 3 logits, with hand-picked weights (see the hand computations).

    h = W₁x + b₁ with W₁ = [[1, −1], [1, 1]], b₁ = (−0.25, 0); z = W₂ relu(h) + b₂ with
    W₂ = [[1, 0], [0, 1], [−1, 1]], b₂ = (0, 0.1, 0).
    """
    first, last = nn.Linear(2, 2), nn.Linear(2, 3)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
        first.bias.copy_(torch.tensor([-0.25, 0.0]))
        last.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]))
        last.bias.copy_(torch.tensor([0.0, 0.1, 0.0]))
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(), last).to(dtype)


X = torch.tensor([[[[0.5, 0.25]]]])  # x₁ ∈ [0.4, 0.6], x₂ ∈ [0.15, 0.35] at ε = 0.1
Y = torch.tensor([0])

# By hand at ε = 0.1: h₁ ∈ [−0.2, 0.2] (unstable), h₂ ∈ [0.55, 0.95].
# IBP, last layer folded with C: m₁ = r₁ − r₂ − 0.1 ≥ 0 − 0.95 − 0.1; m₂ = 2r₁ − r₂ ≥ −0.95.
IBP_HAND = [-1.05, -0.95]
# CROWN-IBP: u₁ = −l₁, so r₁ ≥ h₁ (slope 1) where Λ ≥ 0. m₁: Λ = (1, −1) → ΛW₁ = (0, −2),
# Λb₁ = −0.25: min = −2·0.35 − 0.25 − 0.1 = −1.05. m₂: Λ = (2, −1) → ΛW₁ = (1, −3),
# Λb₁ = −0.5: min = 0.4 − 3·0.35 − 0.5 = −1.15.
CROWN_IBP_HAND = [-1.05, -1.15]


@pytest.mark.parametrize(("beta", "expected"), [
    (0.0, IBP_HAND), (1.0, CROWN_IBP_HAND),
    (0.5, [0.5 * (a + b) for a, b in zip(IBP_HAND, CROWN_IBP_HAND, strict=True)])])
def test_margin_bounds_equal_the_hand_computation(beta: float, expected: list[float]) -> None:
    net = tiny_net()
    margins = margin_lower_bounds(live_steps(net, "crown-ibp"), X, Y, 0.1, beta)
    assert margins.dtype == torch.float32
    assert margins[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_loss_equals_the_hand_computation() -> None:
    """κ·CE(f(x), y) + (1 − κ)·log(1 + Σ exp(−m̲_j)) with κ = 0.3, β = 0.5, ε = 0.1."""
    logits = [0.0, 0.85, 0.75]  # r = (0, 0.75): z = (r₁, r₂ + 0.1, −r₁ + r₂)
    clean = -logits[0] + math.log(sum(math.exp(z) for z in logits))
    margins = [0.5 * (a + b) for a, b in zip(IBP_HAND, CROWN_IBP_HAND, strict=True)]
    robust = math.log(1 + sum(math.exp(-m) for m in margins))
    loss, out = certified_loss(tiny_net(), X, Y, CertifiedStep(eps=0.1, kappa=0.3, beta=0.5),
                               "crown-ibp")
    assert out[0].tolist() == pytest.approx(logits, abs=1e-6)
    assert loss.item() == pytest.approx(0.3 * clean + 0.7 * robust, abs=1e-5)
    ibp_loss, _ = certified_loss(tiny_net(), X, Y, CertifiedStep(0.1, 0.3, 0.5), "ibp")
    ibp_robust = math.log(1 + sum(math.exp(-m) for m in IBP_HAND))  # ibp ignores β
    assert ibp_loss.item() == pytest.approx(0.3 * clean + 0.7 * ibp_robust, abs=1e-5)


def test_robust_cross_entropy_at_eps_0_is_the_clean_cross_entropy() -> None:
    torch.manual_seed(0)
    net = build_model("dm-small")
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    margins = margin_lower_bounds(live_steps(net, "ibp"), x, y, 0.0, 0.0)
    clean = nn.functional.cross_entropy(net(x), y)
    assert robust_cross_entropy(margins, y).item() == pytest.approx(clean.item(), rel=1e-5)


def test_gradient_of_the_bound_matches_a_finite_difference() -> None:
    """The bounds are differentiated through (nothing detached): float64 central difference
    on a first-layer weight, whose change moves the box of the unstable ReLU (h₁ ∈ [−0.05,
    0.25] at this x: away from the kinks of the relaxation)."""
    net, x = tiny_net(torch.float64), torch.tensor([[[[0.55, 0.2]]]], dtype=torch.float64)
    step = CertifiedStep(eps=0.1, kappa=0.0, beta=0.5)
    loss, _ = certified_loss(net, x, Y, step, "crown-ibp")
    loss.backward()
    first = net[1]
    assert isinstance(first, nn.Linear)
    weight = first.weight
    assert weight.grad is not None
    h, analytic = 1e-6, float(weight.grad[0, 1])
    with torch.no_grad():
        weight[0, 1] += h
        up = float(certified_loss(net, x, Y, step, "crown-ibp")[0])
        weight[0, 1] -= 2 * h
        down = float(certified_loss(net, x, Y, step, "crown-ibp")[0])
    assert analytic != 0
    assert analytic == pytest.approx((up - down) / (2 * h), rel=1e-4)


@pytest.mark.parametrize("arch", ["dm-small", "strided-cnn", "mlp"])
def test_float32_training_bounds_agree_with_the_float64_bounds(arch: str) -> None:
    torch.manual_seed(1)
    net = build_model(arch)
    ibp_initialise(net)
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    for beta, method in ((0.0, "ibp"), (1.0, "crown-ibp")):
        ours = margin_lower_bounds(live_steps(net, "crown-ibp"), x, y, 0.05, beta)
        reference = margin_bounds(net, x, y, 0.05, method).margins  # type: ignore[arg-type]
        assert ours.dtype == torch.float32 and ours.requires_grad
        scale = max(1.0, float(reference.abs().max()))
        assert float((ours.double() - reference).abs().max()) <= 1e-4 * scale


def test_live_steps_refuse_what_training_cannot_bound() -> None:
    with pytest.raises(RobustkitError, match="BatchNorm2d while training"):
        live_steps(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train(), "ibp")
    with pytest.raises(RobustkitError, match="crown-ibp training cannot bound MaxPool2d"):
        live_steps(build_model("cnn"), "crown-ibp")
    live_steps(build_model("cnn"), "ibp")  # IBP bounds max pooling


def test_ibp_initialisation_follows_shi_et_al() -> None:
    torch.manual_seed(0)
    net = build_model("dm-medium")
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    last_before = layers[-1].weight.clone()
    ibp_initialise(net)
    for layer in layers[:-1]:
        fan_in = layer.weight[0].numel()
        assert float(layer.weight.std()) == pytest.approx(math.sqrt(2 * math.pi) / fan_in,
                                                          rel=0.1)
        assert layer.bias is not None and not layer.bias.any()
    assert torch.equal(layers[-1].weight, last_before)


def cfg(**kw: object) -> CertifiedConfig:
    return CertifiedConfig(**{"eps": 0.3, "train_eps": 0.4, "start_epochs": 2,  # type: ignore[arg-type]
                              "ramp_epochs": 5, **kw})


@pytest.mark.parametrize("ramp", ["linear", "smooth"])
@pytest.mark.parametrize("start", [0, 2])
def test_eps_is_never_full_at_the_start_and_full_only_at_the_end_of_the_ramp(
        ramp: str, start: int) -> None:
    c, per_epoch = cfg(ramp=ramp, start_epochs=start), 7
    eps = [schedule(c, t, per_epoch).eps for t in range(12 * per_epoch)]
    ramp_start, ramp_end = start * per_epoch, (start + 5) * per_epoch - 1
    assert all(e == 0 for e in eps[:ramp_start])
    # the ramp's first step: a sliver of ε, at most one step's share of the line
    assert 0 < eps[ramp_start] <= 0.4 / (5 * per_epoch) + 1e-12
    assert all(b >= a for a, b in itertools.pairwise(eps))
    assert all(e < 0.4 for e in eps[:ramp_end])
    assert eps[ramp_end] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.4)


def test_without_a_ramp_fine_tuning_runs_at_full_strength_after_the_clean_epochs() -> None:
    c, per_epoch = cfg(start_epochs=1, ramp_epochs=0, kappa_start=1.0, kappa_end=0.7,
                       beta_start=1.0, beta_end=0.2), 7
    steps = [schedule(c, t, per_epoch) for t in range(3 * per_epoch)]
    assert all((s.eps, s.kappa, s.beta) == (0.0, 1.0, 1.0) for s in steps[:per_epoch])
    assert all(s.eps == pytest.approx(0.4) and s.kappa == pytest.approx(0.7)
               and s.beta == pytest.approx(0.2) for s in steps[per_epoch:])
    tuned = {**BASE, "model": {"arch": "dm-small", "pretrained": "zoo:x"},
             "train": {"method": "ibp", "epochs": 2,
                       "certified": {"start_epochs": 0, "ramp_epochs": 0}}}
    assert config_from_dict(tuned).train.certified_settings.ramp_epochs == 0


def test_smooth_ramp_is_continuous_with_its_slope_at_the_join() -> None:
    below, above, h = smooth_ramp(0.25 - 1e-9), smooth_ramp(0.25 + 1e-9), 1e-6
    assert below == pytest.approx(above, abs=1e-8)
    left = (smooth_ramp(0.25) - smooth_ramp(0.25 - h)) / h
    right = (smooth_ramp(0.25 + h) - smooth_ramp(0.25)) / h
    assert left == pytest.approx(right, rel=1e-3)
    assert smooth_ramp(0.0) == 0 and smooth_ramp(1.0) == pytest.approx(1.0)
    assert smooth_ramp(0.5) < 0.5  # slower than the straight line early on


def test_kappa_and_beta_move_linearly_over_the_ramp() -> None:
    c = cfg(kappa_start=1.0, kappa_end=0.5, beta_start=1.0, beta_end=0.0, start_epochs=1,
            ramp_epochs=4)
    per_epoch = 10
    first = schedule(c, 0, per_epoch)
    assert (first.eps, first.kappa, first.beta) == (0.0, 1.0, 1.0)
    middle = schedule(c, 10 + 20 - 1, per_epoch)  # half the ramp's 40 steps done
    assert ramp_progress(c, 29, per_epoch) == pytest.approx(0.5)
    assert middle.kappa == pytest.approx(0.75) and middle.beta == pytest.approx(0.5)
    end = schedule(c, 10 * per_epoch - 1, per_epoch)
    assert end.kappa == pytest.approx(0.5) and end.beta == pytest.approx(0.0)


def test_dm_architectures_are_strided_and_the_max_pooling_list_is_right() -> None:
    pooled = {name for name in ARCHITECTURES
              if any(isinstance(m, nn.MaxPool2d) for m in build_model(name).modules())}
    assert pooled == set(MAX_POOLING_ARCHS)
    for name in ("dm-small", "dm-medium", "dm-large"):
        assert build_model(name)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


BASE = {"model": {"arch": "dm-small"}, "train": {"method": "crown-ibp", "epochs": 12,
                                                 "certified": {"ramp_epochs": 10}}}


@pytest.mark.parametrize(("change", "message"), [
    ({"model": {"arch": "cnn"}}, r"model\.arch: cnn pools by maximum.*train\.method = \"ibp\""),
    ({"train": {"method": "crown-ibp", "epochs": 10}},
     r"train\.certified\.ramp_epochs: the ε ramp ends after epoch 11 .* past the run's 10"),
    ({"train": {"method": "ibp", "epochs": 12, "certified": {"eps": 0.3, "train_eps": 0.2}}},
     r"train\.certified\.train_eps: 0\.2 is below the target ε 0\.3"),
    ({"train": {"method": "ibp", "epochs": 12, "precision": "bf16"}},
     r"train\.precision: ibp training computes its bounds in float32"),
    ({"train": {"method": "pgd-at", "certified": {"eps": 0.1}}},
     r"train\.certified: only used with train\.method"),
    ({"train": {"method": "ibp", "epochs": 12, "certified": {"ramp_epochs": 0}}},
     r"train\.certified\.ramp_epochs: 0 starts at full ε, which only a pretrained network"),
])
def test_config_errors_name_the_key_and_the_fix(change: dict[str, object], message: str
                                                ) -> None:
    raw = {**BASE, **change}
    with pytest.raises(RobustkitError, match=message):
        config_from_dict(raw)


def test_valid_certified_config_loads_and_the_committed_ones_too() -> None:
    config_from_dict(BASE)
    from robustkit.config import load_config

    for name, target, final in (("mnist_cnn_crown_ibp", 0.3, 0.4),
                                ("mnist_cnn_crown_ibp_01", 0.1, 0.2)):
        loaded = load_config(REPO / "experiments" / f"{name}.toml")
        certified = loaded.train.certified_settings
        assert (certified.eps, certified.final_eps) == (target, final)
        assert loaded.evaluate.eps == (0.0, target) and loaded.evaluate.n is None
        assert [a.name for a in loaded.attacks] == ["autoattack"]


def test_cli_refuses_crown_ibp_on_a_max_pooling_model_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[model]\narch = "madry-cnn"\n[train]\nmethod = "crown-ibp"\n'
                      'epochs = 12\n')
    done = run("train", str(config), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "madry-cnn pools" in lines[0]
    assert not (tmp_path / "runs").exists()


def small(mnist: Dataset, n_train: int = 300, n_eval: int = 60) -> Dataset:
    return Dataset(mnist.name, mnist.classes,
                   Split(mnist.train.images[:n_train], mnist.train.labels[:n_train]),
                   Split(mnist.val.images[:n_eval], mnist.val.labels[:n_eval]),
                   Split(mnist.test.images[:n_eval], mnist.test.labels[:n_eval]), mnist.source)


RUN = {"model": {"arch": "dm-small"}, "device": "cpu",
       "train": {"method": "crown-ibp", "epochs": 3, "batch_size": 50, "optimizer": "adam",
                 "lr": 0.001, "grad_clip": 5.0,
                 "certified": {"eps": 0.1, "train_eps": 0.2, "start_epochs": 1,
                               "ramp_epochs": 2, "val_n": 30},
                 "adversarial": {"val_steps": 2}}}


class KilledError(Exception):
    pass


def test_killed_certified_run_resumes_to_the_same_weights_and_metrics(
        mnist: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, data = config_from_dict(RUN), small(mnist)
    whole = train(config, out_dir=tmp_path / "whole", data=data, progress=False)
    assert whole.metrics["eps"].tolist() == pytest.approx([0.0, schedule(
        config.train.certified_settings, 11, 6).eps, 0.2])
    assert {"kappa", "beta", "val_robust_acc", "val_certified_acc"} <= set(whole.metrics)
    assert load_checkpoint(whole.best)[1]["selected_by"] == "val_certified_acc"

    real_step, taken = training_loop.train_step, list[int]()

    def dying_step(setup: training_loop.TrainSetup, state: training_loop.TrainState) -> None:
        if len(taken) == 9:  # mid-ramp, mid-epoch (6 steps an epoch)
            raise KilledError
        taken.append(1)
        real_step(setup, state)

    monkeypatch.setattr(training_loop, "train_step", dying_step)
    with pytest.raises(KilledError):
        train(config, out_dir=tmp_path / "killed", data=data, progress=False, save_every=0.0)
    monkeypatch.setattr(training_loop, "train_step", real_step)
    resumed = train(config, out_dir=tmp_path / "killed", data=data, progress=False)
    for name in ("model-last", "model-best"):
        a = load_checkpoint(tmp_path / "whole" / name)[0].state_dict()
        b = load_checkpoint(tmp_path / "killed" / name)[0].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.metrics.drop(columns="seconds").equals(resumed.metrics.drop(columns="seconds"))


def test_certified_train_speed_benchmark_measures_ratios_to_pgd_at(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import certified_train_speed as bench

    out = tmp_path / "rows.json"
    assert bench.main(["--quick", "--arch", "dm-small", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "× PGD-AT epoch" in printed and "crown-ibp" in printed
    import json

    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"standard", "pgd-at", "ibp", "crown-ibp"}
    assert rows["pgd-at"]["ratio"] == 1.0
    assert all(r["step_s"] > 0 and r["epoch_s"] == pytest.approx(r["step_s"] * 3438)
               for r in rows.values())  # 55,000 images in batches of 16


def test_the_zoo_quotes_a_certified_model_at_its_target_eps(tmp_path: Path) -> None:
    from robustkit.config import load_config, to_toml
    from robustkit.released import _training

    config = load_config(REPO / "experiments" / "mnist_cnn_crown_ibp_01.toml")
    (tmp_path / "config.toml").write_text(to_toml(config))
    assert _training(tmp_path) == ("crown-ibp", 0.1)  # not the PGD section's default 0.3
