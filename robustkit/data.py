"""MNIST and Fashion-MNIST as whole in-memory tensors.

Images are float32 in [0, 1] with shape ``[N, 1, 28, 28]``; labels are int64 ``[N]``. Both live
on the chosen device for the whole run, and batches are slices of a permuted index, so no
per-item Python and no PIL sit on the hot path.

Where the files are looked for, first match wins:

1. an explicit folder (``--data-dir`` or the config's ``data.dir``),
2. the ``ROBUSTKIT_DATA`` environment variable,
3. the cache folder (``$XDG_CACHE_HOME/robustkit`` or ``~/.cache/robustkit``),
4. system folders (Debian's ``dataset-fashion-mnist`` package puts files in
   ``/usr/share/datasets/fashion-mnist``).

Each folder may hold the four IDX files (``.gz`` or uncompressed) directly, in a sub-folder named
after the data set, or in torchvision's ``<Name>/raw`` layout. When no folder holds them, they are
downloaded through torchvision into the cache. Every file's decompressed content is checked
against its canonical md5, so torchvision's gz files, re-compressed copies and raw files all pass.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# the built-in data sets are declared torch-free (reports read their class names); re-exported
from robustkit.dataset_specs import DATASETS as DATASETS
from robustkit.dataset_specs import DatasetSpec as DatasetSpec
from robustkit.errors import RobustkitError

DATA_ENV = "ROBUSTKIT_DATA"
FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


EXPECTED_SIZES = {"train": 60_000, "test": 10_000}


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise RobustkitError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}"
        ) from None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "robustkit"


def search_roots(data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """The folders searched, in order, each with the reason it is searched."""
    roots: list[tuple[str, Path]] = []
    if data_dir is not None:
        roots.append(("--data-dir", Path(data_dir).expanduser()))
    if os.environ.get(DATA_ENV):
        roots.append((f"${DATA_ENV}", Path(os.environ[DATA_ENV]).expanduser()))
    roots.append(("cache", cache_dir()))
    return roots


def _candidate_dirs(root: Path, spec: DatasetSpec) -> list[Path]:
    return [
        root,
        root / spec.name,
        root / spec.torchvision_name / "raw",
        root / spec.name / spec.torchvision_name / "raw",
    ]


def _file_in(folder: Path, key: str) -> Path | None:
    for suffix in (".gz", ""):
        path = folder / (FILE_NAMES[key] + suffix)
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class Located:
    """A folder holding some or all of a data set's files."""

    reason: str
    folder: Path
    files: dict[str, Path]

    @property
    def complete(self) -> bool:
        return len(self.files) == len(FILE_KEYS)


def locate(name: str, data_dir: str | Path | None = None) -> list[Located]:
    """Every searched folder that holds at least one of the data set's files, in search order."""
    spec = dataset_spec(name)
    places = [(reason, folder) for reason, root in search_roots(data_dir)
              for folder in _candidate_dirs(root, spec)]
    places += [("system", Path(d)) for d in spec.system_dirs]
    found = []
    for reason, folder in places:
        files = {k: p for k in FILE_KEYS if (p := _file_in(folder, k)) is not None}
        if files:
            found.append(Located(reason, folder, files))
    return found


MAX_IDX_BYTES = 512 * 2**20  # far above any supported data set (MNIST train images: 47 MB)


