"""The README's "From Python" example, and the package docstring's, run exactly as written.

Each block is extracted verbatim and run in a fresh interpreter from the checkout's root (where a
fresh clone's user runs it), with MNIST from ``$ROBUSTKIT_DATA`` and any network access made to
fail (an HTTP proxy that refuses connections), so a block that needs a download, a training run
or a file a clone lacks fails here. No word of the block is changed.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import robustkit
from robustkit.data import DATA_ENV

REPO = Path(__file__).resolve().parent.parent
#: Where any download would go: nothing listens on port 9, so a fetch fails at once.
NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "NO_PROXY": "", "no_proxy": ""}


def readme_python_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README's 'From Python' section has no python block"
    return match.group(1)


def docstring_block() -> str:
    """The indented example after ``::`` in ``robustkit/__init__.py``'s docstring."""
    doc = robustkit.__doc__ or ""
    assert "::\n" in doc, "robustkit's docstring has no example block"
    lines = doc.split("::\n", 1)[1].splitlines()
    block = []
    for line in lines:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def run_python(code: str, mnist_root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **NO_NETWORK, DATA_ENV: str(mnist_root), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


def test_readme_python_example_runs_as_written(mnist_root: Path) -> None:
    code = readme_python_block()
    ast.parse(code)  # a syntax error is named here, not as a subprocess failure
    result = run_python(code, mnist_root)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # the printed frames: the sweep's columns, its per-sample table and the ensemble's rows
    for column in ("attack", "eps", "accuracy", "ci_low", "ci_high", "clean_pred"):
        assert column in out, out
    assert "pgd20x2" in out and "autoattack" in out
    assert "[100 rows x" in out  # per_sample: one row per image of data.test.take(100)


def test_package_docstring_example_runs_as_written(mnist_root: Path) -> None:
    code = docstring_block()
    assert "rk.load_model(" in code and "rk.evaluate(" in code
    result = run_python(code, mnist_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pgd20" in result.stdout and "ci_high" in result.stdout
