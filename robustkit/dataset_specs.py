"""The built-in data sets, declared once and torch-free: their class names and the canonical
md5 of each file's uncompressed IDX content (:mod:`robustkit.data` loads them; reports read
their class names without loading torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    """What a data set is: its files' canonical md5s (of the uncompressed IDX content)."""

    name: str
    torchvision_name: str
    classes: tuple[str, ...]
    raw_md5: dict[str, str]
    system_dirs: tuple[str, ...] = ()


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        torchvision_name="MNIST",
        classes=tuple(str(d) for d in range(10)),
        raw_md5={
            "train_images": "6bbc9ace898e44ae57da46a324031adb",
            "train_labels": "a25bea736e30d166cdddb491f175f624",
            "test_images": "2646ac647ad5339dbf082846283269ea",
            "test_labels": "27ae3e4e09519cfbb04c329615203637",
        },
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        torchvision_name="FashionMNIST",
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        raw_md5={
            "train_images": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train_labels": "9018921c3c673c538a1fc5bad174d6f9",
            "test_images": "8181f5470baa50b63fa0f6fddb340f0a",
            "test_labels": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}
