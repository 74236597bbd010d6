"""Any image-classification data as a :class:`~robustkit.data.Dataset`: the ``--data`` option and
``data.source`` in configs.

A source is one of

* ``mnist`` or ``fashion-mnist``: the built-in IDX files (:mod:`robustkit.data`);
* a torchvision data set by name (``cifar10``, ``cifar100``, ``svhn``): found in ``--data-dir``,
  ``$ROBUSTKIT_DATA/<name>`` or the cache ``~/.cache/robustkit/<name>`` in torchvision's own
  layout, downloaded into the cache when none has it;
* an array file, ``.npz`` or ``.safetensors``: ``images`` + ``labels`` (one split, evaluated as
  the test set), or ``train_images``/``train_labels`` + ``test_images``/``test_labels``;
  optional ``classes`` (npz: an array of names; safetensors: a JSON list in the metadata);
* an image folder in torchvision's ``ImageFolder`` layout: ``class_name/*.png|jpg|…`` (one split)
  or ``train/class_name/…`` + ``test/class_name/…`` (``val/`` is accepted for ``test/``).

A built-in name is the built-in set even where the current folder holds a folder of that name
(``mnist/``): only a path the user writes (``./mnist``, ``data/mnist``) names a folder.

Images become float32 ``[N, C, H, W]`` in [0, 1], whatever their layout (N×C×H×W, N×H×W×C or
N×H×W) and type (uint8 0–255, float already in [0, 1], bfloat16 included; 16-bit grey images in
a folder are scaled by 65535); ε therefore stays in pixel units. Images are resized only when
asked (``resize``), with antialiased bilinear interpolation; an image folder whose images differ
in size is refused with a message naming ``--resize``.

Array files are read member by member from their headers: no array above
:data:`MAX_ARRAY_BYTES` is inflated (a compressed npz can hold far more than its size), only the
members the requested splits need are read, and with ``limit`` only the first images of the test
split (an evaluation of ``--n`` images reads ``--n``). Labels must be class indices below
:data:`MAX_CLASSES`; unreadable or crafted images (bad chunks, decompression bombs) are one
:class:`RobustkitError` naming the file.

Every loaded data set records its provenance: the source, the number of images and a sha256 of
the source files (array files; an image folder's files in sorted order) or of the decoded arrays
(torchvision sets).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor

from robustkit.data import (
    DATA_ENV,
    DATASETS,
    Dataset,
    Split,
    cache_dir,
    empty_split,
    load_dataset,
    portable_path,
    split_validation,
)
from robustkit.errors import RobustkitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                  ".webp"}
ARRAY_SUFFIXES = {".npz", ".safetensors"}
#: The most robustkit reads of one array in an array file (a float32 CIFAR-10 training set is
#: 614 MB); a larger array is refused from its header, before anything is inflated.
MAX_ARRAY_BYTES = 2**30
#: Labels are class indices below this: class names are built for each index up to the
#: largest label, so one stray huge label must not build millions of them.
MAX_CLASSES = 100_000
#: Image modes of 16-bit grey pixels (PIL opens 16-bit PNGs as ``I;16``, some files as ``I``):
#: scaled by 65535, not clipped to 255 as a conversion to ``L`` would.
WIDE_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
GREY_MODES = {"1", "L", *WIDE_GREY_MODES}
#: torchvision data sets robustkit knows how to read: (class name, split argument style)
TORCHVISION = {"cifar10": ("CIFAR10", "train"), "cifar100": ("CIFAR100", "train"),
               "svhn": ("SVHN", "split")}
CHOICES = (f"{', '.join(DATASETS)}, {', '.join(TORCHVISION)}, a .npz or .safetensors file, "
           "or an image folder (class_name/*.png)")


def load_data(
    source: str | None = None,
    *,
    dataset: str = "mnist",
    data_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    val_size: int = 5000,
    split_seed: int = 0,
    parts: tuple[str, ...] = ("train", "test"),
    resize: Sequence[int] | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load ``source`` (default: the built-in ``dataset``) as whole tensors on ``device``.

    ``parts=("test",)`` loads only what an evaluation needs; a single-split source (one array
    pair, a flat image folder) can only be evaluated, not trained on. ``limit``: keep only the
    first ``limit`` test images (array files and image folders read no more than those).
    """
    name = (source or dataset).strip()
    size = _resize_shape(resize)
    builtin = builtin_name(name)
    if builtin in DATASETS:
        data = load_dataset(builtin, data_dir, device, val_size=val_size,
                            split_seed=split_seed, parts=parts)
        return data if size is None else _resized(data, size)
    (splits, named, digest), kind, path = _read_source(name, data_dir, size, parts, limit)
    images, labels = _as_tensors(name, splits, size)
    classes = _class_names(name, named, labels)
    split = {part: Split(images[part].to(device), labels[part].to(device)) for part in images}
    train, val = _train_and_val(name, split, parts, val_size, split_seed)
    shown = portable_path(path) or path.name  # the sha256 identifies the files, not the folder
    provenance = {"data_source": f"{kind} {shown}", "data_size": _sizes(split),
                  "data_sha256": digest}
    return Dataset(path.name, classes, train, val, split["test"], path, provenance)


