"""The preprocessing defences described without torch: their default parameters, which are
random, and their one-line description (:mod:`robustkit.models.defences` builds them; the report
describes a run's defence from its settings without loading torch)."""

from __future__ import annotations

from robustkit.vocabulary import Preprocess

#: ``bit-depth``'s bits, ``median``'s window size and ``noise``'s σ when the config sets none.
DEFAULT_BITS, DEFAULT_SIZE, DEFAULT_SIGMA = 3, 3, 0.3
#: The steps whose forward pass draws fresh noise (attack them with EOT).
RANDOM_STEPS: frozenset[Preprocess] = frozenset({"noise"})


def describe_step(kind: Preprocess, *, bits: int | None = None, size: int | None = None,
                  sigma: float | None = None) -> str:
    """``bit-depth reduction to 3 bits``, ``3×3 median filter``, ``random Gaussian noise σ =
    0.3``: the step ``kind`` with its parameters (defaults where None)."""
    if kind == "bit-depth":
        return f"bit-depth reduction to {DEFAULT_BITS if bits is None else bits} bits"
    if kind == "median":
        k = DEFAULT_SIZE if size is None else size
        return f"{k}×{k} median filter"
    return f"random Gaussian noise σ = {DEFAULT_SIGMA if sigma is None else sigma:g}"
