"""Every `robustkit` command the README shows names a real command and real options, and the
README's shell commands and Python example run as written from a fresh clone.

The README's commands are read from its code (fenced blocks and inline code spans); for each
`robustkit SUB ...` the options written after it must appear in `robustkit SUB --help`, so a
renamed or removed option cannot leave the README teaching one that fails. The slow test at the
end clones the repository, installs it as a user does (`pip install .`, the README's own line,
in a new virtual environment) and runs every line of the README's `bash` blocks above
"## Development" and its "From Python" block, word for word.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from robustkit.data import DATA_ENV
from tests.conftest import REPO, run
from tests.test_readme_python import NO_NETWORK, readme_python_block

FENCED = re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"\brobustkit (?:-- )?([a-z][a-z-]*)\b(.*)", re.DOTALL)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def readme_code() -> list[str]:
    """The README's code: each fenced block's lines, then each inline span (joined across the
    line breaks that wrapping puts inside a span)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    snippets: list[str] = []
    for block in FENCED.findall(readme):
        snippets += block.replace("\\\n", " ").splitlines()
    prose = FENCED.sub("", readme)
    snippets += [" ".join(span.split()) for span in INLINE.findall(prose)]
    return snippets


def readme_commands() -> list[tuple[str, list[str]]]:
    """(subcommand, options) for each `robustkit SUB …` in the README's code; `robustkit --x`
    (no subcommand) gives ("", ["--x"])."""
    commands = []
    for snippet in readme_code():
        code = snippet.split(" # ", 1)[0]
        if "import robustkit" in code:
            continue
        top = re.search(r"\brobustkit (--[a-z-]+)", code)
        if top:
            commands.append(("", [top.group(1)]))
            continue
        match = COMMAND.search(code)
        if match:
            commands.append((match.group(1), OPTION.findall(match.group(2))))
    return commands


def robustkit_help(*subcommand: str) -> str:
    result = run(*subcommand, "--help")
    assert result.returncode == 0, f"robustkit {' '.join(subcommand)} --help: {result.stderr}"
    return result.stdout


@cache
def help_options(subcommand: str) -> set[str]:
    return set(OPTION.findall(robustkit_help(*([subcommand] if subcommand else []))))


def subcommands() -> set[str]:
    """The names under "Commands:" in `robustkit --help`."""
    panel = robustkit_help().split("Commands:", 1)[1]
    return {line.split()[0] for line in panel.splitlines() if line.startswith("  ")}


def test_readme_shows_every_command() -> None:
    shown = {sub for sub, _ in readme_commands()}
    assert shown >= subcommands() | {""}, shown


def test_every_readme_command_and_option_exists() -> None:
    commands = readme_commands()
    assert len(commands) >= 20, commands  # the README shows a score; fewer: the parse broke
    real = subcommands()
    unknown = []
    for subcommand, options in commands:
        if subcommand and subcommand not in real:
            unknown.append(f"robustkit {subcommand}")
            continue
        known = help_options(subcommand)
        unknown += [" ".join(["robustkit", subcommand, option]).replace("  ", " ")
                    for option in options if option not in known]
    assert not unknown, f"README shows what the CLI does not have: {sorted(set(unknown))}"


MODEL = re.compile(r"--model[ =](\S+)")


def test_every_readme_model_is_one_a_clone_has_or_the_users_own() -> None:
    """`--model` in the README names released weights that exist (`zoo:NAME`, a committed
    `reports/…/model.safetensors`) or the user's own network (`module:factory`); never weights
    that need a training run the README does not show first (`runs/…`)."""
    wrong = []
    for snippet in readme_code():
        for model in MODEL.findall(snippet.split(" # ", 1)[0]):
            if model.startswith("zoo:"):
                known = (REPO / "reports" / model[4:] / "model.safetensors").is_file()
            elif model.endswith((".safetensors", ".pt", ".pt2", ".torchscript")):
                known = (REPO / model).is_file() and not model.startswith("runs/")
            else:  # a module:factory of the user's, or a placeholder such as M
                known = ":" in model or model.isupper()
            if not known:
                wrong.append(model)
    assert not wrong, f"README attacks models a fresh clone lacks: {sorted(set(wrong))}"


#: A shell line whose comment starts so says what it needs first (the internet, your own
#: files, GPUs): it is shown, not run. Every other line of a bash block runs as written.
NEEDS = re.compile(r"\s#\s+needs\b")
#: ``export NAME=...`` is the user's own setting (where their MNIST lies); the test's
#: environment sets it instead.
EXPORT = re.compile(r"^export [A-Z_]+=")


def readme_shell_lines(until: str = "## Development") -> list[str]:
    """The lines of the README's ```bash blocks above ``until``, in order, a line continued
    by a backslash joined to the next; blank and comment-only lines left out."""
    readme = (REPO / "README.md").read_text(encoding="utf-8").split(until, 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines


def runnable(line: str) -> bool:
    return not NEEDS.search(line) and not EXPORT.match(line)


def test_readme_shell_lines_are_read() -> None:
    lines = readme_shell_lines()
    assert "pip install ." in [line.split(" #")[0].strip() for line in lines]
    assert "robustkit run experiments/quickstart.toml" in lines
    shown_only = [line for line in lines if not runnable(line)]
    assert all("needs" in line or line.startswith("export") for line in shown_only)
    assert len(lines) - len(shown_only) >= 8, lines


def _failed_to_reach_the_index(result: subprocess.CompletedProcess[str]) -> bool:
    text = result.stdout + result.stderr
    return any(sign in text for sign in ("NewConnectionError", "Temporary failure in name",
                                         "No matching distribution found for setuptools"))


@pytest.mark.slow
def test_readme_runs_as_written_from_a_fresh_clone(tmp_path: Path, mnist_root: Path) -> None:
    """A fresh clone, a new virtual environment, the README's `pip install .`, then each of
    its shell lines and its Python block, each exiting 0, with MNIST from $ROBUSTKIT_DATA and
    every download made to fail (the package index is reachable for `pip install .` alone).

    The environment is made with ``--system-site-packages``: it starts without robustkit
    (the line `pip install .` puts the clone's copy into it, which the test checks is the one
    imported), but finds torch and the other dependencies already installed instead of
    downloading gigabytes of wheels for each run."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: nothing to clone")
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    base.update({"PATH": f"{venv / 'bin'}{os.pathsep}{base.get('PATH', '')}",
                 "VIRTUAL_ENV": str(venv), DATA_ENV: str(mnist_root), "COLUMNS": "120",
                 "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    offline = {**base, **NO_NETWORK}
    for line in filter(runnable, readme_shell_lines()):
        installs = line.startswith("pip ")
        result = subprocess.run(["bash", "-c", line], cwd=clone, capture_output=True, text=True,
                                env=base if installs else offline, timeout=1200)
        if installs and result.returncode != 0 and _failed_to_reach_the_index(result):
            pytest.skip(f"`{line}` could not reach the package index")
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{line}\n{result.stderr[-3000:]}"
        if installs:
            where = subprocess.run(
                ["python", "-c", "import robustkit.cli as c; print(c.__file__)"],
                cwd=tmp_path, capture_output=True, text=True, env=offline, check=True)
            assert where.stdout.startswith(str(venv)), where.stdout  # the clone's, installed
    python = subprocess.run(["python", "-c", readme_python_block()], cwd=clone,
                            capture_output=True, text=True, env=offline, timeout=1200)
    assert python.returncode == 0, python.stderr[-3000:]
    assert "autoattack" in python.stdout
