"""Training: determinism, resume after a kill, schedules, adversarial methods, checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from robustkit.checkpoint import load_state
from robustkit.config import config_from_dict
from robustkit.data import Dataset, Split
from robustkit.errors import RobustkitError
from robustkit.models import build_model
from robustkit.models.loading import load_checkpoint
from robustkit.training import train
from robustkit.training.loop import update_average
from robustkit.training.objectives import kl_divergence, pgd_examples
from robustkit.training.optim import build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parent.parent


def subset(mnist: Dataset, n_train: int = 3000, n_eval: int = 500) -> Dataset:
    return Dataset(mnist.name, mnist.classes,
                   Split(mnist.train.images[:n_train], mnist.train.labels[:n_train]),
                   Split(mnist.val.images[:n_eval], mnist.val.labels[:n_eval]),
                   Split(mnist.test.images[:n_eval], mnist.test.labels[:n_eval]), mnist.source)


def weights(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(path)
    return model.state_dict()


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def test_same_config_and_seed_give_bitwise_identical_weights(mnist, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = config_from_dict({"model": {"arch": "mlp"}, "train": {"epochs": 2, "lr": 0.05},
                            "device": "cpu"})
    data = subset(mnist)
    a = train(cfg, out_dir=tmp_path / "a", data=data, progress=False)
    b = train(cfg, out_dir=tmp_path / "b", data=data, progress=False)
    c = train(cfg, out_dir=tmp_path / "c", data=data, progress=False, seed=1)
    assert same_weights(a.last, b.last)
    assert not same_weights(a.last, c.last)
    assert a.metrics.drop(columns="seconds").equals(b.metrics.drop(columns="seconds"))
    assert list(a.metrics.columns[:6]) == ["epoch", "lr", "train_loss", "train_acc", "val_acc",
                                           "test_acc"]
    assert (tmp_path / "a" / "metrics.csv").is_file()
    assert (tmp_path / "a" / "config.toml").is_file()
    assert not (tmp_path / "a" / "state.json").exists()  # resume state cleared when done
    assert a.metrics["test_acc"].iloc[-1] > 0.85  # 3,000 images, 2 epochs


def test_fresh_start_removes_an_earlier_runs_outputs_before_training(
        mnist: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = subset(mnist, 500, 100)
    earlier = config_from_dict({"model": {"arch": "softmax"}, "train": {"epochs": 1},
                                "device": "cpu"})
    train(earlier, out_dir=tmp_path, data=data, progress=False)
    assert (tmp_path / "model-best.safetensors").is_file()

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("robustkit.training.loop.training_loss", interrupted)
    later = config_from_dict({"model": {"arch": "mlp"}, "train": {"epochs": 1}, "device": "cpu"})
    with pytest.raises(KeyboardInterrupt):
        train(later, out_dir=tmp_path, data=data, progress=False)
    assert "mlp" in (tmp_path / "config.toml").read_text()
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & {"model-best.safetensors", "model-best.json", "model-last.safetensors",
                       "model-last.json", "metrics.csv", "manifest.json"}


def test_a_kill_while_metrics_csv_is_written_keeps_the_previous_one(
        mnist: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    real_to_csv = pd.DataFrame.to_csv

    def dies_halfway(frame: pd.DataFrame, path: object, *args: object, **kwargs: object) -> None:
        if len(frame) == 2 and "epoch" in frame.columns:  # the second epoch's metrics
            Path(str(path)).write_text("epoch,l")
            raise KeyboardInterrupt
        real_to_csv(frame, path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(pd.DataFrame, "to_csv", dies_halfway)
    cfg = config_from_dict({"model": {"arch": "softmax"}, "train": {"epochs": 2},
                            "device": "cpu"})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out_dir=tmp_path, data=subset(mnist, 500, 100), progress=False)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics["epoch"]) == [1]
    monkeypatch.setattr(pd.DataFrame, "to_csv", real_to_csv)
    # what SIGKILL (which runs no cleanup) leaves: the temporary file, an unnamed state file
    (tmp_path / ".metrics.csv.k1ll3d.tmp").write_text("epoch,l")
    (tmp_path / "state-99-1.safetensors").write_bytes(b"\0" * 1024)
    result = train(cfg, out_dir=tmp_path, data=subset(mnist, 500, 100), progress=False)
    assert list(result.metrics["epoch"]) == [1, 2]  # resumed at epoch 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.toml", "manifest.json", "metrics.csv", "model-best.json",
        "model-best.safetensors", "model-last.json", "model-last.safetensors"]


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine", "onecycle"])
def test_schedules(schedule: str, mnist, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = config_from_dict({"model": {"arch": "softmax"}, "device": "cpu", "train": {
        "epochs": 2, "schedule": schedule, "lr": 0.1, "lr_step_epochs": 1, "lr_gamma": 0.5}})
    result = train(cfg, out_dir=tmp_path, data=subset(mnist, 1000, 200), progress=False)
    lrs = result.metrics["lr"].tolist()
    expected = {"constant": [0.1, 0.1], "step": [0.05, 0.025]}
    if schedule in expected:
        assert lrs == pytest.approx(expected[schedule])
    else:
        assert lrs[-1] < 0.005 and lrs[0] > lrs[-1]  # cosine and one-cycle anneal towards 0


def test_cyclic_schedule_is_wong_et_al_triangle() -> None:
    """η_t = η·(t+1)/(0.4T) up to the peak at 2T/5, then η·(T−t−1)/(0.6T) down to 0 (T = 10)."""
    cfg = config_from_dict({"train": {"epochs": 2, "schedule": "cyclic", "lr": 0.6,
                                      "optimizer": "adam"}}).train
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.15, 0.3, 0.45, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])


def test_weight_average_is_the_bias_corrected_ema_of_the_iterates() -> None:
    """θ̄_t = Σ_{s≤t} d^{t−s} θ_s · (1 − d) / (1 − d^{t+1}), computed directly for each t."""
    decay, thetas = 0.9, [1.0, 3.0, -2.0, 0.5, 4.0]
    averaged, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    for t, theta in enumerate(thetas):
        torch.nn.init.constant_(model.weight, theta)
        update_average(averaged, model, decay, iteration=t)
        direct = sum(decay ** (t - s) * thetas[s] for s in range(t + 1))
        direct *= (1 - decay) / (1 - decay ** (t + 1))
        assert float(averaged.weight.detach()) == pytest.approx(direct)
    # by hand at t = 4: (.6561·1 + .729·3 − .81·2 + .9·.5 + 4) / (.6561 + .729 + .81 + .9 + 1)
    assert float(averaged.weight.detach()) == pytest.approx(5.6731 / 4.0951)


def test_checkpoints_hold_the_weight_average_when_ema_is_on(mnist, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The EMA does not touch the raw trajectory, so d → 0 saves the raw weights and d = 0.9 not."""
    data = subset(mnist, 600, 100)
    runs = {}
    for name, decay in {"raw": None, "tiny": 1e-9, "ema": 0.9}.items():
        train_cfg = {"epochs": 1, "batch_size": 100, "lr": 0.5}
        if decay is not None:
            train_cfg["ema_decay"] = decay
        cfg = config_from_dict({"model": {"arch": "softmax"}, "device": "cpu", "train": train_cfg})
        runs[name] = weights(train(cfg, out_dir=tmp_path / name, data=data, progress=False).last)
    assert all(torch.allclose(runs["tiny"][k], runs["raw"][k]) for k in runs["raw"])
    assert not all(torch.allclose(runs["ema"][k], runs["raw"][k], atol=1e-3) for k in runs["raw"])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_ema_decay_outside_open_unit_interval_is_rejected(decay: float) -> None:
    with pytest.raises(RobustkitError, match=r"train\.ema_decay"):
        config_from_dict({"train": {"ema_decay": decay}})


