"""The example pictures' class probabilities as a stage (the report draws them)."""

from __future__ import annotations

from dataclasses import dataclass

from robustkit.reporting import add_probabilities
from robustkit.stages.base import SweepDone


@dataclass(frozen=True)
class ExampleProbabilities:
    """The model's softmax on the clean and adversarial examples kept by the sweep, added to
    ``examples.safetensors`` (:func:`robustkit.reporting.add_probabilities`)."""

    title: str = "the example pictures"

    def run(self, done: SweepDone) -> SweepDone:
        add_probabilities(done.folder / "examples.safetensors", done.model)
        return done
