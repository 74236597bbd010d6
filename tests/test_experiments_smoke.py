"""Every committed experiment runs end to end through the CLI: the README's command, shrunk.

A full run of the committed CNN experiments takes hours on a CPU, so CI cannot re-run them as
they stand; a config that no longer runs (a training method, attack, transformation or defence
broken by a change elsewhere) would only show on a user's fresh clone. Here each committed config
runs with the same code paths on a small slice of the real MNIST (600 training, 32 test images)
and one epoch, overridden with ``--set`` only; the staleness test in ``test_reports.py`` covers
the other half (a committed report still comes from its config as it stands).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustkit.config import load_config
from robustkit.training.pretrained import training_fingerprint
from robustkit.vocabulary import CERTIFIED_METHODS

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "experiments").glob("*.toml"))

#: What shrinks a committed experiment: the data, the epochs and the evaluated images; attacks,
#: training method, transformations and defences stay as committed.
SHRINK = ("data.source='small.npz'", "data.val_size=50", "train.epochs=1",
          "train.adversarial.warmup_epochs=0", "train.adversarial.val_n=20", "evaluate.n=32")
#: Certified training's ε ramp shrinks with its epochs: no clean epoch, a one-epoch ramp.
CERTIFIED_SHRINK = ("train.certified.start_epochs=0", "train.certified.ramp_epochs=1",
                    "train.certified.val_n=20")


def shrink(config: Path) -> list[str]:
    """The ``--set`` values that shrink ``config`` (:data:`SHRINK`, and for certified training
    :data:`CERTIFIED_SHRINK`)."""
    certified = load_config(config).train.method in CERTIFIED_METHODS
    return [*SHRINK, *(CERTIFIED_SHRINK if certified else ())]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    """A folder with the committed experiments and ``small.npz``, a slice of the real MNIST."""
    from robustkit.data import load_dataset

    mnist = load_dataset("mnist", mnist_root, "cpu", val_size=5000)
    folder = tmp_path_factory.mktemp("smoke")
    shutil.copytree(REPO / "experiments", folder / "experiments")

    def as_bytes(images: object) -> np.ndarray:
        return (np.asarray(images)[:, 0] * 255).round().astype(np.uint8)

    np.savez(folder / "small.npz",
             train_images=as_bytes(mnist.train.images[:600]),
             train_labels=mnist.train.labels[:600].numpy(),
             test_images=as_bytes(mnist.test.images[:32]),
             test_labels=mnist.test.labels[:32].numpy())
    return folder


def _named_paths(output: str) -> list[str]:
    """The files and folders a run's messages say it wrote."""
    named = re.findall(r"written to (\S+)", output)
    for listed in re.findall(r"^report: (.+)$", output, flags=re.MULTILINE):
        named += listed.split(", ")
    return named


def _same_training(config: Path) -> list[str]:
    """The names of the other committed experiments whose training is ``config``'s, shrunk."""
    mine = load_config(config, shrink(config))
    others = (load_config(path, shrink(path)) for path in EXPERIMENTS if path != config)
    return sorted(other.name for other in others
                  if training_fingerprint(other, 0) == training_fingerprint(mine, 0))


@pytest.mark.slow
@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_committed_experiment_runs_end_to_end(config: Path, workdir: Path) -> None:
    cfg = load_config(config)
    overrides = [arg for value in shrink(config) for arg in ("--set", value)]
    result = subprocess.run(
        [sys.executable, "-m", "robustkit", "run", f"experiments/{config.name}", "-q",
         *overrides],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2", "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    donors = [d for d in _same_training(config)
              if (workdir / "runs" / d / "seed-0" / "manifest.json").is_file()]
    if donors:  # an earlier config of the same training ran here: its training is copied
        assert f"seed 0: reusing runs/{donors[0]}/seed-0/model-best.safetensors, trained by " \
               "another experiment" in result.stderr
        assert f"training {cfg.model.arch}" not in result.stderr

    report = workdir / "reports" / cfg.name
    for name in ("results.csv", "per_sample.csv", "checks.csv", "manifest.json", "report.html",
                 "report.md"):
        assert (report / name).is_file(), f"no {name}"
    assert (report / "physical.csv").is_file() == (cfg.transforms is not None)
    assert not list(report.parent.glob(".*partial*")), "a staging folder was left behind"

    results = pd.read_csv(report / "results.csv")
    attacks = results.loc[results["attack"] != "any", "attack"]  # "any": the per-sample worst
    assert attacks.nunique() == len(cfg.attacks)
    assert sorted(results["eps"].unique()) == pytest.approx(sorted(set(cfg.evaluate.eps)))
    assert (results["n"] == 32).all()

    named = _named_paths(result.stdout + result.stderr)
    assert named, "the run names no file it wrote"
    for path in named:
        assert (workdir / path).exists(), f"the run says it wrote {path}, which does not exist"
