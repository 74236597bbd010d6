"""The training state's resume round trip, in one process: save mid-epoch, restore, continue."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from robustkit.checkpoint import load_state
from robustkit.config import config_from_dict
from robustkit.data import Dataset, Split
from robustkit.training.loop import (
    TrainSetup,
    TrainState,
    begin,
    end_epoch,
    finish,
    prepare,
    train_epoch,
    train_step,
)

# PGD-style examples, momentum, a weight average and a schedule: every part of the state matters
CONFIG = config_from_dict({
    "model": {"arch": "mlp"}, "device": "cpu",
    "train": {"method": "fgsm-rs", "epochs": 2, "batch_size": 8, "ema_decay": 0.9,
              "momentum": 0.9, "schedule": "cosine",
              "adversarial": {"eps": 0.1, "val_n": 16, "val_steps": 2}},
})


def tiny_data() -> Dataset:
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.rand(n, 1, 8, 8, generator=generator),
                     torch.randint(0, 10, (n,), generator=generator))

    return Dataset("tiny", tuple(str(k) for k in range(10)), split(60), split(16), split(16),
                   Path("."))


def train_to_the_end(setup: TrainSetup, state: TrainState) -> None:
    while state.epoch < setup.config.train.epochs:
        train_epoch(setup, state)
        end_epoch(setup, state)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_restored_state_continues_bitwise_like_an_uninterrupted_run(tmp_path: Path) -> None:
    data = tiny_data()
    whole_setup, whole = prepare(CONFIG, out_dir=tmp_path / "whole", data=data, progress=False)
    begin(whole_setup, whole)
    train_to_the_end(whole_setup, whole)

    setup, state = prepare(CONFIG, out_dir=tmp_path / "cut", data=data, progress=False)
    begin(setup, state)
    train_epoch(setup, state)
    end_epoch(setup, state)
    state.begin_epoch(len(data.train), setup.device)
    for _ in range(3):  # of 8 steps: the interrupted epoch's running sums must carry over
        train_step(setup, state)
    setup.save(state)

    # as a new process would: a fresh setup and state, moved on a little so that anything
    # load_state_dict leaves out shows
    setup, restored = prepare(CONFIG, out_dir=tmp_path / "cut", data=data, progress=False)
    restored.begin_epoch(len(data.train), setup.device)
    for _ in range(2):
        train_step(setup, restored)
    saved = load_state(tmp_path / "cut")
    assert saved is not None
    restored.load_state_dict(saved)
    assert (restored.epoch, restored.step) == (1, 3)
    assert restored.sums.values() == state.sums.values()
    train_to_the_end(setup, restored)

    assert_same_tensors(whole.model.state_dict(), restored.model.state_dict())
    assert whole.averaged is not None and restored.averaged is not None
    assert_same_tensors(whole.averaged.state_dict(), restored.averaged.state_dict())
    for p_whole, p_restored in zip(whole.model.parameters(), restored.model.parameters(),
                                   strict=True):
        assert torch.equal(whole.optimizer.state[p_whole]["momentum_buffer"],
                           restored.optimizer.state[p_restored]["momentum_buffer"])
    assert whole.scheduler.state_dict() == restored.scheduler.state_dict()
    assert torch.equal(whole.attack_generator.get_state(), restored.attack_generator.get_state())
    assert torch.equal(whole.order_generator.get_state(), restored.order_generator.get_state())
    assert whole.best_score == restored.best_score

    results = [finish(whole_setup, whole), finish(setup, restored)]
    metrics = [result.metrics.drop(columns="seconds") for result in results]
    pd.testing.assert_frame_equal(metrics[0], metrics[1], check_exact=True)
    assert list(metrics[0]["epoch"]) == [1, 2]
    assert_same_tensors(results[0].model.state_dict(), results[1].model.state_dict())
    assert not (tmp_path / "cut" / "state.json").exists()  # finished: resume state cleared

