"""Data loading: layouts, checksums, every failure mode, the validation split, batching."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from robustkit import data as rdata
from robustkit.data import DatasetSpec, batches, load_dataset, validation_indices
from robustkit.errors import RobustkitError
from tests.conftest import write_idx

N_TRAIN, N_TEST = 60, 20


def _tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (N_TRAIN, 28, 28)),
        "train_labels": rng.integers(0, 10, N_TRAIN),
        "test_images": rng.integers(0, 256, (N_TEST, 28, 28)),
        "test_labels": rng.integers(0, 10, N_TEST),
    }


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a tiny IDX data set registered as 'tiny' with its true md5s."""
    arrays = _tiny_arrays()
    folder = tmp_path / "tiny"
    folder.mkdir()
    md5 = {}
    for key, array in arrays.items():
        path = write_idx(folder / rdata.FILE_NAMES[key], array)
        md5[key] = hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest()
    spec = DatasetSpec("tiny", "Tiny", tuple(str(i) for i in range(10)), md5)
    monkeypatch.setitem(rdata.DATASETS, "tiny", spec)
    monkeypatch.delenv(rdata.DATA_ENV, raising=False)
    return folder


def test_tiny_dataset_loads_as_whole_tensors(tiny: Path) -> None:
    ds = load_dataset("tiny", tiny, val_size=10)
    arrays = _tiny_arrays()
    assert ds.test.images.shape == (N_TEST, 1, 28, 28)
    assert ds.test.images.dtype == torch.float32 and ds.test.labels.dtype == torch.int64
    assert torch.equal(ds.test.images[:, 0] * 255, torch.from_numpy(arrays["test_images"]).float())
    assert torch.equal(ds.test.labels, torch.from_numpy(arrays["test_labels"]))
    assert len(ds.train) == N_TRAIN - 10 and len(ds.val) == 10
    assert float(ds.train.images.max()) <= 1.0 and float(ds.train.images.min()) >= 0.0


def test_raw_files_and_torchvision_layout_are_found(tiny: Path, tmp_path: Path) -> None:
    raw = tmp_path / "root" / "Tiny" / "raw"
    raw.mkdir(parents=True)
    for gz in tiny.iterdir():
        (raw / gz.name.removesuffix(".gz")).write_bytes(gzip.decompress(gz.read_bytes()))
    ds = load_dataset("tiny", tmp_path / "root", val_size=0)
    assert ds.source == raw and len(ds.test) == N_TEST


def test_environment_variable_is_searched(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rdata.DATA_ENV, str(tiny))
    assert load_dataset("tiny", val_size=0).source == tiny


def test_missing_file_is_named(tiny: Path) -> None:
    (tiny / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(RobustkitError, match=r"missing t10k-labels-idx1-ubyte\.gz"):
        load_dataset("tiny", tiny)


def test_no_files_and_no_network_gives_one_line_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(rdata.DATA_ENV, raising=False)

    def offline(spec: DatasetSpec) -> rdata.Located:
        raise RobustkitError(f"{spec.name} files not found and the download failed (offline)")

    monkeypatch.setattr(rdata, "_download", offline)
    with pytest.raises(RobustkitError, match="download failed") as info:
        load_dataset("mnist")
    assert "\n" not in str(info.value)
    with pytest.raises(RobustkitError, match=f"no mnist files in {tmp_path}"):
        load_dataset("mnist", tmp_path)


def test_truncated_file_is_reported(tiny: Path) -> None:
    path = tiny / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    message = r"train-images-idx3-ubyte\.gz is truncated or corrupt"
    with pytest.raises(RobustkitError, match=message):
        load_dataset("tiny", tiny)


def test_wrong_checksum_is_reported(tiny: Path) -> None:
    arrays = _tiny_arrays()
    labels = arrays["test_labels"].copy()
    labels[0] = (labels[0] + 1) % 10
    write_idx(tiny / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(RobustkitError, match="wrong checksum"):
        load_dataset("tiny", tiny)


def test_real_mnist_truncated_copy_is_rejected(mnist_root: Path, tmp_path: Path) -> None:
    for name in rdata.FILE_NAMES.values():
        shutil.copy(mnist_root / f"{name}.gz", tmp_path / f"{name}.gz")
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-100])
    with pytest.raises(RobustkitError, match="truncated or corrupt"):
        load_dataset("mnist", tmp_path)


def test_real_mnist_shapes_and_checksums(mnist) -> None:  # type: ignore[no-untyped-def]
    assert len(mnist.train) + len(mnist.val) == 60_000 and len(mnist.test) == 10_000
    assert len(mnist.val) == 5000
    assert mnist.test.images.shape == (10_000, 1, 28, 28)
    assert int(mnist.test.labels[0]) == 7  # the first test digit is a 7
    counts = torch.bincount(mnist.test.labels, minlength=10)
    assert int(counts.sum()) == 10_000 and int(counts.min()) > 800


def test_validation_split_is_deterministic_and_disjoint() -> None:
    train_a, val_a = validation_indices(1000, 100, split_seed=0)
    train_b, val_b = validation_indices(1000, 100, split_seed=0)
    _, val_c = validation_indices(1000, 100, split_seed=1)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert not torch.equal(val_a, val_c)
    assert len(val_a) == 100 and len(train_a) == 900
    assert set(train_a.tolist()).isdisjoint(val_a.tolist())
    assert sorted(train_a.tolist() + val_a.tolist()) == list(range(1000))
    with pytest.raises(RobustkitError, match="val_size"):
        validation_indices(1000, 1000)


def test_batches_cover_every_sample_once(tiny: Path) -> None:
    ds = load_dataset("tiny", tiny, val_size=0)
    generator = torch.Generator().manual_seed(0)
    seen = torch.cat([y for _, y in batches(ds.train, 7, generator)])
    assert len(seen) == N_TRAIN
    assert torch.equal(seen.sort().values, ds.train.labels.sort().values)
    in_order = torch.cat([y for _, y in batches(ds.train, 7)])
    assert torch.equal(in_order, ds.train.labels)


def test_fashion_mnist_from_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    monkeypatch.delenv(rdata.DATA_ENV, raising=False)
    ds = load_dataset("fashion-mnist", val_size=1000)
    assert ds.source == folder  # found through the system folder, checksums verified
    assert len(ds.test) == 10_000 and ds.classes[9] == "Ankle boot"
