"""Sanity checks of an adversarial evaluation: signs of gradient masking or mis-configuration.

A robust-accuracy number is only as good as the attack behind it. These checks follow the
checklist of Carlini et al. (2019), "On Evaluating Adversarial Robustness", and the red flags that
AutoAttack reports. Each check is one function ``check_<name>`` returning a :class:`Check` named
``<name>`` whose status is ``pass``, ``warn`` or ``fail``, with the measured value, the threshold
it was held to, a one-line explanation and the numbers behind them (``measurements``).

* :mod:`~robustkit.checks.record`: the :class:`Check` record and :func:`grade`, the one rule
  from a value and its warn/fail limits to a status;
* :mod:`~robustkit.checks.results`: checks of the results table alone
  (:func:`checks_from_results`): accuracy never rises with ε, an iterative attack is at least as
  strong as a single-step one, PGD's steps can reach ε;
* :mod:`~robustkit.checks.model`: checks that probe the model (:func:`run_checks` adds these):
  the outputs are logits (not softmax or per-class sigmoid outputs), the forward pass is
  deterministic and independent of the rest of the batch, input gradients are neither zero nor
  non-finite, accuracy ≈ 0 at very large ε, random noise is far weaker than the attack, more
  steps or restarts barely help, a gradient-free attack (Square) breaks almost nothing the
  strongest gradient attack left robust; and accuracy never rises with ε when the attack runs
  from scratch at each ε (which replaces the table's check, because the sweep's ε-monotone
  reuse makes its curve monotone by construction);
* :mod:`~robustkit.checks.runner`: :func:`run_checks` (all of them, in report order);
* :mod:`~robustkit.checks.verdicts`: :func:`unreliable_attacks` (which numbers the failed
  checks discredit) and :func:`flag_results`.

The names below are resolved on first use (PEP 562): the model checks need torch, a report
reading verdicts does not.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

#: Public name → the module that defines it, imported on first use.
_EXPORTS = {
    "MASKING_SUSPECTED": "robustkit.checks.model",
    "check_accuracy_at_large_eps": "robustkit.checks.model",
    "check_accuracy_monotone_in_eps_from_scratch": "robustkit.checks.model",
    "check_attack_converged": "robustkit.checks.model",
    "check_batch_independent": "robustkit.checks.model",
    "check_forward_deterministic": "robustkit.checks.model",
    "check_gradient_free_finds_no_more": "robustkit.checks.model",
    "check_input_gradients_usable": "robustkit.checks.model",
    "check_noise_weaker_than_attack": "robustkit.checks.model",
    "check_outputs_are_logits": "robustkit.checks.model",
    "CHECK_COLUMNS": "robustkit.checks.record",
    "Check": "robustkit.checks.record",
    "checks_frame": "robustkit.checks.record",
    "grade": "robustkit.checks.record",
    "worst_status": "robustkit.checks.record",
    "ITERATIVE": "robustkit.checks.results",
    "attack_configs": "robustkit.checks.results",
    "check_accuracy_monotone_in_eps": "robustkit.checks.results",
    "check_iterative_beats_single_step": "robustkit.checks.results",
    "check_pgd_step_budget": "robustkit.checks.results",
    "convergence_eps": "robustkit.checks.runner",
    "main_attack": "robustkit.checks.runner",
    "run_checks": "robustkit.checks.runner",
    "GRADIENT_FREE": "robustkit.checks.verdicts",
    "UNRELIABLE": "robustkit.checks.verdicts",
    "checks_from_results": "robustkit.checks.verdicts",
    "flag_results": "robustkit.checks.verdicts",
    "unreliable_attacks": "robustkit.checks.verdicts",
    "STATUSES": "robustkit.vocabulary",
    "Status": "robustkit.vocabulary",
}

__all__ = [
    "CHECK_COLUMNS",
    "GRADIENT_FREE",
    "ITERATIVE",
    "MASKING_SUSPECTED",
    "STATUSES",
    "UNRELIABLE",
    "Check",
    "Status",
    "attack_configs",
    "check_accuracy_at_large_eps",
    "check_accuracy_monotone_in_eps",
    "check_accuracy_monotone_in_eps_from_scratch",
    "check_attack_converged",
    "check_batch_independent",
    "check_forward_deterministic",
    "check_gradient_free_finds_no_more",
    "check_input_gradients_usable",
    "check_iterative_beats_single_step",
    "check_noise_weaker_than_attack",
    "check_outputs_are_logits",
    "check_pgd_step_budget",
    "checks_frame",
    "checks_from_results",
    "convergence_eps",
    "flag_results",
    "grade",
    "main_attack",
    "run_checks",
    "unreliable_attacks",
    "worst_status",
]

if TYPE_CHECKING:
    from robustkit.checks.model import (
        MASKING_SUSPECTED,
        check_accuracy_at_large_eps,
        check_accuracy_monotone_in_eps_from_scratch,
        check_attack_converged,
        check_batch_independent,
        check_forward_deterministic,
        check_gradient_free_finds_no_more,
        check_input_gradients_usable,
        check_noise_weaker_than_attack,
        check_outputs_are_logits,
    )
    from robustkit.checks.record import CHECK_COLUMNS, Check, checks_frame, grade, worst_status
    from robustkit.checks.results import (
        ITERATIVE,
        attack_configs,
        check_accuracy_monotone_in_eps,
        check_iterative_beats_single_step,
        check_pgd_step_budget,
    )
    from robustkit.checks.runner import convergence_eps, main_attack, run_checks
    from robustkit.checks.verdicts import (
        GRADIENT_FREE,
        UNRELIABLE,
        checks_from_results,
        flag_results,
        unreliable_attacks,
    )
    from robustkit.vocabulary import STATUSES, Status


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'robustkit.checks' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