def test_strided_cnn_shapes() -> None:
    model = build_model("strided-cnn")
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 166_406


RESUME_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from robustkit.config import config_from_dict
    from robustkit.data import Dataset, Split, load_dataset
    from robustkit.training import train
    full = load_dataset("mnist", sys.argv[2], "cpu")
    n = 2000
    data = Dataset(full.name, full.classes, Split(full.train.images[:n], full.train.labels[:n]),
                   Split(full.val.images[:200], full.val.labels[:200]),
                   Split(full.test.images[:200], full.test.labels[:200]), full.source)
    cfg = config_from_dict({"model": {"arch": "mlp"}, "device": "cpu",
                            "train": {"method": "fgsm-rs", "epochs": 3, "batch_size": 50,
                                      "ema_decay": 0.99,
                                      "adversarial": {"eps": 0.1, "val_n": 100, "val_steps": 3}}})
    train(cfg, out_dir=Path(sys.argv[1]), data=data, progress=False, save_every=0.0)
""")


@pytest.mark.slow
def test_killed_run_resumes_to_bitwise_identical_weights(mnist_root: Path, tmp_path: Path
                                                         ) -> None:
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(whole), str(mnist_root)], check=True,
                   env=env, timeout=600)
    proc = subprocess.Popen([sys.executable, str(script), str(killed), str(mnist_root)], env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            state = load_state(killed) if (killed / "state.json").is_file() else None
        except RobustkitError:  # read between the writer's rename and its removal of old tensors
            state = None
        if state is not None and state["epoch"] == 1 and 10 <= state["step"] <= 25:
            break  # mid-epoch (40 steps an epoch): the resumed epoch's sums must carry over
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_state(killed)
    assert state is not None and (state["epoch"], state["step"]) < (3, 0), "run was not interrupted"
    assert state["step"] > 0, "killed at an epoch's end: no mid-epoch resume to test"
    subprocess.run([sys.executable, str(script), str(killed), str(mnist_root)], check=True,
                   env=env, timeout=600)
    assert same_weights(whole / "model-last", killed / "model-last")
    assert same_weights(whole / "model-best", killed / "model-best")
    import pandas as pd

    metrics = [pd.read_csv(folder / "metrics.csv").drop(columns="seconds")
               for folder in (whole, killed)]
    pd.testing.assert_frame_equal(metrics[0], metrics[1], check_exact=True)
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".tmp")
                or p.name.startswith("state")]


def test_adversarial_methods_train_and_record_robust_accuracy(mnist, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = subset(mnist, 1000, 200)
    for method in ("pgd-at", "fgsm-rs", "trades"):
        cfg = config_from_dict({"model": {"arch": "mlp"}, "device": "cpu", "train": {
            "method": method, "epochs": 2, "lr": 0.05,
            "adversarial": {"eps": 0.1, "steps": 3, "warmup_epochs": 1, "val_n": 100,
                            "val_steps": 5}}})
        result = train(cfg, out_dir=tmp_path / method, data=data, progress=False)
        m = result.metrics
        assert {"val_robust_acc", "eps"} <= set(m.columns)
        assert m["eps"].tolist() == pytest.approx([0.1, 0.1])
        assert (m["val_robust_acc"] <= m["val_acc"] + 1e-9).all() or method == "trades"
        best = load_checkpoint(result.best)[1]
        assert best["selected_by"] == "val_robust_acc"
        assert best["metrics"]["val_robust_acc"] == pytest.approx(m["val_robust_acc"].max())


def _scripted_accuracy(monkeypatch: pytest.MonkeyPatch, test_by_epoch: list[float],
                       val_by_epoch: list[float] | None = None) -> None:
    """Make ``accuracy`` return scripted per-epoch figures, told apart by the split's size."""
    calls = {"val": 0, "test": 0}

    def scripted(model: torch.nn.Module, split: Split, batch_size: int = 2000) -> float:
        kind = "test" if len(split) == 200 else "val"
        values = test_by_epoch if kind == "test" else val_by_epoch
        assert values is not None
        calls[kind] += 1
        return values[calls[kind] - 1]

    monkeypatch.setattr("robustkit.training.loop.accuracy", scripted)


