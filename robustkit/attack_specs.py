"""Each attack declared once: its family, default steps, the settings it takes, its title.

The config's validation, the sweep's dispatch and cost estimate, the checks, robustness under
transformation and the CLI read this table instead of comparing attack names; the functions
that run the attacks are in the runner table of :mod:`robustkit.attacks.registry`. Adding an
attack is its own file in ``attacks/``, one :class:`AttackSpec` here (or
:func:`register_spec`), one runner entry, and tests. This module imports nothing of robustkit
but the vocabulary, and no torch, so the config and ``robustkit --help`` can read it.

Families:

* ``single-step``: one gradient step (FGSM);
* ``iterative``: gradient steps from one or more starts, the per-sample worst case kept (PGD,
  APGD, APGD-T);
* ``gradient-free``: a search that reads only the model's outputs (Square);
* ``ensemble``: several attacks, each on what the earlier ones left robust (AutoAttack);
* ``minimum-norm``: the smallest perturbation that breaks a sample, judged at each ε (FAB-T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from robustkit.errors import RobustkitError
from robustkit.vocabulary import Norm

Family = Literal["single-step", "iterative", "gradient-free", "ensemble", "minimum-norm"]

#: The ``AttackConfig`` fields that are settings of some attacks (name, norm and label are
#: every attack's).
OPTIONS = ("steps", "step_size", "restarts", "loss", "random_start", "targeted", "targets",
           "queries", "p_init", "eot_samples", "bpda")


@dataclass(frozen=True)
class AttackSpec:
    """One attack's declaration.

    ``steps``: its default steps per start (None: it takes no steps). ``options``: the
    :data:`OPTIONS` it accepts; a config that sets any other is refused. ``searches_freely``:
    it includes a gradient-free search, so checks that discredit gradients do not discredit
    it. ``title``: what the README and reports call it. ``norms``: the balls it runs in."""

    name: str
    family: Family
    title: str
    steps: int | None
    options: frozenset[str]
    searches_freely: bool = False
    norms: frozenset[Norm] = frozenset({"linf", "l2"})

    @property
    def iterative(self) -> bool:
        return self.family == "iterative"

    @property
    def uses_gradients(self) -> bool:
        return self.family in ("single-step", "iterative", "minimum-norm")


#: The balls of the attacks that also run in L1 (after Croce & Hein, 2021: l1-APGD).
_WITH_L1: frozenset[Norm] = frozenset({"linf", "l2", "l1"})
_ITERATIVE = frozenset({"steps", "restarts", "loss", "random_start", "targeted", "eot_samples",
                        "bpda"})

SPECS: dict[str, AttackSpec] = {spec.name: spec for spec in (
    AttackSpec("fgsm", "single-step", "FGSM (Goodfellow et al., 2015)", None,
               frozenset({"loss", "targeted", "bpda"})),
    AttackSpec("pgd", "iterative", "PGD (Madry et al., 2018)", 40, _ITERATIVE | {"step_size"}),
    AttackSpec("apgd", "iterative", "APGD (Croce & Hein, 2020)", 100, _ITERATIVE,
               norms=_WITH_L1),
    AttackSpec("apgd-t", "iterative", "APGD-T, targeted DLR (Croce & Hein, 2020)", 100,
               frozenset({"steps", "restarts", "targets", "bpda"}), norms=_WITH_L1),
    AttackSpec("square", "gradient-free", "Square (Andriushchenko et al., 2020)", None,
               frozenset({"queries", "p_init"}), searches_freely=True, norms=_WITH_L1),
    AttackSpec("fab-t", "minimum-norm", "FAB-T, targeted FAB (Croce & Hein, 2020)", 100,
               frozenset({"steps", "restarts", "targets"}), norms=_WITH_L1),
    AttackSpec("autoattack", "ensemble", "APGD-CE → APGD-T → Square (AutoAttack; L1: + FAB-T)", 100,
               frozenset({"steps", "targets", "queries", "p_init"}), searches_freely=True,
               norms=_WITH_L1),
)}


def register_spec(spec: AttackSpec) -> None:
    """Declare another attack (its runner goes to :mod:`robustkit.attacks.registry`)."""
    if spec.name in SPECS:
        raise RobustkitError(f"an attack named {spec.name!r} is declared already")
    unknown = spec.options - set(OPTIONS)
    if unknown:
        raise RobustkitError(f"attack {spec.name!r}: unknown options {sorted(unknown)}")
    SPECS[spec.name] = spec


def attack_names() -> tuple[str, ...]:
    """Every declared attack, in declaration order."""
    return tuple(SPECS)


def attack_spec(name: str) -> AttackSpec:
    """The declaration of ``name``; an unknown name names the declared ones."""
    try:
        return SPECS[name]
    except KeyError:
        raise RobustkitError(f"unknown attack {name!r}: choose one of "
                             f"{', '.join(attack_names())}") from None


def running_in(norm: str) -> tuple[str, ...]:
    """The declared attacks that run in ``norm``."""
    return tuple(name for name, spec in SPECS.items() if norm in spec.norms)


def names_in(*families: Family) -> tuple[str, ...]:
    """The declared attacks of these families."""
    return tuple(name for name, spec in SPECS.items() if spec.family in families)


def probing() -> tuple[str, ...]:
    """The iterative attacks with a free objective, steps and restarts (PGD, APGD): the ones
    the checks re-run with other settings and judge an evaluation by."""
    return tuple(n for n, spec in SPECS.items() if spec.iterative and "loss" in spec.options)


def transferable() -> tuple[str, ...]:
    """The attacks a transfer attack can run on a source model (:mod:`robustkit.attacks.
    transfer`): those whose example need not know whether it fools the source — the single
    step, and the iterative attacks whose probe can be replaced (they take EOT's), which then
    run blind to it. An attack that stops on success or searches by it is not one."""
    return tuple(n for n, spec in SPECS.items() if spec.family == "single-step"
                 or (spec.iterative and "eot_samples" in spec.options))


def searching_freely() -> tuple[str, ...]:
    """The attacks with a gradient-free search (Square, the ensemble)."""
    return tuple(n for n, spec in SPECS.items() if spec.searches_freely)