#: What a reader returns: the (images, labels) arrays of each split it found, the class names
#: the source gives (empty: none) and a sha256 of the source.
_Read = tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...], str]


def builtin_name(source: str) -> str | None:
    """The built-in data set ``source`` names (lower case), or None for a path.

    A bare name of a built-in set (``mnist``, ``fashion-mnist``, ``cifar10``, …, any case)
    always means that set, even when the current folder holds a folder or file of that name;
    a path the user writes (``./mnist``, ``data/mnist``, ``/abs/mnist``, ``~/mnist``) means
    the folder or file."""
    name = source.strip().lower()
    if "/" in name or os.sep in name:
        return None
    return name if name in DATASETS or name in TORCHVISION else None


def _read_source(name: str, data_dir: str | Path | None, size: tuple[int, int] | None,
                 parts: tuple[str, ...], limit: int | None) -> tuple[_Read, str, Path]:
    """Read a source other than the built-in IDX sets: what its reader found, the kind of
    source (for the provenance) and the path it goes by. A torchvision name
    (:func:`builtin_name`) is that data set; otherwise an array file is recognised by its
    suffix or by being a file, then an image folder; anything else is a user error listing
    the choices. The test split is cut to its first ``limit`` images."""
    builtin = builtin_name(name)
    if builtin in TORCHVISION:
        splits, classes, digest = _read_torchvision(builtin, data_dir)
        test_x, test_y = splits["test"]
        splits["test"] = (test_x[:limit], test_y[:limit])
        return (splits, classes, digest), "torchvision", Path(builtin)
    path = Path(name).expanduser()
    if path.suffix.lower() in ARRAY_SUFFIXES or path.is_file():
        return _read_arrays(path, parts, limit), "array file", path
    if path.is_dir():
        return _read_folder(path, size, limit), "image folder", path
    raise RobustkitError(f"data source {name!r} not found: pass {CHOICES}")


