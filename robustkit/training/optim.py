"""Optimizers and per-iteration learning-rate schedules built from a :class:`TrainConfig`."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from robustkit.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer; Adam and AdamW take their fused single-kernel update on CUDA
    (the same update rule; on the CPU the default implementation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = True if params and all(p.is_cuda for p in params) else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                    ) -> LRScheduler:
    """A scheduler stepped once per iteration.

    constant: η; step: η·γ^⌊epoch / lr_step_epochs⌋; cosine: η·½(1 + cos(π t / T));
    onecycle: Smith's one-cycle (warm up to η over 30% of T, then anneal), with T the total
    number of iterations; cyclic: the triangle of Wong et al. (2020), linear from 0 up to η at
    t = 2T/5 and back down to 0 at t = T.
    """
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cyclic":
        return LambdaLR(optimizer, lambda t: _triangle((t + 1) / total))
    if cfg.schedule == "step":
        every = cfg.lr_step_epochs * steps_per_epoch
        gamma = cfg.lr_gamma
        return LambdaLR(optimizer, lambda t: gamma ** (t // every))
    if cfg.schedule == "cosine":
        return LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    return LambdaLR(optimizer, lambda t: 1.0)


def _triangle(progress: float, peak_at: float = 0.4) -> float:
    """The factor at progress p ∈ [0, 1]: p / peak_at, then (1 − p) / (1 − peak_at) past it."""
    progress = min(max(progress, 0.0), 1.0)
    if progress <= peak_at:
        return progress / peak_at
    return (1.0 - progress) / (1.0 - peak_at)
