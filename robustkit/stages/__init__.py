"""Post-sweep stages (:mod:`.base` gives the interface): the sanity checks, the example
pictures' probabilities, a paper's reference figure, robustness under transformation,
certified bounds, the adversarial examples on disk."""

from robustkit.stages.adversarial import SavedAdversarial
from robustkit.stages.base import Stage, SweepDone, as_model_failure, run_stages
from robustkit.stages.certified import CertifiedBounds, check_certifiable
from robustkit.stages.checks import SanityChecks, discredit
from robustkit.stages.examples import ExampleProbabilities
from robustkit.stages.physical import PhysicalWorld
from robustkit.stages.reference import PaperReference

__all__ = ["CertifiedBounds", "ExampleProbabilities", "PaperReference", "PhysicalWorld",
           "SanityChecks", "SavedAdversarial", "Stage", "SweepDone", "as_model_failure",
           "check_certifiable", "discredit", "run_stages"]