def read_bytes(path: Path) -> bytes:
    """The uncompressed content of an IDX file, or a one-line error if it cannot be read.

    The header is read first and at most the data it announces (plus one byte, so that a
    longer file shows up as corrupt) is inflated, so a gzip bomb never fills memory.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
                return magic
            dims = handle.read(4 * magic[3])
            size = math.prod(int.from_bytes(dims[i:i + 4], "big")
                             for i in range(0, len(dims) - 3, 4))
            if size > MAX_IDX_BYTES:
                raise RobustkitError(
                    f"{path} announces {size} bytes of data in its IDX header, more than the "
                    f"{MAX_IDX_BYTES >> 20} MiB robustkit reads: it is not a data set file; "
                    "delete it and fetch it again (robustkit data --download)"
                )
            return magic + dims + handle.read(size + 1)
    except (EOFError, OSError, zlib.error) as exc:
        raise RobustkitError(
            f"{path} is truncated or corrupt ({exc}): delete it and fetch it again "
            "(robustkit data --download), or copy a good one in its place"
        ) from None


def check_md5(path: Path, content: bytes, expected: str) -> None:
    digest = hashlib.md5(content).hexdigest()
    if digest != expected:
        raise RobustkitError(
            f"{path} has the wrong checksum (md5 of its content {digest}, expected {expected}): "
            "the file is damaged or not the canonical one; delete it and fetch it again "
            "(robustkit data --download)"
        )


def parse_idx(content: bytes, path: Path) -> np.ndarray:
    """Decode an IDX file: magic (0x0000, dtype 0x08 = ubyte, ndim), big-endian dims, data."""
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] != 0x08:
        raise RobustkitError(f"{path} is not an unsigned-byte IDX file: replace it")
    ndim = content[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) if dims else 0
    if len(content) - header != expected:
        raise RobustkitError(
            f"{path} is truncated or corrupt (header says {expected} bytes of data, "
            f"found {len(content) - header}): delete it and fetch it again"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims)


@dataclass(frozen=True)
class Split:
    """A labelled set of images: ``images`` float32 [N,1,28,28] in [0,1], ``labels`` int64 [N]."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, n: int | None) -> Split:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    source: Path
    # where the data came from, for reports: kind, source, files' checksums
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        images = self.test.images if len(self.test) else self.train.images
        c, h, w = (int(v) for v in images.shape[1:])
        return c, h, w


def empty_split(like: Split) -> Split:
    """A split of no samples with ``like``'s image shape, dtype and device."""
    return Split(like.images[:0], like.labels[:0])


def portable_path(path: Path) -> str | None:
    """``path`` as a report can carry it to another machine: relative to the current folder
    when it lies inside it (``data/mnist``), else None. An absolute path names one machine's
    layout and nothing about the data; the checksums beside it identify the files."""
    try:
        return Path(os.path.abspath(path)).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return None


def load_split_files(located: Located, spec: DatasetSpec,
                     keys: tuple[str, ...] = FILE_KEYS) -> dict[str, np.ndarray]:
    arrays = {}
    for key in keys:
        path = located.files[key]
        content = read_bytes(path)
        check_md5(path, content, spec.raw_md5[key])
        arrays[key] = parse_idx(content, path)
    return arrays


