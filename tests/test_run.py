"""`robustkit run` end to end: reuse, determinism, multi-seed, resumable sweeps, folder guard."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import run, tiny_config

TINY = tiny_config()



@pytest.fixture
def workdir(tmp_path: Path, mnist_root: Path) -> Path:
    (tmp_path / "tiny.toml").write_text(TINY)
    return tmp_path


def test_run_twice_gives_identical_results_and_reuses_the_checkpoint(workdir: Path) -> None:
    first = run("run", "tiny.toml", "-q", cwd=workdir)
    assert first.returncode == 0, first.stderr
    report = workdir / "reports" / "tiny"
    for name in ("results.csv", "per_sample.csv", "timings.csv", "checks.csv", "metrics.csv",
                 "config.toml", "manifest.json", "report.html", "report.md"):
        assert (report / name).is_file(), name
    results = (report / "results.csv").read_bytes()
    per_sample = (report / "per_sample.csv").read_bytes()
    second = run("run", "tiny.toml", "-q", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert "reusing" in second.stderr
    assert (report / "results.csv").read_bytes() == results
    assert (report / "per_sample.csv").read_bytes() == per_sample
    retrained = run("run", "tiny.toml", "-q", "--retrain", "--out", "again", cwd=workdir)
    assert retrained.returncode == 0, retrained.stderr
    assert "training softmax" in retrained.stderr
    assert (workdir / "again" / "results.csv").read_bytes() == results  # bitwise on CPU


def test_run_reuses_the_checkpoint_train_made(workdir: Path) -> None:
    """`train` then `run` of one config: the run finds train's checkpoint where it looks, the
    folder guard takes it for the same experiment, and nothing is trained twice."""
    trained = run("train", "tiny.toml", "-q", cwd=workdir)
    assert trained.returncode == 0, trained.stderr
    weights = workdir / "runs" / "tiny" / "seed-0" / "model-best.safetensors"
    assert weights.is_file()
    before = weights.read_bytes()
    evaluated = run("run", "tiny.toml", "-q", cwd=workdir)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "seed 0: reusing runs/tiny/seed-0/model-best" in evaluated.stderr
    assert "training softmax" not in evaluated.stderr
    assert "already holds" not in evaluated.stderr and "replacing" not in evaluated.stderr
    assert weights.read_bytes() == before
    manifest = json.loads((workdir / "reports" / "tiny" / "manifest.json").read_text())
    assert manifest["reused_checkpoint"] is True


@pytest.mark.slow
def test_an_experiment_with_the_same_training_takes_anothers_finished_training(
        workdir: Path) -> None:
    """Two configs that differ only in name (so in everything but data, model, training and
    seed too, in general) share one training: the second copies the first's checkpoint into
    its own folder, owns the copy, evaluates the same weights, and reuses its copy later."""
    assert run("run", "tiny.toml", "-q", cwd=workdir).returncode == 0
    (workdir / "twin.toml").write_text(TINY.replace('name = "tiny"', 'name = "twin"'))
    twin = run("run", "twin.toml", "-q", cwd=workdir)
    assert twin.returncode == 0, twin.stderr
    assert "seed 0: reusing runs/tiny/seed-0/model-best.safetensors, trained by another " \
           "experiment with the same training hash " in twin.stderr
    assert "training softmax" not in twin.stderr
    runs = workdir / "runs"
    for name in ("model-best.safetensors", "model-last.safetensors", "metrics.csv"):
        assert (runs / "twin" / "seed-0" / name).read_bytes() == \
               (runs / "tiny" / "seed-0" / name).read_bytes(), name
    training = json.loads((runs / "twin" / "seed-0" / "manifest.json").read_text())
    assert training["owner"] == {"command": "train", "name": "twin", "config_file": "twin.toml"}
    assert training["copied_from"] == "runs/tiny/seed-0"
    assert 'name = "twin"' in (runs / "twin" / "seed-0" / "config.toml").read_text()
    reports = workdir / "reports"
    twin_results, tiny_results = (pd.read_csv(reports / n / "results.csv")
                                  for n in ("twin", "tiny"))
    assert set(twin_results.pop("model")) == {"twin"}
    assert set(tiny_results.pop("model")) == {"tiny"}
    pd.testing.assert_frame_equal(twin_results, tiny_results)  # the same numbers, another name
    assert (reports / "twin" / "per_sample.csv").read_bytes() == \
           (reports / "tiny" / "per_sample.csv").read_bytes()
    assert json.loads((reports / "twin" / "manifest.json").read_text())["reused_checkpoint"]

    again = run("run", "twin.toml", "-q", cwd=workdir)  # now its own copy is reused
    assert again.returncode == 0, again.stderr
    assert "seed 0: reusing runs/twin/seed-0/model-best.safetensors (training hash" \
           in again.stderr

    (workdir / "longer.toml").write_text(
        TINY.replace('name = "tiny"', 'name = "longer"').replace("epochs = 1", "epochs = 2"))
    longer = run("run", "longer.toml", "-q", "--set", "evaluate.eps=[0, 0.1]",
                 cwd=workdir)
    assert longer.returncode == 0, longer.stderr
    assert "training softmax (standard) into runs/longer/seed-0" in longer.stderr
    retrained = run("run", "twin.toml", "-q", "--retrain", "--set",
                    "evaluate.eps=[0, 0.1]", cwd=workdir)
    assert retrained.returncode == 0, retrained.stderr
    assert "training softmax (standard) into runs/twin/seed-0" in retrained.stderr


def test_rerun_with_changed_settings_replaces_its_own_results_with_one_line(workdir: Path
                                                                           ) -> None:
    assert run("run", "tiny.toml", "-q", cwd=workdir).returncode == 0
    changed = run("run", "tiny.toml", "-q", "--set", "evaluate.eps=[0, 0.15]",
                  cwd=workdir)
    assert changed.returncode == 0, changed.stderr
    lines = [line for line in changed.stderr.splitlines() if line.startswith("replacing")]
    assert len(lines) == 1
    assert lines[0].startswith(f"replacing {Path('reports') / 'tiny'}, written by an earlier "
                               "run of the same experiment: config hash ")
    assert " → " in lines[0] and "robustkit 0.1.0" in lines[0]
    results = pd.read_csv(workdir / "reports" / "tiny" / "results.csv")
    assert sorted(results["eps"].unique()) == [0.0, 0.15]
    assert not (workdir / "reports" / ".tiny.partial").exists()


@pytest.mark.slow
def test_another_experiment_is_refused_before_any_work(workdir: Path) -> None:
    assert run("run", "tiny.toml", "-q", cwd=workdir).returncode == 0
    before = sorted((workdir / "reports" / "tiny").rglob("*"))
    (workdir / "other.toml").write_text(TINY.replace('name = "tiny"', 'name = "other"'))
    other = run("run", "other.toml", "-q", "--out", "reports/tiny", cwd=workdir)
    assert other.returncode == 2
    assert other.stderr.startswith("error: reports/tiny already holds experiment 'tiny' "
                                   "(tiny.toml), not experiment 'other' (other.toml)")
    assert "training" not in other.stderr and not (workdir / "runs" / "other").exists()
    assert sorted((workdir / "reports" / "tiny").rglob("*")) == before
    replaced = run("run", "other.toml", "-q", "--out", "reports/tiny", "--overwrite",
                   cwd=workdir)
    assert replaced.returncode == 0, replaced.stderr
    assert "which held experiment 'tiny'" in replaced.stderr


def test_files_robustkit_did_not_write_are_refused(workdir: Path) -> None:
    (workdir / "mine").mkdir()
    (workdir / "mine" / "report.html").write_text("my own report")
    result = run("run", "tiny.toml", "-q", "--out", "mine", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.startswith("error: mine holds files robustkit did not write "
                                    "(report.html)")
    assert (workdir / "mine" / "report.html").read_text() == "my own report"
    assert not (workdir / "runs").exists()


def test_train_does_not_delete_another_models_folder(workdir: Path) -> None:
    assert run("train", "tiny.toml", "-q", "--out", "model", cwd=workdir).returncode == 0
    weights = (workdir / "model" / "model-best.safetensors").read_bytes()
    (workdir / "other.toml").write_text(TINY.replace('name = "tiny"', 'name = "other"'))
    result = run("train", "other.toml", "-q", "--out", "model", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.startswith("error: model already holds the training run of 'tiny'")
    assert (workdir / "model" / "model-best.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_report_does_not_replace_another_experiments_report(workdir: Path) -> None:
    assert run("run", "tiny.toml", "-q", "--out", "a", cwd=workdir).returncode == 0
    assert run("run", "tiny.toml", "-q", "--out", "b", "--set", "evaluate.eps=[0, 0.05]",
               cwd=workdir).returncode == 0
    b_report = (workdir / "b" / "report.html").read_bytes()
    into_b = run("report", "a", "--out", "b", cwd=workdir)
    assert into_b.returncode == 2
    assert into_b.stderr.startswith("error: b already holds experiment 'tiny'")
    assert (workdir / "b" / "report.html").read_bytes() == b_report
    assert run("report", "a", "b", "--out", "both", cwd=workdir).returncode == 0
    manifest = json.loads((workdir / "both" / "manifest.json").read_text())
    assert manifest["owner"] == {"command": "report", "name": "a, b"}
    again = run("report", "b", "a", "--out", "both", cwd=workdir)  # the same sources
    assert again.returncode == 0, again.stderr
    assert "replacing both, written by an earlier run of the same report" in again.stderr
    only_a = run("report", "a", "--out", "both", cwd=workdir)
    assert only_a.returncode == 2 and "already holds the report of 'a, b'" in only_a.stderr
    in_place = run("report", "b", cwd=workdir)  # a run folder's own report, rebuilt
    assert in_place.returncode == 0, in_place.stderr
    assert "(report rebuilt by `robustkit report b`)" in (workdir / "b" / "report.md").read_text()


def test_invalid_config_stops_before_any_work(workdir: Path) -> None:
    result = run("run", "tiny.toml", "--set", "evaluate.n=0", cwd=workdir)
    assert result.returncode == 2 and "config error at evaluate.n" in result.stderr
    assert not (workdir / "runs").exists() and not (workdir / "reports").exists()


@pytest.mark.slow
def test_multi_seed_reports_per_seed_rows_and_mean_sd(workdir: Path) -> None:
    result = run("run", "tiny.toml", "-q", "--set", "seeds=[0, 1]", cwd=workdir)
    assert result.returncode == 0, result.stderr
    folder = workdir / "reports" / "tiny"
    rows = pd.read_csv(folder / "seeds.csv")
    summary = pd.read_csv(folder / "seed_summary.csv")
    assert sorted(rows["seed"].unique()) == [0, 1]
    for seed in (0, 1):
        assert (folder / f"seed-{seed}" / "results.csv").is_file()
    pick = rows[(rows["attack"] == "pgd5") & (rows["eps"] == 0.1)]["accuracy"]
    line = summary[(summary["attack"] == "pgd5") & (summary["eps"] == 0.1)].iloc[0]
    assert line["mean"] == pytest.approx(pick.mean())
    assert line["sd"] == pytest.approx(pick.std())
    assert "mean ± sd" in result.stdout


@pytest.mark.slow
def test_killed_sweep_resumes_from_finished_cells(workdir: Path) -> None:
    slow = TINY.replace("steps = 5", "steps = 200").replace("n = 300", "n = 2000").replace(
        "eps = [0.0, 0.1, 0.2]", "eps = [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]")
    (workdir / "slow.toml").write_text(slow)
    assert run("run", "slow.toml", "-q", "--out", "whole", cwd=workdir).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "robustkit", "run", "slow.toml", "-q",
                             "--out", "killed"], cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = workdir / ".killed.partial" / "sweep-state" / "state.json"
    deadline = time.time() + 300
    while not state.is_file() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.is_file(), "the sweep finished before it could be interrupted"
    assert not (workdir / "killed").exists()  # nothing half-written where the report goes
    resumed = run("run", "slow.toml", "-q", "--out", "killed", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert '"resumed": true' in (workdir / "killed" / "manifest.json").read_text()
    for name in ("results.csv", "per_sample.csv"):
        assert (workdir / "killed" / name).read_bytes() == (workdir / "whole" / name).read_bytes()
    assert not (workdir / ".killed.partial").exists()
