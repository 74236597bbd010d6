"""The runner table: each declared attack's name → the call of its function, and its cost.

:mod:`robustkit.attack_specs` declares what an attack is and which settings it takes; this
table says how to run it. :func:`run` is the one way the engine, the checks and robustness
under transformation call an attack: it looks the runner up, then enforces the threat model
itself, whatever the attack did: the result lies in ``B_ε(x) ∩ [0, 1]^d`` before any verdict
(as Foolbox's fixed-ε attacks are clipped by the framework, not by each attack).

A runner takes the model, the attack's settings (:class:`Settings`: an ``AttackConfig`` or
anything with its fields), the batch, ``ε``, the randomness (:class:`Draws`) and the true
classes of a targeted attack, and returns an :class:`~robustkit.attacks.base.AttackResult`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from robustkit.attacks.apgd import apgd
from robustkit.attacks.apgd_l1 import EPS_SCHEDULE
from robustkit.attacks.apgd_t import DEFAULT_TARGETS, apgd_targeted
from robustkit.attacks.base import AttackResult, as_eps
from robustkit.attacks.ensemble import FAB_TARGETS, autoattack, recipe
from robustkit.attacks.fab import SEARCH_STEPS, fab_targeted
from robustkit.attacks.fgsm import fgsm
from robustkit.attacks.iterative import StartNoise
from robustkit.attacks.norms import enforce_ball
from robustkit.attacks.pgd import pgd
from robustkit.attacks.square import DEFAULT_P_INIT, DEFAULT_QUERIES, SquareNoise, square
from robustkit.attacks.transforms import EOT
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Loss, Norm


class Settings(Protocol):
    """An attack's settings as the runners read them (the fields of ``AttackConfig``)."""

    @property
    def name(self) -> str: ...

    @property
    def norm(self) -> Norm: ...

    @property
    def steps(self) -> int: ...

    @property
    def step_size(self) -> float | None: ...

    @property
    def restarts(self) -> int: ...

    @property
    def loss(self) -> Loss: ...

    @property
    def random_start(self) -> bool: ...

    @property
    def targeted(self) -> bool: ...

    @property
    def targets(self) -> int | None: ...

    @property
    def queries(self) -> int | None: ...

    @property
    def p_init(self) -> float | None: ...

    @property
    def eot_samples(self) -> int | None: ...


@dataclass(frozen=True)
class Draws:
    """All the randomness of one attack call. ``start_noise(restart)``: unit-ball start noise
    for the whole batch; ``square_noise(step, m)``: Square's uniforms; ``starts``: the
    generator of random starts without ``start_noise``; ``eot``: EOT's transformed passes."""

    start_noise: StartNoise | None = None
    square_noise: SquareNoise | None = None
    starts: torch.Generator | None = None
    eot: EOT | None = None


Runner = Callable[[nn.Module, Settings, Tensor, Tensor, float, Draws, Tensor | None, bool],
                  AttackResult]
#: Forward passes per attacked sample at one ε, at most (the progress bar's measure).
Cost = Callable[[Settings], int]


def _fgsm(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float, draws: Draws,
          labels: Tensor | None, early_stop: bool) -> AttackResult:
    """L∞: one signed step (Goodfellow et al.); L2: the fast gradient method, one step of ε."""
    if s.norm == "linf":
        return fgsm(model, x, y, eps=eps, targeted=s.targeted, loss=s.loss, labels=labels)
    return pgd(model, x, y, eps=eps, norm="l2", steps=1, step_size=eps, loss=s.loss,
               random_start=False, targeted=s.targeted, labels=labels, early_stop=early_stop)


def _pgd(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float, draws: Draws,
         labels: Tensor | None, early_stop: bool) -> AttackResult:
    return pgd(model, x, y, eps=eps, norm=s.norm, steps=s.steps, step_size=s.step_size,
               loss=s.loss, restarts=s.restarts, random_start=s.random_start,
               targeted=s.targeted, labels=labels, early_stop=early_stop,
               start_noise=draws.start_noise, generator=draws.starts, eot=draws.eot)


def _apgd(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float, draws: Draws,
          labels: Tensor | None, early_stop: bool) -> AttackResult:
    return apgd(model, x, y, eps=eps, norm=s.norm, steps=s.steps, loss=s.loss,
                restarts=s.restarts, random_start=s.random_start, targeted=s.targeted,
                labels=labels, early_stop=early_stop, start_noise=draws.start_noise,
                generator=draws.starts, eot=draws.eot)


def _apgd_t(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float, draws: Draws,
            labels: Tensor | None, early_stop: bool) -> AttackResult:
    return apgd_targeted(model, x, y, eps=eps, norm=s.norm, steps=s.steps,
                         targets=s.targets or DEFAULT_TARGETS, restarts=s.restarts,
                         early_stop=early_stop, start_noise=draws.start_noise,
                         generator=draws.starts)