def _as_tensors(name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                size: tuple[int, int] | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The float32 N×C×H×W images (resized to ``size`` if given) and int64 labels of each
    split; all images must then share one shape (else a user error naming --resize)."""
    images = {part: _to_float(x, f"{name} {part} images") for part, (x, _) in splits.items()}
    labels = {part: _to_labels(y, len(images[part]), f"{name} {part} labels")
              for part, (_, y) in splits.items()}
    if size is not None:
        images = {part: _interpolate(x, size) for part, x in images.items()}
    shapes = {tuple(x.shape[1:]) for x in images.values()}
    if len(shapes) > 1:
        raise RobustkitError(f"{name}: train and test images differ in shape "
                             f"({', '.join(map(str, sorted(shapes)))}): pass --resize H,W")
    return images, labels


def _class_names(name: str, named: tuple[str, ...], labels: dict[str, Tensor]
                 ) -> tuple[str, ...]:
    """The source's class names, else ``0``, ``1``, … up to the largest label; a label beyond
    the names given, or (without names) of :data:`MAX_CLASSES` or more, is a user error."""
    num_classes = max(int(y.max()) + 1 if len(y) else 0 for y in labels.values())
    if not named and num_classes > MAX_CLASSES:
        raise RobustkitError(
            f"{name}: a label is {num_classes - 1}, but labels are class indices and robustkit "
            f"takes at most {MAX_CLASSES} classes (labels 0 to {MAX_CLASSES - 1}): fix the "
            "labels")
    classes = named or tuple(str(i) for i in range(num_classes))
    if num_classes > len(classes):
        raise RobustkitError(f"{name}: a label is {num_classes - 1} but only {len(classes)} "
                             "classes are named; fix the labels or the class names")
    return classes


def _train_and_val(name: str, split: dict[str, Split], parts: tuple[str, ...], val_size: int,
                   split_seed: int) -> tuple[Split, Split]:
    """The training and validation splits: the train split less ``val_size`` held-out images
    when ``parts`` asks for training, else one empty split for both. Asking to train on a
    single-split source is a user error."""
    if "train" in parts and "train" not in split:
        raise RobustkitError(
            f"{name} holds one split, which robustkit evaluates as the test set; to train, give "
            "train_images/train_labels and test_images/test_labels (array file) or train/ and "
            "test/ sub-folders (image folder)")
    test = split["test"]
    if "train" in split and "train" in parts:
        return split_validation(split["train"], val_size, split_seed)
    empty = empty_split(test)
    return empty, empty


def _sizes(splits: dict[str, Split]) -> str:
    c, h, w = (int(v) for v in next(iter(splits.values())).images.shape[1:])
    counts = ", ".join(f"{len(s)} {part}" for part, s in splits.items())
    return f"{counts} images of {c}×{h}×{w}"


# --------------------------------------------------------------------------- conversions


def _resize_shape(resize: Sequence[int] | None) -> tuple[int, int] | None:
    if resize is None or len(resize) == 0:
        return None
    if len(resize) > 2 or any(int(v) < 1 for v in resize):
        raise RobustkitError(f"resize {list(resize)}: give H or H,W, positive pixel counts")
    h, w = (int(resize[0]), int(resize[-1]))
    return h, w


def _interpolate(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    out = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True,
                                          align_corners=False)
    return out.clamp_(0.0, 1.0)


def _resized(data: Dataset, size: tuple[int, int]) -> Dataset:
    def one(s: Split) -> Split:
        return Split(_interpolate(s.images, size), s.labels)

    return Dataset(data.name, data.classes, one(data.train), one(data.val), one(data.test),
                   data.source, {**data.provenance, "data_resize": f"{size[0]}×{size[1]}"})


def _to_float(array: np.ndarray, what: str) -> Tensor:
    """N×C×H×W, N×H×W×C or N×H×W; uint8 0–255 or float in [0, 1] → float32 N×C×H×W."""
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise RobustkitError(f"{what} have shape {list(array.shape)}: expected N×C×H×W, "
                             "N×H×W×C or N×H×W")
    channels_first = array.shape[1] in (1, 3, 4)
    channels_last = array.shape[-1] in (1, 3, 4)
    if channels_last and not channels_first:
        array = array.transpose(0, 3, 1, 2)
    elif not channels_first:
        raise RobustkitError(f"{what} have shape {list(array.shape)}: no axis of 1, 3 or 4 "
                             "channels after N; expected N×C×H×W or N×H×W×C")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise RobustkitError(f"{what} are {array.dtype}: give uint8 (0–255) or floats in [0, 1]")
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if len(x) and not bool(torch.isfinite(x).all()):
        raise RobustkitError(f"{what} contain nan or inf")
    if len(x) and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise RobustkitError(
            f"{what} lie in [{float(x.min()):g}, {float(x.max()):g}]: robustkit needs pixels in "
            "[0, 1] (ε is in pixel units): store uint8 or divide by 255, and give the model its "
            "normalisation with --normalize")
    return x


def _to_labels(array: np.ndarray, n: int, what: str) -> Tensor:
    if array.ndim != 1 or len(array) != n:
        raise RobustkitError(f"{what} have shape {list(array.shape)}: expected {n} integer "
                             "labels, one per image")
    whole = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and bool(np.all(array == np.round(array))))
    if not whole:
        raise RobustkitError(f"{what} are {array.dtype}: expected integer class indices")
    labels = torch.from_numpy(array.astype(np.int64))
    if len(labels) and int(labels.min()) < 0:
        raise RobustkitError(f"{what} hold {int(labels.min())}: class indices start at 0")
    return labels


def _file_digest(paths: Sequence[Path], root: Path | None = None) -> str:
    """sha256 over the files' relative names and contents, in the order given (each file read
    a block at a time)."""
    digest = hashlib.sha256()
    for path in paths:
        if root is not None:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(READ_BLOCK):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- array files


#: How much of a file is read or inflated at a time.
READ_BLOCK = 16 * 2**20
#: Bytes per element of the safetensors types robustkit reads.
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2,
                        "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
                        "U64": 8, "F64": 8}
#: The safetensors types numpy has no type for: read through torch and widened to float32.
TORCH_ONLY = {"BF16", "F8_E4M3", "F8_E5M2"}

#: What an .npy header may take besides the array data (numpy writes at most 64 KiB).
NPY_HEADER_ROOM = 2**16
#: A member reader: (member name, how many leading items or None for all) → the array.
_Member = Callable[[str, "int | None"], np.ndarray]


def _read_arrays(path: Path, parts: tuple[str, ...], limit: int | None) -> _Read:
    """The splits of an array file that ``parts`` needs (the test split always, its first
    ``limit`` images only), its class names and its sha256. Arrays are read from their
    headers on: none above :data:`MAX_ARRAY_BYTES`, no member that is not needed."""
    if not path.is_file():
        raise RobustkitError(f"data file {path} not found: check --data")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            splits, classes = _read_safetensors(path, parts, limit)
        else:
            splits, classes = _read_npz(path, parts, limit)
    except RobustkitError:
        raise
    except Exception as exc:  # numpy, zipfile and safetensors raise many types on a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RobustkitError(f"{path} cannot be read as {suffix or 'an array file'} ({first}): "
                             "save it with numpy.savez or safetensors (no pickled objects)"
                             ) from None
    return splits, classes, _file_digest([path])


def _split_members(path: Path, names: set[str], parts: tuple[str, ...]
                   ) -> dict[str, tuple[str, str]]:
    """The (images, labels) member names of each split to read: ``images``/``labels`` (one
    split, the test set), else ``PART_images``/``PART_labels`` of the test split and, when
    ``parts`` asks for it, the train split."""
    if {"images", "labels"} <= names:
        return {"test": ("images", "labels")}
    if {"test_images", "test_labels"} <= names:
        return {part: (f"{part}_images", f"{part}_labels") for part in ("train", "test")
                if {f"{part}_images", f"{part}_labels"} <= names
                and (part == "test" or part in parts)}
    raise RobustkitError(
        f"{path} holds {', '.join(sorted(names)) or 'no arrays'}: expected images and "
        "labels, or train_images, train_labels, test_images and test_labels")


def _read_splits(members: dict[str, tuple[str, str]], read: _Member, limit: int | None
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split's (images, labels) through ``read``; the test split's first ``limit``."""
    def count(part: str) -> int | None:
        return limit if part == "test" else None

    return {part: (read(x, count(part)), read(y, count(part)))
            for part, (x, y) in members.items()}


