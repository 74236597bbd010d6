"""Certified robustness: lower bounds on the margins over the ε-ball (:mod:`.bounds`), so that
a report brackets the truth, certified ≤ true robust accuracy ≤ attacked."""

from robustkit.certify.bounds import (
    BOUND_NORMS,
    METHODS,
    BoundNorm,
    Bounds,
    Method,
    certified_accuracy,
    margin_bounds,
    network_steps,
)

__all__ = ["BOUND_NORMS", "METHODS", "BoundNorm", "Bounds", "Method", "certified_accuracy",
           "margin_bounds", "network_steps"]
