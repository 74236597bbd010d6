"""A paper's figure beside robustkit's, as a stage: ``reference.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from robustkit.config import ReferenceConfig
from robustkit.errors import RobustkitError
from robustkit.evaluation import Evaluation
from robustkit.stages.base import SweepDone
from robustkit.storage import write_json


@dataclass(frozen=True)
class PaperReference:
    """robustkit's error rate under ``reference.attack`` at ``reference.eps`` beside the
    paper's (the config's ``[reference]`` table)."""

    reference: ReferenceConfig
    title: str = "the paper reference"

    def run(self, done: SweepDone) -> SweepDone:
        write_json(done.folder / "reference.json", reference_record(self.reference,
                                                                    done.evaluation))
        return done


def reference_record(reference: ReferenceConfig, evaluation: Evaluation) -> dict[str, Any]:
    """``reference.json``: the paper's error rate and ours, for the same attack and ε."""
    res = evaluation.results
    row = res[(res["attack"] == reference.attack) & (res["eps"] - reference.eps).abs().lt(1e-9)]
    if row.empty:
        raise RobustkitError(
            f"reference: the sweep has no {reference.attack} row at ε = {reference.eps:g}; add "
            "that attack and ε to the config"
        )
    return {"source": reference.source, "note": reference.note, "value": reference.error,
            "metric": f"error rate under {reference.attack} at ε = {reference.eps:g}",
            "ours": float(1 - row["accuracy"].iloc[0])}
