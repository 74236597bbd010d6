"""`robustkit run` end to end: reuse, determinism, multi-seed, resumable sweeps, folder guard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent

TINY = """
name = "tiny"
seed = 0
device = "cpu"
[data]
val_size = 1000
[model]
arch = "softmax"
[train]
epochs = 1
lr = 0.1
[[attacks]]
name = "fgsm"
[[attacks]]
name = "pgd"
steps = 5
[evaluate]
eps = [0.0, 0.1, 0.2]
n = 300
"""


def robustkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "robustkit", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture
def workdir(tmp_path: Path, mnist_root: Path) -> Path:
    (tmp_path / "tiny.toml").write_text(TINY)
    return tmp_path


def test_run_twice_gives_identical_results_and_reuses_the_checkpoint(workdir: Path) -> None:
    first = robustkit("run", "tiny.toml", "-q", cwd=workdir)
    assert first.returncode == 0, first.stderr
    report = workdir / "reports" / "tiny"
    for name in ("results.csv", "per_sample.csv", "timings.csv", "checks.csv", "metrics.csv",
                 "config.toml", "manifest.json", "report.html", "report.md"):
        assert (report / name).is_file(), name
    results = (report / "results.csv").read_bytes()
    per_sample = (report / "per_sample.csv").read_bytes()
    second = robustkit("run", "tiny.toml", "-q", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert "reusing" in second.stderr
    assert (report / "results.csv").read_bytes() == results
    assert (report / "per_sample.csv").read_bytes() == per_sample
    retrained = robustkit("run", "tiny.toml", "-q", "--retrain", "--out", "again", cwd=workdir)
    assert retrained.returncode == 0, retrained.stderr
    assert "training softmax" in retrained.stderr
    assert (workdir / "again" / "results.csv").read_bytes() == results  # bitwise on CPU


def test_changed_config_is_not_written_over_another_experiment(workdir: Path) -> None:
    assert robustkit("run", "tiny.toml", "-q", cwd=workdir).returncode == 0
    before = (workdir / "reports" / "tiny" / "results.csv").read_bytes()
    other = robustkit("run", "tiny.toml", "-q", "--set", "evaluate.eps=[0, 0.3]", cwd=workdir)
    assert other.returncode == 2
    assert "already holds results of a different experiment" in other.stderr
    assert (workdir / "reports" / "tiny" / "results.csv").read_bytes() == before


def test_invalid_config_stops_before_any_work(workdir: Path) -> None:
    result = robustkit("run", "tiny.toml", "--set", "evaluate.n=0", cwd=workdir)
    assert result.returncode == 2 and "config error at evaluate.n" in result.stderr
    assert not (workdir / "runs").exists() and not (workdir / "reports").exists()


def test_multi_seed_reports_per_seed_rows_and_mean_sd(workdir: Path) -> None:
    result = robustkit("run", "tiny.toml", "-q", "--set", "seeds=[0, 1]", cwd=workdir)
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
    assert robustkit("run", "slow.toml", "-q", "--out", "whole", cwd=workdir).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "robustkit", "run", "slow.toml", "-q",
                             "--out", "killed"], cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = workdir / "killed" / "sweep-state" / "state.json"
    deadline = time.time() + 300
    while not state.is_file() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.is_file(), "the sweep finished before it could be interrupted"
    assert not (workdir / "killed" / "results.csv").exists()
    resumed = robustkit("run", "slow.toml", "-q", "--out", "killed", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert '"resumed": true' in (workdir / "killed" / "manifest.json").read_text()
    for name in ("results.csv", "per_sample.csv"):
        assert (workdir / "killed" / name).read_bytes() == (workdir / "whole" / name).read_bytes()
    assert not state.exists()