def test_without_validation_split_the_best_checkpoint_is_the_last_epoch_not_the_best_test(
        mnist: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = subset(mnist, 300, 200)
    data = Dataset(data.name, data.classes, data.train, data.val.take(0), data.test, data.source)
    _scripted_accuracy(monkeypatch, test_by_epoch=[0.9, 0.5, 0.7])  # test peaks at epoch 1
    cfg = config_from_dict({"model": {"arch": "softmax"}, "train": {"epochs": 3},
                            "device": "cpu"})
    result = train(cfg, out_dir=tmp_path, data=data, progress=False)
    best = load_checkpoint(result.best)[1]
    assert best["epoch"] == 3 and best["selected_by"] == "last_epoch"
    assert same_weights(result.best, result.last)
    assert any("no validation split" in note for note in result.warnings)


def test_with_validation_split_the_best_checkpoint_follows_validation_not_test(
        mnist: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = subset(mnist, 300, 200)
    data = Dataset(data.name, data.classes, data.train, data.val.take(100), data.test,
                   data.source)
    _scripted_accuracy(monkeypatch, test_by_epoch=[0.9, 0.5, 0.7],
                       val_by_epoch=[0.6, 0.8, 0.7])
    cfg = config_from_dict({"model": {"arch": "softmax"}, "train": {"epochs": 3},
                            "device": "cpu"})
    result = train(cfg, out_dir=tmp_path, data=data, progress=False)
    best = load_checkpoint(result.best)[1]
    assert best["epoch"] == 2 and best["selected_by"] == "val_acc"
    assert not result.warnings


def test_pgd_examples_stay_in_ball_and_box() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    x_adv = pgd_examples(model, x, y, eps=0.2, steps=5, step_size=0.1)
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert model.training  # restored


def test_kl_divergence_matches_hand_computation() -> None:
    p = torch.tensor([[0.0, 0.0]])  # p = (½, ½)
    q = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])  # q = (¼, ¾)
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert torch.allclose(kl_divergence(p, q), expected.reshape(1))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_keeps_fp32_weights_and_learns(precision: str, mnist,  # type: ignore[no-untyped-def]
                                                                tmp_path: Path) -> None:
    data = subset(mnist, 3000, 300)
    base = {"model": {"arch": "mlp"}, "device": "cpu", "train": {"epochs": 2, "lr": 0.05}}
    full = train(config_from_dict(base), out_dir=tmp_path / "fp32", data=data, progress=False)
    base["train"]["precision"] = precision  # type: ignore[index]
    mixed = train(config_from_dict(base), out_dir=tmp_path / precision, data=data,
                  progress=False)
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    assert mixed.metrics["test_acc"].iloc[-1] > full.metrics["test_acc"].iloc[-1] - 0.03
    assert not torch.equal(next(mixed.model.parameters()), next(full.model.parameters()))


def test_attack_gradients_stay_fp32_under_mixed_precision() -> None:
    from robustkit.training.loop import loss_models

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    cfg = config_from_dict({"train": {"precision": "bf16"}})
    loss_net, attacked = loss_models(model, model, cfg, torch.device("cpu"))
    assert attacked is model and loss_net is not model
    x = torch.rand(4, 1, 28, 28)
    assert loss_net(x).dtype == torch.float32
    assert not torch.equal(loss_net(x), model(x))  # the forward really ran in bf16
    amp = config_from_dict({"train": {"precision": "bf16", "amp_attacks": True}})
    assert loss_models(model, model, amp, torch.device("cpu"))[1] is not model


@pytest.mark.slow
def test_compiled_training_matches_eager_closely(mnist, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = subset(mnist, 1000, 200)
    base = {"model": {"arch": "softmax"}, "device": "cpu", "train": {"epochs": 1, "lr": 0.05}}
    eager = train(config_from_dict(base), out_dir=tmp_path / "e", data=data, progress=False)
    base["train"]["compile"] = True  # type: ignore[index]
    compiled = train(config_from_dict(base), out_dir=tmp_path / "c", data=data, progress=False)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)
