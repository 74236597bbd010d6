"""What a training run carries from one step to the next, and its resume state.

:class:`TrainState` holds the mutable part of a run: the weights, the optimizer, scheduler and
loss scaler, the optional weight average, the two generators, the position (epoch, step and
the epoch's permutation), the running sums of the epoch under way, the metrics rows, the notes
and the best selection score. ``state_dict`` / ``load_state_dict`` turn it into the resume
state :func:`robustkit.checkpoint.save_state` writes and back, so restoring a saved state into
a freshly built one and continuing gives bitwise what an uninterrupted run gives (on CPU).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from robustkit.checkpoint import save_state
from robustkit.config import TrainConfig
from robustkit.distributed import Context, all_gather_object
from robustkit.training.optim import build_optimizer, build_scheduler


@dataclass
class EpochSums:
    """Running loss sum, correct count and sample count of this rank's share of an epoch.

    The sums stay on the device (no host sync per step), the loss in float64 like a Python
    float; ``values()`` reads them back.
    """

    loss: Tensor
    correct: Tensor
    seen: int = 0

    @classmethod
    def start(cls, device: torch.device, values: tuple[float, int, int] = (0.0, 0, 0)
              ) -> EpochSums:
        loss, correct, seen = values
        return cls(torch.tensor(loss, dtype=torch.float64, device=device),
                   torch.tensor(correct, dtype=torch.int64, device=device), seen)

    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        """Count one batch: ``loss`` is its mean loss, ``logits`` its predictions."""
        self.loss += loss.detach().double() * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)

    def values(self) -> tuple[float, int, int]:
        return float(self.loss), int(self.correct), self.seen


@dataclass
class TrainState:
    """The mutable state of one process's run, positioned before step ``step`` of ``epoch``.

    ``order`` is the epoch's permutation of the training set once drawn (None before);
    ``batch_order`` is its copy on the device. ``averaged`` is the weight average when
    ``ema_decay`` is set. ``elapsed`` counts the seconds earlier processes trained; ``since``,
    ``saved_at`` and ``epoch_started`` are ``time.perf_counter()`` readings of when this process
    took over, last saved, and began (or resumed) the epoch.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    averaged: nn.Module | None
    order_generator: torch.Generator
    attack_generator: torch.Generator
    sums: EpochSums
    epoch: int = 0
    step: int = 0
    order: Tensor | None = None
    batch_order: Tensor | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    best_score: float = -1.0
    elapsed: float = 0.0
    since: float = field(default_factory=time.perf_counter)
    saved_at: float = field(default_factory=time.perf_counter)
    epoch_started: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(cls, model: nn.Module, cfg: TrainConfig, *, device: torch.device,
               steps_per_epoch: int, seed: int, rank: int = 0) -> TrainState:
        """The state before the first step: ``model`` as initialised (on ``device``), the
        optimizer and schedule of ``cfg``, the batch order seeded with ``seed`` and the attack
        starts with seed + 1 + 1000·rank."""
        optimizer = build_optimizer(model, cfg)
        return cls(
            model=model, optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg, steps_per_epoch),
            # fp16 needs loss scaling against gradient underflow; a disabled scaler is a no-op
            scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"),
            averaged=copy.deepcopy(model) if cfg.ema_decay is not None else None,
            order_generator=torch.Generator().manual_seed(seed),
            attack_generator=torch.Generator(device=device).manual_seed(seed + 1 + 1000 * rank),
            sums=EpochSums.start(device),
        )

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated and saved: the average when there is one."""
        return self.averaged if self.averaged is not None else self.model

    def begin_epoch(self, n_train: int, device: torch.device) -> None:
        """Draw the epoch's permutation of ``n_train`` samples, unless resuming mid-epoch."""
        self.epoch_started = time.perf_counter()
        if self.order is None or self.step == 0:
            self.order = torch.randperm(n_train, generator=self.order_generator)
        self.batch_order = self.order.to(device)

    def next_epoch(self) -> None:
        """Move to the start of the next epoch."""
        self.epoch, self.step, self.order, self.batch_order = self.epoch + 1, 0, None, None
        self.sums = EpochSums.start(self.sums.loss.device)

    def seconds(self) -> float:
        """Seconds trained so far, earlier processes of a resumed run included."""
        return self.elapsed + time.perf_counter() - self.since

    def state_dict(self, dist: Context | None = None) -> dict[str, Any]:
        """The resume state. Under ``dist`` a collective (every rank calls it): it gathers
        every rank's attack generator and running sums."""
        saved: dict[str, Any] = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "averaged": self.averaged.state_dict() if self.averaged is not None else None,
            "scaler": self.scaler.state_dict(), "order_generator": self.order_generator.get_state(),
            "attack_generator": self.attack_generator.get_state(), "epoch": self.epoch,
            "step": self.step, "order": self.order, "rows": self.rows, "notes": self.notes,
            "best_score": self.best_score, "elapsed": self.seconds(),
            "running_sums": [list(self.sums.values())],
        }
        if dist is not None:
            saved["world_size"] = dist.world
            saved["attack_generators"] = all_gather_object(self.attack_generator.get_state(),
                                                           dist)
            saved["running_sums"] = all_gather_object(list(self.sums.values()), dist)
        return saved

    def load_state_dict(self, saved: dict[str, Any], rank: int = 0) -> None:
        """Continue from ``saved`` (a ``state_dict()``, as ``load_state`` reads it back) as
        process ``rank``."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.averaged is not None:
            self.averaged.load_state_dict(saved["averaged"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.order_generator.set_state(saved["order_generator"])
        generators = saved.get("attack_generators") or [saved["attack_generator"]]
        self.attack_generator.set_state(generators[rank])
        self.epoch, self.step, self.order = saved["epoch"], saved["step"], saved["order"]
        self.rows, self.notes = list(saved["rows"]), list(saved["notes"])
        self.best_score, self.elapsed = saved["best_score"], saved["elapsed"]
        self.since = time.perf_counter()
        # the interrupted epoch's sums; states older than them only stop at an epoch's end
        sums = saved.get("running_sums")
        loss, correct, seen = sums[rank] if sums and self.step > 0 else (0.0, 0, 0)
        self.sums = EpochSums.start(self.sums.loss.device, (float(loss), int(correct), int(seen)))

    def save(self, out_dir: Path, *, fingerprint: str, dist: Context | None = None) -> None:
        """Write the resume state of the run ``fingerprint`` names into ``out_dir`` (rank 0
        writes; under ``dist`` every rank calls it)."""
        saved = self.state_dict(dist)
        if dist is None or dist.rank == 0:
            save_state(out_dir, {"fingerprint": fingerprint, **saved})
        self.saved_at = time.perf_counter()
