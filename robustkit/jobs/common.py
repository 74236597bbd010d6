"""What both jobs share: the post-sweep stages they run, the settings and provenance entries
of data and physical-world tables, the report built in a staging folder, the sweep state an
interrupted job keeps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from robustkit.checks import unreliable_attacks
from robustkit.config import AttackConfig, DefenceConfig, ReferenceConfig, TransformConfig, to_dict
from robustkit.data import DATASETS, Dataset, Split
from robustkit.jobs.outcome import SweepOutcome
from robustkit.outputs import staging_path
from robustkit.reporting import build_report
from robustkit.runs import STATE_DIR
from robustkit.stages import (
    CertifiedBounds,
    ExampleProbabilities,
    PaperReference,
    PhysicalWorld,
    SanityChecks,
    SavedAdversarial,
    Stage,
    SweepDone,
)
from robustkit.vocabulary import CertifyMethod, ChecksLevel, SaveAdversarial


def post_sweep_stages(*, level: ChecksLevel, attacks: Sequence[AttackConfig],
                      eps: Sequence[float], transforms: TransformConfig | None,
                      reference: ReferenceConfig | None = None,
                      certify: Sequence[CertifyMethod] = (),
                      save_adversarial: SaveAdversarial | None = None) -> list[Stage]:
    """The stages after a sweep, in order: the checks (which flag what they discredit), the
    certified bounds (``certify``: their consistency with the attacks is one more check), the
    example pictures, the adversarial examples on disk (``save_adversarial``), the paper
    reference (a config's ``[reference]``), robustness under transformation."""
    stages: list[Stage] = [SanityChecks(level)]
    if certify:  # the attacks share one norm the bounds cover (config and CLI check it)
        stages.append(CertifiedBounds(tuple(certify), norm=attacks[0].norm if attacks else "linf"))
    stages.append(ExampleProbabilities())
    if save_adversarial is not None:
        stages.append(SavedAdversarial(save_adversarial))
    if reference is not None:
        stages.append(PaperReference(reference))
    stages.append(PhysicalWorld(attacks, transforms, eps))
    return stages


def sweep_outcome(done: SweepDone | None, evaluation: Any, level: ChecksLevel,
                  caption: str) -> SweepOutcome:
    """What is shown of a sweep: after its stages on rank 0 (``done``), the bare evaluation
    elsewhere."""
    if done is None:
        return SweepOutcome(evaluation, None, level, None, caption)
    results = done.evaluation.results
    unreliable = unreliable_attacks(done.checks, done.settings, results["attack"].unique())
    return SweepOutcome(done.evaluation, done.checks, level, unreliable, caption,
                        done.certified)


def data_settings(data: Dataset) -> dict[str, Any]:
    """What identifies data beyond the built-in sets: their class names and checksum (left out
    for MNIST and Fashion-MNIST, whose files are md5-checked, so earlier settings still match)."""
    if data.name in DATASETS:
        return {}
    return {"classes": list(data.classes), "data_sha256": data.provenance.get("data_sha256")}


def data_provenance(data: Dataset, split: Split) -> dict[str, Any]:
    """The data's source, size and checksum for the manifest (and the report's provenance)."""
    c, h, w = data.in_shape
    return {**data.provenance,
            "data_evaluated": f"{len(split)} {c}×{h}×{w} images of {data.name}"}


def physical_settings(defence: DefenceConfig | None, transforms: TransformConfig | None
                      ) -> dict[str, Any]:
    """The settings entries of a defence and a transformation distribution, when declared."""
    entries: dict[str, Any] = {}
    if defence is not None:
        entries["defence"] = to_dict(defence)
    if transforms is not None:
        entries["transforms"] = to_dict(transforms)
    return entries


def report_folders(folder: Path, run_dirs: list[Path], title: str,
                   log: Callable[[str], None], shown_as: Path) -> dict[str, str]:
    """Build the report in the staging ``folder`` as the one it becomes, ``shown_as``."""
    paths = build_report(run_dirs, folder, title=title, shown_as=shown_as)
    final = {kind: shown_as / p.relative_to(folder) for kind, p in paths.items()}
    log(f"report: {', '.join(str(p) for p in final.values())}")
    return {f"report_{kind}": str(path) for kind, path in final.items()}


def keep_sweep(folder: Path, seed_dirs: Sequence[str | None]) -> Callable[[Path], bool]:
    """What of an interrupted job's staging folder to keep: the sweep states of this layout
    (``sweep-state/``, or ``seed-S/sweep-state/`` per seed); they resume when their
    fingerprint matches and are replaced otherwise."""
    work = staging_path(folder)
    wanted = {work / d / STATE_DIR if d else work / STATE_DIR for d in seed_dirs}
    return lambda path: path in wanted


def silent(message: str) -> None:
    """What ranks other than 0 print: nothing."""