def _check_array_size(path: Path, name: str, nbytes: int, what: str,
                      room: int = 0) -> None:
    """Refuse an array of more than :data:`MAX_ARRAY_BYTES` (plus ``room``, for headers)
    before it is read; ``what`` says what it is (its shape and type, or its zip entry)."""
    if nbytes > MAX_ARRAY_BYTES + room:
        raise RobustkitError(
            f"{path}: {name} is {what} of {nbytes / 2**20:,.0f} MiB, more than the "
            f"{MAX_ARRAY_BYTES >> 20} MiB robustkit reads of one array: store the images as "
            "uint8 or split the file (a compressed npz can hold far more than its size)")


def _read_npz(path: Path, parts: tuple[str, ...], limit: int | None
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...]]:
    """The splits and class names of an ``.npz`` archive (np.savez or np.savez_compressed)."""
    with zipfile.ZipFile(path) as archive:
        names = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}

        def read(name: str, count: int | None) -> np.ndarray:
            return _npz_member(path, archive, name, count)

        splits = _read_splits(_split_members(path, names - {"classes"}, parts), read, limit)
        named = read("classes", None) if "classes" in names else None
    return splits, tuple(str(c) for c in named) if named is not None else ()


def _npz_member(path: Path, archive: zipfile.ZipFile, name: str, count: int | None
                ) -> np.ndarray:
    """One member of an npz archive, its first ``count`` items only when given: the size the
    zip entry declares and the shape its .npy header declares are checked first, and a
    compressed member is inflated only as far as the items read."""
    info = archive.getinfo(f"{name}.npy")
    _check_array_size(path, name, info.file_size, "a zip entry", room=NPY_HEADER_ROOM)
    with archive.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"npy format {version[0]}.{version[1]} is not supported")
        if dtype.hasobject:
            raise ValueError("object arrays cannot be loaded when allow_pickle=False")
        _check_array_size(path, name, math.prod(shape) * dtype.itemsize,
                          f"{list(shape)} {dtype}")
        if count is not None and shape and not fortran:
            shape = (min(count, shape[0]), *shape[1:])
        array = _read_exactly(handle, shape, dtype, fortran)
    return array[:count] if count is not None and array.ndim else array