def _fab_t(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float, draws: Draws,
           labels: Tensor | None, early_stop: bool) -> AttackResult:
    return fab_targeted(model, x, y, eps=eps, norm=s.norm, steps=s.steps,
                        targets=s.targets or DEFAULT_TARGETS, restarts=s.restarts,
                        early_stop=early_stop, generator=draws.starts,
                        start_noise=draws.start_noise)


def _fab_cost(s: Settings) -> int:
    """Per target and start, a gradient pass and a verdict pass per step; the clean pass, the
    final search and the verdict on the result."""
    return (s.targets or DEFAULT_TARGETS) * s.restarts * 2 * s.steps + SEARCH_STEPS + 4


def _square(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float, draws: Draws,
            labels: Tensor | None, early_stop: bool) -> AttackResult:
    return square(model, x, y, eps=eps, norm=s.norm, budget=s.queries or DEFAULT_QUERIES,
                  p_init=s.p_init or DEFAULT_P_INIT, noise=draws.square_noise)


def _autoattack(model: nn.Module, s: Settings, x: Tensor, y: Tensor, eps: float,
                draws: Draws, labels: Tensor | None, early_stop: bool) -> AttackResult:
    return autoattack(model, x, y, eps=eps, norm=s.norm, steps=s.steps, targets=s.targets,
                      budget=s.queries or DEFAULT_QUERIES, p_init=s.p_init or DEFAULT_P_INIT,
                      start_noise=draws.start_noise, square_noise=draws.square_noise,
                      generator=draws.starts)


def _passes_per_start(s: Settings) -> int:
    """Forward passes of one APGD/PGD start: ``steps + 1``, and one more per extra phase of
    L1's ε schedule."""
    return s.steps + (len(EPS_SCHEDULE) if s.norm == "l1" else 1)


def _iterative_cost(s: Settings) -> int:
    return s.restarts * _passes_per_start(s) * (s.eot_samples or 1) + 1


def _ensemble_cost(s: Settings) -> int:
    restarts, targets = recipe(s.norm, s.targets, DEFAULT_TARGETS + 1)
    square = s.queries or DEFAULT_QUERIES
    fab = FAB_TARGETS * 2 * s.steps + SEARCH_STEPS + 4 if s.norm == "l1" else 0
    return (restarts + targets) * _passes_per_start(s) + fab + square + 2


RUNNERS: dict[str, tuple[Runner, Cost]] = {
    "fgsm": (_fgsm, lambda s: 2 * (s.eot_samples or 1)),
    "pgd": (_pgd, _iterative_cost),
    "apgd": (_apgd, _iterative_cost),
    "apgd-t": (_apgd_t, lambda s: (s.targets or DEFAULT_TARGETS) * s.restarts
               * _passes_per_start(s) + 1),
    "fab-t": (_fab_t, _fab_cost),
    "square": (_square, lambda s: (s.queries or DEFAULT_QUERIES) + 1),
    "autoattack": (_autoattack, _ensemble_cost),
}


def register_runner(name: str, runner: Runner, cost: Cost) -> None:
    """Say how to run a declared attack (see :func:`robustkit.attack_specs.register_spec`)."""
    if name in RUNNERS:
        raise RobustkitError(f"an attack named {name!r} has a runner already")
    RUNNERS[name] = (runner, cost)


def _runner(name: str) -> tuple[Runner, Cost]:
    try:
        return RUNNERS[name]
    except KeyError:
        raise RobustkitError(f"attack {name!r} is declared but has no runner: register one "
                             "with robustkit.attacks.registry.register_runner") from None


def run(model: nn.Module, settings: Settings, x: Tensor, y: Tensor, eps: float,
        draws: Draws, *, labels: Tensor | None = None, early_stop: bool = True
        ) -> AttackResult:
    """Run the attack ``settings.name`` on a batch and hold its result to the threat model:
    ``x_adv`` is put into ``B_ε(x) ∩ [0, 1]^d`` (:func:`~robustkit.attacks.norms.enforce_ball`)
    before the caller judges it. ``y``: targets of a targeted attack, ``labels`` the true
    classes (success = misclassified)."""
    runner, _ = _runner(settings.name)
    result = runner(model, settings, x, y, eps, draws, labels, early_stop)
    inside = enforce_ball(result.x_adv, x.detach(), as_eps(eps, x, settings.norm),
                          settings.norm)
    return dataclasses.replace(result, x_adv=inside)


def pass_budget(settings: Settings) -> int:
    """The most forward passes the attack makes per attacked sample at one ε (its restarts,
    steps, targets, EOT draws and queries; early stopping only lowers it)."""
    _, cost = _runner(settings.name)
    return cost(settings)
