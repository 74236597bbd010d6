"""``robustkit certify --report DIR``: the certified-bounds stage added to a finished evaluation
equals the stage run with the sweep, and a report is never bracketed with another model's
certificate."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import run

pytestmark = pytest.mark.usefixtures("mnist_root")

SWEEP = ("attack", "--model", "zoo:mnist_mlp", "--attack", "pgd", "--eps", "0,0.01,0.02",
         "--n", "60", "-q")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same sweep twice: with ``--certify`` (``direct``), and without (``bare``)."""
    root = tmp_path_factory.mktemp("certify-report")
    direct, bare = root / "direct", root / "bare"
    for out, extra in ((direct, ("--certify", "ibp,crown-ibp")), (bare, ())):
        done = run(*SWEEP, *extra, "--out", str(out))
        assert done.returncode == 0, done.stderr
    return direct, bare


def test_bounds_added_later_equal_the_bounds_run_with_the_sweep(
        sweeps: tuple[Path, Path], tmp_path: Path) -> None:
    direct, bare = sweeps
    later = tmp_path / "later"
    shutil.copytree(bare, later)
    done = run("certify", "--report", str(later), "--method", "ibp,crown-ibp")
    assert done.returncode == 0, done.stderr
    timing = ["seconds"]
    pd.testing.assert_frame_equal(pd.read_csv(later / "certified.csv").drop(columns=timing),
                                  pd.read_csv(direct / "certified.csv").drop(columns=timing))
    for name in ("per_sample.csv", "checks.csv", "results.csv"):
        assert (later / name).read_bytes() == (direct / name).read_bytes(), name
    settings = json.loads((later / "settings.json").read_text())
    assert settings["certify"] == ["ibp", "crown-ibp"]
    added = json.loads((later / "manifest.json").read_text())["certified_added"]
    assert added["methods"] == ["ibp", "crown-ibp"] and "--report" in added["command_line"]
    report = (later / "report.md").read_text()
    assert "## Certified bounds" in report and "certified bounds added by `" in report
    assert report.splitlines()[0] == (bare / "report.md").read_text().splitlines()[0]
    # run again: one consistency check, not two
    again = run("certify", "--report", str(later), "--method", "ibp")
    assert again.returncode == 0, again.stderr
    checks = pd.read_csv(later / "checks.csv")
    assert (checks["name"] == "certified_not_broken").sum() == 1
    assert set(pd.read_csv(later / "certified.csv")["method"]) == {"ibp"}


@pytest.mark.parametrize(("args", "message"), [
    (("--model", "zoo:mnist_cnn", "--method", "ibp"),
     "error: the weights of zoo:mnist_cnn are not the ones the report evaluated"),
    (("--eps", "0.1"), "error: --eps with --report: the bounds are computed on the report's "
                       "own images, ε and norm; leave --eps out"),
    (("--model", "zoo:mnist_mlp", "--normalize", "0.1307,0.3081", "--method", "ibp"),
     "error: the model zoo:mnist_mlp gives the report's example pictures probabilities up to"),
])
def test_another_model_or_sweep_is_refused_and_the_folder_kept(
        sweeps: tuple[Path, Path], tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    _, bare = sweeps
    folder = tmp_path / "kept"
    shutil.copytree(bare, folder)
    before = _digest(folder)
    done = run("certify", "--report", str(folder), *args)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1
    assert _digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no staging folder left


def test_other_labels_are_refused(sweeps: tuple[Path, Path], tmp_path: Path) -> None:
    _, bare = sweeps
    folder = tmp_path / "relabelled"
    shutil.copytree(bare, folder)
    per_sample = pd.read_csv(folder / "per_sample.csv")
    per_sample.loc[3, "label"] = (int(per_sample["label"].iloc[3]) + 1) % 10
    per_sample.to_csv(folder / "per_sample.csv", index=False)
    done = run("certify", "--report", str(folder), "--method", "ibp")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: --report {folder}: 1 of 60 labels of mnist differ "
                                   "from the report's: give the data it evaluated with --data")


def test_an_earlier_failed_certification_is_replaced_not_kept(sweeps: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    """A folder whose earlier bounds failed the consistency check (its results flagged): once
    certified again and passing, its results are the sweep's unflagged ones."""
    from robustkit.results import UNRELIABLE_COLUMN

    direct, bare = sweeps
    folder = tmp_path / "refailed"
    shutil.copytree(bare, folder)
    results = pd.read_csv(folder / "results.csv")
    reason = "1 sample(s) certified at an ε where an attack broke them"
    results[UNRELIABLE_COLUMN] = [reason if e > 0 else "" for e in results["eps"]]
    results.to_csv(folder / "results.csv", index=False)
    checks = pd.read_csv(folder / "checks.csv")
    failed = {"name": "certified_not_broken", "status": "fail", "value": 1.0,
              "threshold": "0 samples", "detail": reason}
    pd.concat([checks, pd.DataFrame([failed])]).to_csv(folder / "checks.csv", index=False)
    done = run("certify", "--report", str(folder), "--method", "ibp,crown-ibp")
    assert done.returncode == 0, done.stderr
    for name in ("results.csv", "checks.csv"):
        assert (folder / name).read_bytes() == (direct / name).read_bytes(), name
