"""What a newcomer meets on a fresh clone: version, ε fractions, messages, console verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "robustkit", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript 784 → 10 linear model (weights from seed 0)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    path = tmp_path_factory.mktemp("linear") / "linear.torchscript"
    torch.jit.save(torch.jit.script(model), path)
    return path


def test_version_comes_from_the_package_metadata() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"robustkit {version('robustkit')}"


def test_eps_fractions_are_accepted_and_bad_ones_refused(linear_model: Path, tmp_path: Path,
                                                         mnist_root: Path) -> None:
    out = tmp_path / "frac"
    result = run("attack", "--model", str(linear_model), "--attack", "fgsm", "--eps",
                 "0, 8/255,0.1", "--n", "20", "-q", "--out", str(out), "--trust-model-file")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "settings.json").read_text())["eps"] == [0.0, 8 / 255, 0.1]
    for bad in ("0,1/0", "0,8/", "0,a/255"):
        refused = run("attack", "--model", str(linear_model), "--eps", bad, "-q")
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"error: --eps {bad!r}: expected comma-separated "
                                         "numbers or fractions"), refused.stderr
