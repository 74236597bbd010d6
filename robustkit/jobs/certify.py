"""The certify job behind ``robustkit certify --report DIR``: the certified-bounds stage run on
a finished evaluation, so that a report made without ``certify`` gains its lower bound without
attacking again.

The stage (:class:`~robustkit.stages.CertifiedBounds`) needs what the sweep had: the model,
the same test images, the ε and the norm, and each sample's smallest breaking ε (for the
check ``certified_not_broken``). The folder holds all but the model and the images; this job
takes those again and proves they are the ones the report evaluated before any bound runs:

* the images are the report's own (``per_sample.csv``'s ``index`` into the test split) and
  their labels must equal the report's ``label`` column;
* a checkpoint's weights must have the sha256 the report's manifest recorded (where it did);
* the model's clean predictions on them must equal the report's ``clean_pred`` column, on
  every image, and its softmax on the example pictures (clean and adversarial, kept in
  ``examples.safetensors``) the probabilities recorded there, within
  :data:`PROBABILITY_TOLERANCE` (predictions alone can agree between two accurate models).

A different checkpoint, a missing ``--normalize`` or other data fails here with one line,
instead of bracketing one model's attacks with another's certificate.

The work happens in a copy of the folder that replaces it whole (as every job's output does):
``certified.csv``, the ``certified_eps`` column, the check, the settings' ``certify``, the
manifest's ``certified_added`` record (command, code, machine, date) and the report rebuilt,
its "Made by" line naming both commands. An interrupted job leaves the folder as it was.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch

from robustkit.certify import BOUND_NORMS
from robustkit.checkpoint import checkpoint_paths
from robustkit.checks.record import CHECK_COLUMNS
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.evaluation import Evaluation
from robustkit.models import load_model, parse_normalize
from robustkit.outputs import prepare_staging, refuse_working_folder, staging_path, swap_in, writing
from robustkit.released import file_sha256
from robustkit.reporting import build_report
from robustkit.reporting.build import removed_on_failure
from robustkit.reporting.load import RunData, load_runs
from robustkit.results import UNRELIABLE_COLUMN
from robustkit.runs import write_frame
from robustkit.runtime import command_line, provenance
from robustkit.sources import load_data
from robustkit.stages import CertifiedBounds, SweepDone, as_model_failure, check_certifiable
from robustkit.stages.certified import CHECK_NAME
from robustkit.storage import write_json
from robustkit.vocabulary import CertifyMethod

#: How far the model's softmax on the report's example pictures may lie from the recorded one
#: (float32 on another device or library version moves it by about 1e-6).
PROBABILITY_TOLERANCE = 1e-3
#: The file of a report folder that holds the weights it evaluated (``robustkit run``).
REPORT_WEIGHTS = "model.safetensors"


def certify_report(folder: Path, methods: Sequence[CertifyMethod], *,
                   model: str | None = None, weights: Path | None = None,
                   normalize: str | None = None, data_source: str | None = None,
                   data_dir: Path | None = None, app_dir: Path | None = None,
                   batch_size: int = 100, log: Callable[[str], None] = print
                   ) -> pd.DataFrame:
    """Add the certified bounds by ``methods`` to the finished evaluation in ``folder`` at its
    own ε and norm (see the module docstring); returns ``certified.csv``'s table.

    ``model`` defaults to the folder's own weights (``model.safetensors``, written by
    ``robustkit run``), else to the model its settings name when that is a released one
    (``zoo:NAME``); ``normalize`` to the settings' own; ``data_source`` to the settings'
    data set."""
    refuse_working_folder(folder)
    with writing([(folder, "--report")]):
        run = _finished_run(folder)
        per_sample = _per_sample(run)
        norm = _report_norm(run)
        spec = model or _report_model(run)
        stats = normalize if normalize is not None else run.settings.normalize
        net, info = load_model(spec, weights=weights, app_dir=app_dir,
                               normalize=parse_normalize(stats) if stats else None)
        _check_same_weights(run, info, spec)
        check_certifiable(net, methods, "--method")
        split = _report_images(run, per_sample, data_source, data_dir)
        as_model_failure(spec, "the prediction check", folder,
                         lambda: _check_same_model(net, split, per_sample, spec, batch_size))
        as_model_failure(spec, "the probability check", folder,
                         lambda: _check_same_probabilities(net, run, spec))
        started = time.perf_counter()
        work = staging_path(folder)
        with removed_on_failure(work, folder):
            prepare_staging(folder)
            _copy_into(folder, work)
            done = CertifiedBounds(tuple(methods), norm=norm).run(SweepDone(
                model=net, split=split, evaluation=_evaluation(run, per_sample, work),
                checks=_other_checks(run.checks), settings=dict(run.settings.record),
                folder=work, shown=folder, seed=int(run.settings.record.get("seed", 0)),
                batch_size=batch_size, progress=False, log=log))
            _record(work, run, methods, time.perf_counter() - started)
            made_by = f"{run.manifest.command_line or run.manifest.command or 'unknown'}; " \
                      f"certified bounds added by `{command_line()}`"
            build_report([work], work, title=_title(run), made_by=made_by, shown_as=folder)
            swap_in(work, folder)
    assert done.certified is not None
    return done.certified


def _finished_run(folder: Path) -> RunData:
    """The run in ``folder``: one evaluation with its per-sample file and settings, not a
    seed of a report over several (whose summary this job would leave stale)."""
    run = load_runs([folder])[0]
    if folder.resolve().name.startswith("seed-") and (folder.resolve().parent /
                                                      "report.md").is_file():
        raise RobustkitError(
            f"--report {folder} is one seed of a report over several seeds: add "
            "evaluate.certify to the experiment's config and run it again")
    if run.per_sample is None or "index" not in run.per_sample:
        raise RobustkitError(
            f"--report {folder} has no readable per_sample.csv: certify a folder written by "
            "robustkit attack or robustkit run")
    if not run.settings.eps:
        raise RobustkitError(
            f"--report {folder} has no readable settings.json with the swept ε: run the "
            "evaluation again")
    if run.settings.defence:
        raise RobustkitError(
            f"--report {folder} evaluated a model behind a preprocessing defence, which the "
            "bounds do not cover: certify the bare model with robustkit certify --model")
    return run


def _per_sample(run: RunData) -> pd.DataFrame:
    """``per_sample.csv`` as the sweep wrote it (without an earlier ``certified_eps``)."""
    assert run.per_sample is not None
    return run.per_sample.drop(columns=["certified_eps"], errors="ignore")


def _report_norm(run: RunData) -> str:
    """The one norm of the report's attacks, which the bounds must cover."""
    norms = sorted({str(a.get("norm", "linf")) for a in run.settings.attacks}) or ["linf"]
    if len(norms) > 1 or norms[0] not in BOUND_NORMS:
        raise RobustkitError(
            f"--report {run.path} swept the norm(s) {', '.join(norms)}: certification "
            f"covers one of {', '.join(BOUND_NORMS)}")
    return norms[0]


