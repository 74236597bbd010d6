"""Shared fixtures: the real MNIST files (via ROBUSTKIT_DATA) and small synthetic IDX folders."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
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
