"""Reading an evaluation run folder into memory, tolerating missing optional files.

Only ``results.csv`` is required. Every other file (``per_sample.csv``, ``timings.csv``,
``examples.safetensors``, ``settings.json``, ``manifest.json``, ``metrics.csv``, ``config.toml``,
``checks.csv``, ``reference.json``) adds a part of the report when present; one that is present
but unreadable is skipped and named in :attr:`RunData.problems`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors import SafetensorError
from safetensors.numpy import load_file

from robustkit.errors import RobustkitError
from robustkit.records import MANIFEST, SETTINGS, Manifest, RunSettings
from robustkit.storage import UnreadableJsonError, read_json

RESULT_REQUIRED = ("model", "attack", "eps", "accuracy")
EXAMPLES_FILE = "examples.safetensors"


@dataclass
class RunData:
    """One run folder's contents; absent optional parts are None. ``path`` names the run (a
    staging folder reads as its final place); ``folder`` is where its files are read now."""

    path: Path
    name: str
    results: pd.DataFrame
    per_sample: pd.DataFrame | None = None
    timings: pd.DataFrame | None = None
    examples: dict[str, np.ndarray] | None = None
    settings: RunSettings = field(default_factory=RunSettings)
    manifest: Manifest = field(default_factory=Manifest)
    metrics: pd.DataFrame | None = None
    config_text: str | None = None
    checks: pd.DataFrame | None = None
    reference: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    folder: Path | None = None

    @property
    def files(self) -> Path:
        """The folder to read the run's files from."""
        return self.folder or self.path

    @property
    def models(self) -> list[str]:
        return [str(m) for m in self.results["model"].unique()]


def _read_results(path: Path) -> pd.DataFrame:
    file = path / "results.csv"
    if not path.is_dir():
        raise RobustkitError(
            f"{path} is not a folder: pass an evaluation run folder "
            "(written by robustkit attack or robustkit run)"
        )
    if not file.is_file():
        raise RobustkitError(
            f"{path} has no results.csv: pass an evaluation run folder, or run "
            f"robustkit attack --out {path} first"
        )
    try:
        frame = pd.read_csv(file)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise RobustkitError(
            f"{file} is not a readable CSV ({exc}): re-run the evaluation to rewrite it"
        ) from None
    missing = [c for c in RESULT_REQUIRED if c not in frame.columns]
    if missing:
        raise RobustkitError(
            f"{file} lacks the columns {', '.join(missing)}: it is not a "
            "robustkit results table; re-run the evaluation to rewrite it"
        )
    if frame.empty:
        raise RobustkitError(f"{file} holds no rows: re-run the evaluation")
    frame = frame.copy()
    frame["model"] = frame["model"].astype(str)
    frame["attack"] = frame["attack"].astype(str)
    if "norm" not in frame.columns:
        frame["norm"] = "linf"
    return frame


def _optional_csv(path: Path, problems: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        problems.append(f"{path.name} skipped: not a readable CSV ({exc})")
        return None


def _optional_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except UnreadableJsonError as exc:
        problems.append(f"{path.name} skipped: {exc.reason}")
        return None


def _optional_examples(path: Path, problems: list[str]) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        problems.append(f"{path.name} skipped: not a readable safetensors file ({exc})")
        return None


def load_run(path: Path, shown: Path | None = None) -> RunData:
    """Read one run folder; raise :class:`RobustkitError` when it has no usable results.csv.

    ``shown``: the path to name the run by (a staging folder reads as its final place)."""
    path = Path(path)
    shown = shown or path
    results = _read_results(path)
    problems: list[str] = []
    config = path / "config.toml"
    config_text = None
    if config.is_file():
        try:
            config_text = config.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"config.toml skipped: {exc}")
    checks = _optional_csv(path / "checks.csv", problems)
    if checks is not None and not {"name", "status"} <= set(checks.columns):
        problems.append("checks.csv skipped: it lacks the columns name and status")
        checks = None
    per_sample = _optional_csv(path / "per_sample.csv", problems)
    if per_sample is not None and not {"index", "label", "clean_pred"} <= set(per_sample.columns):
        problems.append("per_sample.csv skipped: it lacks the columns index, label, clean_pred")
        per_sample = None
    return RunData(
        path=shown,
        name=shown.resolve().name or str(shown),
        results=results,
        per_sample=per_sample,
        timings=_optional_csv(path / "timings.csv", problems),
        examples=_optional_examples(path / EXAMPLES_FILE, problems),
        settings=RunSettings.from_record(_optional_json(path / SETTINGS, problems) or {}),
        manifest=Manifest.from_record(_optional_json(path / MANIFEST, problems) or {}),
        metrics=_optional_csv(path / "metrics.csv", problems),
        config_text=config_text,
        checks=checks,
        reference=_optional_json(path / "reference.json", problems),
        problems=problems,
        folder=path,
    )


def load_runs(paths: list[Path], shown: Callable[[Path], Path] | None = None
              ) -> list[RunData]:
    """Read every folder; give models that share a name across folders distinct names.
    ``shown`` maps a folder to the path it is named by (default: itself)."""
    if not paths:
        raise RobustkitError("no run folder given: pass at least one evaluation run folder")
    runs = [load_run(Path(p), shown(Path(p)) if shown else None) for p in paths]
    names: set[str] = set()
    for i, run in enumerate(runs):  # folder names label the runs: make them unique first
        if run.name in names:
            run.name = f"{run.name}-{i + 1}"
        names.add(run.name)
    seen: dict[str, int] = {}
    for run in runs:
        for model in run.models:
            seen[model] = seen.get(model, 0) + 1
    for run in runs:
        rename = {m: f"{m} ({run.name})" for m in run.models if seen[m] > 1}
        if rename:
            run.results["model"] = run.results["model"].replace(rename)
            for frame in (run.timings, run.checks):
                if frame is not None and "model" in frame.columns:
                    frame["model"] = frame["model"].astype(str).replace(rename)
    return runs