def _read_exactly(handle: IO[bytes], shape: tuple[int, ...], dtype: np.dtype[Any],
                  fortran: bool) -> np.ndarray:
    """The array of ``shape`` and ``dtype`` whose bytes come next in ``handle``, read a block
    at a time into one writable buffer."""
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes, dtype=np.uint8)
    done = 0
    while done < nbytes:
        block = handle.read(min(READ_BLOCK, nbytes - done))
        if not block:
            raise ValueError(f"the array data ends after {done} of {nbytes} bytes")
        buffer[done:done + len(block)] = np.frombuffer(block, dtype=np.uint8)
        done += len(block)
    return buffer.view(dtype).reshape(shape, order="F" if fortran else "C")


def _read_safetensors(path: Path, parts: tuple[str, ...], limit: int | None
                      ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...]]:
    """The splits and class names (a JSON list in the metadata) of a ``.safetensors`` file;
    its tensors are mapped, so reading the first items reads only those."""
    with safe_open(str(path), framework="np") as handle:
        def read(name: str, count: int | None) -> np.ndarray:
            return _safetensors_member(path, handle, name, count)

        names = set(handle.keys())
        splits = _read_splits(_split_members(path, names, parts), read, limit)
        meta = handle.metadata() or {}
    classes = tuple(json.loads(meta["classes"])) if "classes" in meta else ()
    return splits, tuple(str(c) for c in classes)


def _safetensors_member(path: Path, handle: Any, name: str, count: int | None) -> np.ndarray:
    """One tensor of a safetensors file (its first ``count`` items when given); bfloat16 and
    float8, which numpy lacks, widened to float32."""
    piece = handle.get_slice(name)
    shape, kind = tuple(piece.get_shape()), str(piece.get_dtype())
    if kind not in SAFETENSORS_ITEMSIZE:
        raise RobustkitError(
            f"{path}: {name} is {kind}, a type robustkit does not read: store images as uint8 "
            "or floats in [0, 1] (float16, bfloat16, float32, float64), labels as integers")
    _check_array_size(path, name, math.prod(shape) * SAFETENSORS_ITEMSIZE[kind],
                      f"{list(shape)} {kind}")
    whole = count is None or not shape
    if kind in TORCH_ONLY:
        with safe_open(str(path), framework="pt") as wide:
            tensor = wide.get_tensor(name) if whole else wide.get_slice(name)[:count]
        return np.asarray(tensor.float().numpy())
    return np.asarray(handle.get_tensor(name) if whole else piece[:count])


# --------------------------------------------------------------------------- image folders


def _class_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _read_folder(root: Path, size: tuple[int, int] | None, limit: int | None) -> _Read:
    names = {p.name for p in _class_folders(root)}
    test_name = "test" if "test" in names else "val" if "val" in names else None
    if "train" in names and test_name is not None:
        parts = {"train": root / "train", "test": root / test_name}
    else:
        parts = {"test": root}
    classes = tuple(p.name for p in _class_folders(parts["test"]))
    if not classes:
        raise RobustkitError(f"{root} has no class folders: lay it out as class_name/image.png "
                             "(torchvision ImageFolder), optionally under train/ and test/")
    splits, files = {}, []
    for part, folder in parts.items():
        found = tuple(p.name for p in _class_folders(folder))
        if found != classes:
            raise RobustkitError(f"{folder} has classes {list(found)}, {parts['test']} has "
                                 f"{list(classes)}: both need the same class folders")
        images, labels = [], []
        for label, class_dir in enumerate(_class_folders(folder)):
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(path)
                    labels.append(label)
        if not images:
            raise RobustkitError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += images
        if part == "test":  # the checksum covers every file, the decoding only those kept
            images, labels = images[:limit], labels[:limit]
        splits[part] = (_decode(images, size, root), np.asarray(labels, dtype=np.int64))
    return splits, classes, _file_digest(files, root)


