"""Every example that `robustkit --help` and each command's `--help` show runs exactly as written.

The examples are read from the help text itself (each ``Example: …`` paragraph, joined across
the lines the help wraps it onto) and run, word for word, in a temporary folder laid out as a
fresh clone (the committed ``experiments/`` and ``reports/``, no ``runs/``), with MNIST in
``$ROBUSTKIT_DATA`` and every download made to fail. An example that needs a model trained
first, a file a clone lacks or a zoo entry that does not exist fails here.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from robustkit.data import DATA_ENV
from tests.conftest import REPO, run
from tests.test_readme_python import NO_NETWORK

#: Every command, "" for `robustkit --help` itself; a test below keeps the list complete.
COMMANDS = ["", "train", "data", "attack", "run", "zoo", "certify", "report"]
#: Examples that train a model or attack hundreds of images: slower than the rest.
SLOW = {"", "train", "run", "attack"}


def robustkit(*args: str, cwd: Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """:func:`tests.conftest.run` in a 100-column terminal with one torch thread."""
    return run(*args, cwd=cwd, env={"COLUMNS": "100", "OMP_NUM_THREADS": "1", **(env or {})})


def help_examples(command: str) -> list[str]:
    """The ``Example:`` paragraphs of ``robustkit [COMMAND] --help``, each as one line."""
    result = robustkit(*([command] if command else []), "--help", cwd=REPO)
    assert result.returncode == 0, result.stderr
    paragraphs = result.stdout.split("\n\n")
    return [" ".join(p.split())[len("Example: "):] for p in paragraphs
            if p.strip().startswith("Example: ")]


def test_every_command_is_covered() -> None:
    top = robustkit("--help", cwd=REPO).stdout.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in top.splitlines() if line.startswith("  ")}
    assert listed == set(COMMANDS) - {""}


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A folder as a fresh clone has it: the committed experiments and reports, no runs/."""
    for folder in ("experiments", "reports"):
        shutil.copytree(REPO / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns(".*.partial"))
    return tmp_path


@pytest.mark.parametrize("command", [
    pytest.param(c or "robustkit", marks=[pytest.mark.slow] if c in SLOW else [])
    for c in COMMANDS])
def test_help_examples_run_as_written(command: str, clone: Path, mnist_root: Path) -> None:
    examples = help_examples("" if command == "robustkit" else command)
    assert examples, f"robustkit {command} --help shows no example"
    env = {**NO_NETWORK, DATA_ENV: str(mnist_root)}
    for example in examples:
        words = shlex.split(example)
        assert words[0] == "robustkit", example
        result = robustkit(*words[1:], cwd=clone, env=env)
        assert result.returncode == 0, f"{example}\n{result.stderr[-2000:]}"
        assert "error:" not in result.stderr, result.stderr