def _download(spec: DatasetSpec) -> Located:
    import torchvision

    target = cache_dir()
    cls = getattr(torchvision.datasets, spec.torchvision_name)
    try:
        for train in (True, False):
            cls(root=str(target), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RobustkitError(
            f"{spec.name} files not found and the download failed ({reason}): copy the four "
            f"IDX files ({', '.join(FILE_NAMES[k] + '.gz' for k in FILE_KEYS)}) into a folder "
            f"and pass --data-dir DIR or set {DATA_ENV}=DIR"
        ) from None
    folder = target / spec.torchvision_name / "raw"
    files = {k: p for k in FILE_KEYS if (p := _file_in(folder, k)) is not None}
    return Located("download", folder, files)


def find_dataset_files(
    name: str, data_dir: str | Path | None = None, download: bool = True
) -> Located:
    """The first complete folder in search order; download when there is none."""
    spec = dataset_spec(name)
    found = locate(name, data_dir)
    if data_dir is not None:
        explicit = [f for f in found if f.reason == "--data-dir"]
        if not explicit:
            raise RobustkitError(
                f"no {name} files in {data_dir}: put the four IDX files "
                f"({', '.join(FILE_NAMES[k] + '.gz' for k in FILE_KEYS)}) there, "
                "or leave out --data-dir to use the default locations"
            )
        found = explicit
    complete = [f for f in found if f.complete]
    for located in complete:
        if len(complete) == 1 or _is_this_dataset(located, spec):
            return located
    if complete:  # none holds this data set: the first one's checksum error says so
        return complete[0]
    if found:
        partial = found[0]
        missing = [FILE_NAMES[k] + ".gz" for k in FILE_KEYS if k not in partial.files]
        raise RobustkitError(
            f"{partial.folder} holds only part of {name}: missing {', '.join(missing)}; "
            "copy the missing files there or run robustkit data --download"
        )
    if not download:
        raise RobustkitError(
            f"{name} files not found in {', '.join(str(r) for _, r in search_roots(data_dir))}: "
            f"copy them into one of these folders, set {DATA_ENV}, or allow a download"
        )
    return _download(spec)


def _is_this_dataset(located: Located, spec: DatasetSpec) -> bool:
    """Whether the folder's test labels (10 kB) are this data set's: MNIST and Fashion-MNIST
    share file names, so a flat folder of one must not be taken for the other."""
    path = located.files["test_labels"]
    return hashlib.md5(read_bytes(path)).hexdigest() == spec.raw_md5["test_labels"]


def validation_indices(n_train: int, val_size: int, split_seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed random partition of the training indices into (train, validation).

    It depends only on ``n_train``, ``val_size`` and ``split_seed``, never on the training seed,
    so every model of an experiment is selected on the same validation images.
    """
    if not 0 <= val_size < n_train:
        raise RobustkitError(
            f"data.val_size = {val_size} must be in [0, {n_train}): lower it"
        )
    generator = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(n_train, generator=generator)
    return order[val_size:].sort().values, order[:val_size].sort().values


def load_dataset(
    name: str = "mnist",
    data_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    val_size: int = 5000,
    split_seed: int = 0,
    download: bool = True,
    parts: tuple[str, ...] = ("train", "test"),
) -> Dataset:
    """Load a data set as whole tensors on ``device``, checksums verified.

    ``parts=("test",)`` reads only the test files (``robustkit attack``); train and validation
    are then empty.
    """
    spec = dataset_spec(name)
    located = find_dataset_files(name, data_dir, download=download)
    keys = tuple(f"{part}_{kind}" for part in parts for kind in ("images", "labels"))
    arrays = load_split_files(located, spec, keys)
    folder = portable_path(located.folder)
    provenance = {"data_source": f"{name} ({folder})" if folder else name,
                  "data_checksum": "md5 of " + ", ".join(
                      FILE_NAMES[k] for k in keys) + " match the canonical files"}
    splits = {}
    for part in parts:
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or images.shape[0] != labels.shape[0]:
            raise RobustkitError(
                f"{located.folder}: {part} images {images.shape} and labels {labels.shape} "
                "do not match; replace the files"
            )
        x = torch.from_numpy(images.copy()).to(device).unsqueeze(1).float().div_(255.0)
        y = torch.from_numpy(labels.astype(np.int64)).to(device)
        splits[part] = Split(x, y)
    if "train" not in splits:
        nothing = empty_split(splits["test"])
        return Dataset(spec.name, spec.classes, nothing, nothing, splits["test"], located.folder,
                       provenance)
    train, val = split_validation(splits["train"], val_size, split_seed)
    return Dataset(spec.name, spec.classes, train, val, splits["test"], located.folder,
                   provenance)


def split_validation(full: Split, val_size: int, split_seed: int = 0) -> tuple[Split, Split]:
    """(train, validation) by :func:`validation_indices`."""
    device = full.images.device
    train_idx, val_idx = validation_indices(len(full), val_size, split_seed)
    train = Split(full.images[train_idx.to(device)], full.labels[train_idx.to(device)])
    val = Split(full.images[val_idx.to(device)], full.labels[val_idx.to(device)])
    return train, val


def batches(
    split: Split, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches as slices of a permutation drawn from ``generator`` (in order when None)."""
    n = len(split)
    if generator is None:
        for start in range(0, n, batch_size):
            yield split.images[start:start + batch_size], split.labels[start:start + batch_size]
        return
    order = torch.randperm(n, generator=generator).to(split.images.device)
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        yield split.images[index], split.labels[index]
