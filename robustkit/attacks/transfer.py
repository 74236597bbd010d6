"""Transfer attacks: craft on a source model, judge on the target (Papernot et al., 2016;
Carlini et al., 2019, §5: a transfer attack must not beat the white-box attack).

The attacker sees only the source ``g``; the evaluated model ``f`` (the target) enters only at
the end, when the caller judges the returned example::

    x_adv = A_g(x, y; ε)        broken  ⟺  argmax f(x_adv) ≠ y

The inner attack ``A`` runs **blind** to the source's verdict: it never learns that an iterate
fools ``g``, so it neither stops early nor keeps the first iterate that crosses ``g``'s
boundary. Every step of every start runs and the iterate with the highest objective on ``g``
is kept (the clean point counts as a candidate, as it does for every attack): an example just
past ``g``'s boundary rarely crosses ``f``'s, a high-loss one does more often. PGD and APGD run
blind through their probe (:class:`Blind`); FGSM takes one step whatever it finds. The
attacks that stop on success or search by it (APGD-T, Square, the ensemble) are not
transferred (:func:`robustkit.attack_specs.transferable`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustkit.attacks import registry
from robustkit.attacks.base import AttackResult
from robustkit.attacks.registry import Draws, Settings
from robustkit.attacks.transforms import EOT, Transform
from robustkit.vocabulary import Loss


@dataclass(frozen=True)
class Blind(EOT):
    """The one pass at an iterate with its success flags withheld: the objective and its
    gradient of the plain pass (the identity transformation, one draw: bit for bit the plain
    probe), success always false. Plugged into PGD or APGD as their probe, every step runs and
    the highest-objective iterate is kept."""

    transform: Transform = dataclasses.field(default_factory=Transform)

    def probe(self, model: nn.Module, x_cur: Tensor, y: Tensor, kind: Loss, targeted: bool, *,
              gradient: bool, truth: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        value, adv, grad = super().probe(model, x_cur, y, kind, targeted, gradient=gradient,
                                         truth=truth)
        return value, torch.zeros_like(adv), grad


def craft(source: nn.Module, settings: Settings, x: Tensor, y: Tensor, eps: float,
          draws: Draws, *, labels: Tensor | None = None) -> AttackResult:
    """The attack ``settings`` run blind on ``source`` (see the module docstring), held to
    ``B_ε(x) ∩ [0, 1]^d`` like every attack (:func:`registry.run`). Its ``success`` speaks of
    the source; the caller judges ``x_adv`` on the target."""
    blind = dataclasses.replace(draws, eot=Blind())
    return registry.run(source, settings, x, y, eps, blind, labels=labels, early_stop=False)
