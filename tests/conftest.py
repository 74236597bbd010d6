"""Shared fixtures and helpers: the real MNIST files (via ROBUSTKIT_DATA), small synthetic IDX
folders, the CLI (:func:`run` in a subprocess, :func:`cli` in this process,
:func:`assert_user_error`, the :func:`user_models` module) and the tiny experiment the
end-to-end tests run (:func:`tiny_config`)."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from robustkit.data import DATA_ENV

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def mnist_dir() -> Path | None:
    for candidate in (os.environ.get(DATA_ENV), str(SHARED_MNIST)):
        if candidate and (Path(candidate) / "t10k-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The folder with the real MNIST files; tests that claim accuracy need it."""
    root = mnist_dir()
    if root is None:
        pytest.skip(f"real MNIST files not found: set {DATA_ENV} or place them in {SHARED_MNIST}")
    return root


@pytest.fixture(scope="session")
def mnist(mnist_root: Path):  # type: ignore[no-untyped-def]
    from robustkit.data import load_dataset

    return load_dataset("mnist", mnist_root, "cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                    ) -> None:
    """Keep tests away from the user's cache folder; point ROBUSTKIT_DATA at the real files."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    root = mnist_dir()
    if root is not None:
        monkeypatch.setenv(DATA_ENV, str(root))


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write an unsigned-byte IDX file (optionally gzipped)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    content = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)
    return path


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One torch thread for a module of tiny tensors: intra-op threads only add contention
    (and seconds) on a busy 2-core CPU. Modules ask for it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the CLI


def robustkit_env(path: Sequence[Path | str] = (), env: Mapping[str, str] | None = None
                  ) -> dict[str, str]:
    """The environment of a ``robustkit`` subprocess: this one, a 200-column terminal, then
    ``env``; ``PYTHONPATH`` starts with ``path`` and this checkout, so the code under test runs
    whatever the working folder."""
    environment = {**os.environ, "COLUMNS": "200", **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (*map(str, path), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return environment


def run(*args: str, cwd: Path | None = None, path: Sequence[Path | str] = (),
        env: Mapping[str, str] | None = None, safe_path: bool = False,
        preexec: Callable[[], object] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m robustkit ARGS`` in ``cwd`` (default: the checkout), finished, its output as
    text (environment: :func:`robustkit_env`). ``safe_path`` (``python -P``) keeps the working
    folder off ``sys.path``, as for the installed ``robustkit`` script; ``preexec`` runs in the
    child before it starts."""
    flags = ["-P"] if safe_path else []
    return subprocess.run([sys.executable, *flags, "-m", "robustkit", *args],
                          capture_output=True, text=True, cwd=cwd or REPO,
                          env=robustkit_env(path, env), timeout=600, preexec_fn=preexec)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The console-script function ``robustkit.cli.main`` in this process (no torch import per
    call); its exit code and stderr, shaped like a finished subprocess."""
    from robustkit.cli import main

    stderr, argv = io.StringIO(), sys.argv
    sys.argv = ["robustkit", *args]
    real_stderr, sys.stderr = sys.stderr, stderr
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stderr, sys.argv = real_stderr, argv
    return subprocess.CompletedProcess(list(args), code, "", stderr.getvalue())


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit code 2 and one ``error: …`` line on stderr holding every fragment; no traceback."""
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tiny_config(name: str = "tiny", val_size: int = 1000) -> str:
    """An experiment that trains and evaluates in seconds: a softmax for one epoch on the
    MNIST images left after ``val_size`` validation ones, attacked by FGSM and 5-step PGD at
    ε = 0, 0.1, 0.2 on 300 test images, seed 0, on the CPU."""
    return f"""
name = "{name}"
seed = 0
device = "cpu"
[data]
val_size = {val_size}
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


#: A module of user models for ``--model usermodels:NAME`` (fixture :func:`user_models`): a
#: good one, one that returns probabilities, a wrong class count, a tuple output.
USER_MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    class Tupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        def forward(self, x):
            return self.net(x), x

    def good():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def normalised():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def probabilities():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Softmax(dim=1))

    def wrong_shape():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))

    def tupled():
        return Tupled()
""")


@pytest.fixture(scope="module")
def user_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``usermodels.py`` (:data:`USER_MODELS`), for ``path=[user_models]``."""
    folder = tmp_path_factory.mktemp("usermodels")
    (folder / "usermodels.py").write_text(USER_MODELS)
    return folder