def _decode(paths: list[Path], size: tuple[int, int] | None, root: Path) -> np.ndarray:
    """The images as N×H×W×C, grey when every file is grey, else RGB: uint8 when every image
    has 8-bit channels, else float32 in [0, 1] (16-bit grey divided by 65535, 8-bit by 255,
    so a 16-bit copy of an 8-bit image gives the same values)."""
    opened = [_open_image(path) for path in paths]
    grey = all(im.mode in GREY_MODES for im in opened)
    wide = any(im.mode in WIDE_GREY_MODES for im in opened)
    arrays = []
    first_size = None
    for path, original in zip(paths, opened, strict=True):
        image = _wide_grey(original, path) if original.mode in WIDE_GREY_MODES else (
            original.convert("L" if grey else "RGB"))
        if size is not None:
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        if first_size is None:
            first_size = image.size
        elif image.size != first_size:
            raise RobustkitError(
                f"{path.relative_to(root)} is {image.size[0]}×{image.size[1]} pixels, other "
                f"images {first_size[0]}×{first_size[1]}: pass --resize H,W (data.resize) to "
                "bring them to one size")
        arrays.append(_pixels(image, grey, wide))
    return np.stack(arrays)


def _open_image(path: Path) -> Image.Image:
    """The decoded image in ``path``; any failure (not an image, a damaged or crafted file:
    bad chunks, oversized text, a decompression bomb) is one error naming the file."""
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb…
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RobustkitError(f"{path} is not a readable image ({first}): remove or replace it"
                             ) from None


def _wide_grey(image: Image.Image, path: Path) -> Image.Image:
    """A 16-bit grey image as a float image (mode ``F``) in [0, 1]: its values divided by
    65535; values outside 16 bits (32-bit ``I`` images) are refused."""
    values = np.asarray(image)
    if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
        raise RobustkitError(
            f"{path} holds pixel values in [{int(values.min())}, {int(values.max())}], beyond "
            "16 bits: save it as an 8- or 16-bit image")
    return Image.fromarray(values.astype(np.float32) / np.float32(65535))


def _pixels(image: Image.Image, grey: bool, wide: bool) -> np.ndarray:
    """H×W×C pixels of an ``L``, ``RGB`` or ``F`` (already in [0, 1]) image: uint8, or float32
    in [0, 1] when ``wide`` (some image of the set has 16-bit values); an ``F`` image gets
    three equal channels when the set is not ``grey``."""
    array = np.asarray(image)
    if wide and array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255)
    if array.ndim == 2:
        array = array[..., None] if grey else np.repeat(array[..., None], 3, axis=-1)
    return array


# --------------------------------------------------------------------------- torchvision


def _torchvision_roots(name: str, data_dir: str | Path | None) -> list[Path]:
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get(DATA_ENV):
        roots.append(Path(os.environ[DATA_ENV]).expanduser() / name)
    roots.append(cache_dir() / name)
    return roots


def _read_torchvision(name: str, data_dir: str | Path | None) -> _Read:
    import torchvision

    class_name, style = TORCHVISION[name]
    cls = getattr(torchvision.datasets, class_name)

    def build(root: Path, part: str, download: bool) -> Any:
        if style == "split":
            return cls(root=str(root), split=part, download=download)
        return cls(root=str(root), train=part == "train", download=download)

    roots = _torchvision_roots(name, data_dir)
    sets: dict[str, Any] = {}
    for root in roots:
        try:
            sets = {part: build(root, part, False) for part in ("train", "test")}
            break
        except (RuntimeError, OSError):
            continue
    if not sets:
        target = roots[-1]
        try:
            sets = {part: build(target, part, True) for part in ("train", "test")}
        except Exception as exc:  # network errors come in many types
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise RobustkitError(
                f"{name} not found in {', '.join(str(r) for r in roots)} and the download "
                f"failed ({reason}): download it once where you are online (robustkit attack "
                f"--data {name} fetches it into {target}) and copy that folder here, or pass "
                "--data-dir DIR") from None
    splits = {}
    digest = hashlib.sha256()
    for part, ds in sets.items():
        images = np.asarray(ds.data)
        labels = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets")
                            else ds.labels, dtype=np.int64)
        splits[part] = (images, labels)
        digest.update(images.tobytes())
        digest.update(labels.tobytes())
    classes = tuple(getattr(sets["test"], "classes", ()) or (str(i) for i in range(10)))
    return splits, classes, digest.hexdigest()


def load_configured(data: Any, device: torch.device | str = "cpu",
                    parts: tuple[str, ...] = ("train", "test")) -> Dataset:
    """:func:`load_data` from a config's ``[data]`` section (``config.DataConfig``)."""
    return load_data(data.source, dataset=data.dataset, data_dir=data.dir, device=device,
                     val_size=data.val_size, split_seed=data.split_seed, parts=parts,
                     resize=data.resize)