def _report_model(run: RunData) -> str:
    """The model the report evaluated, where the folder says it without doubt."""
    own = run.files / REPORT_WEIGHTS
    if own.is_file():
        return str(own)
    named = run.settings.model or ""
    if named.startswith("zoo:"):
        return named
    raise RobustkitError(
        f"--report {run.path} holds no {REPORT_WEIGHTS}: give the model it evaluated with "
        f"--model{f' ({named})' if named else ''}")


def _report_images(run: RunData, per_sample: pd.DataFrame, data_source: str | None,
                   data_dir: Path | None) -> Split:
    """The report's test images, by ``per_sample.csv``'s index, their labels checked."""
    source = data_source or run.settings.dataset or "mnist"
    data = load_data(source, data_dir=data_dir, val_size=0, parts=("test",))
    index = torch.tensor(per_sample["index"].to_numpy(dtype="int64"))
    if len(index) and int(index.max()) >= len(data.test):
        raise RobustkitError(
            f"--report {run.path} evaluated test image {int(index.max())}, but {source} has "
            f"{len(data.test)}: give the data it evaluated with --data")
    split = Split(data.test.images[index], data.test.labels[index])
    differ = int((split.labels != torch.tensor(per_sample["label"].to_numpy(dtype="int64"))).sum())
    if differ:
        raise RobustkitError(
            f"--report {run.path}: {differ} of {len(split)} labels of {source} differ from the "
            "report's: give the data it evaluated with --data")
    return split


def _check_same_weights(run: RunData, info: dict[str, object], spec: str) -> None:
    """A checkpoint's weights must be the bytes the report recorded, where it recorded them."""
    recorded = run.manifest.weights_sha256
    if not recorded or info.get("kind") != "checkpoint":
        return
    weights, _ = checkpoint_paths(Path(str(info["path"])))
    if file_sha256(weights) != recorded:
        raise RobustkitError(
            f"the weights of {spec} are not the ones the report evaluated (its manifest "
            f"records sha256 {recorded[:12]}…): give the model the report evaluated")


def _check_same_model(net: torch.nn.Module, split: Split, per_sample: pd.DataFrame, spec: str,
                      batch_size: int) -> None:
    """The model must predict, image for image, what the report recorded it predicting."""
    with torch.no_grad():
        predicted = torch.cat([net(split.images[i:i + batch_size]).argmax(1)
                               for i in range(0, len(split), batch_size)])
    recorded = torch.tensor(per_sample["clean_pred"].to_numpy(dtype="int64"))
    differ = int((predicted != recorded).sum())
    if differ:
        raise RobustkitError(
            f"the model {spec} predicts differently from the report's model on {differ} of "
            f"{len(split)} clean images: give the model (and --normalize) the report evaluated")


def _title(run: RunData) -> str:
    """The report's own title (its first line), else the experiment's or the folder's name."""
    report = run.files / "report.md"
    first = report.read_text(encoding="utf-8").splitlines()[:1] if report.is_file() else []
    if first and first[0].startswith("# "):
        return first[0][2:].strip()
    return run.settings.experiment or run.name


def _check_same_probabilities(net: torch.nn.Module, run: RunData, spec: str) -> None:
    """The model's softmax on the report's example pictures (clean ``clean`` and adversarial
    ``adv/CELL``) must be the recorded ``clean_probs`` and ``adv_probs/CELL``."""
    if run.examples is None:
        return
    pairs = [("clean", "clean_probs")] + [
        (key, "adv_probs/" + key.removeprefix("adv/")) for key in run.examples
        if key.startswith("adv/")]
    gap = 0.0
    with torch.no_grad():
        for images, probs in pairs:
            if images in run.examples and probs in run.examples:
                x = torch.from_numpy(run.examples[images].copy()).float()
                recorded = torch.from_numpy(run.examples[probs].copy()).float()
                gap = max(gap, float((net(x).softmax(1) - recorded).abs().max()))
    if gap > PROBABILITY_TOLERANCE:
        raise RobustkitError(
            f"the model {spec} gives the report's example pictures probabilities up to "
            f"{gap:.3g} away from the recorded ones: give the model (and --normalize) the "
            "report evaluated")


def _copy_into(folder: Path, work: Path) -> None:
    shutil.copytree(folder, work, symlinks=True, dirs_exist_ok=True)


def _evaluation(run: RunData, per_sample: pd.DataFrame, work: Path) -> Evaluation:
    """The sweep as the folder keeps it (what the stage reads: results, per-sample worst
    cases). Flags an earlier certification's failed check put on the results are lifted
    (``results.csv`` rewritten in ``work``): the stage flags them again from the checks that
    stand, its own new one included."""
    results = run.results
    if UNRELIABLE_COLUMN in results:
        results = results.drop(columns=UNRELIABLE_COLUMN)
        write_frame(work / "results.csv", results)
    timings = run.timings if run.timings is not None else pd.DataFrame()
    return Evaluation(results=results, per_sample=per_sample, timings=timings,
                      examples={}, notes=list(run.manifest.notes))


def _other_checks(checks: pd.DataFrame | None) -> pd.DataFrame | None:
    """The folder's checks without an earlier ``certified_not_broken`` (the stage adds it)."""
    if checks is None or "name" not in checks:
        return checks
    kept = checks[checks["name"] != CHECK_NAME].reset_index(drop=True)
    return kept if len(kept) else pd.DataFrame(columns=CHECK_COLUMNS)


def _record(work: Path, run: RunData, methods: Sequence[str], seconds: float) -> None:
    """The settings name the methods; the manifest says who added the bounds, when, where."""
    settings = {**run.settings.record, "certify": list(methods)}
    write_json(work / "settings.json", settings)
    added = {**provenance(torch.device("cpu")), "methods": list(methods), "seconds": seconds}
    added.pop("seed", None)
    write_json(work / "manifest.json", {**run.manifest.record, "certified_added": added})
