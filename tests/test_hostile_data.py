"""Hostile data (issue #31): 16-bit PNGs, class counts taken from labels instead of the model,
PIL's exceptions on crafted images, npz compression bombs, user code printing into the
``--json`` document, bfloat16 array files, and what an interrupted ``attack`` says and a
resumed one prints."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustkit.sources import load_data
from tests.test_hostile_input import run

LINEAR = textwrap.dedent("""
    from torch import nn

    def linear():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
""")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``linear.py``: ``linear:linear``, an untrained 10-class MNIST-shaped net."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "linear.py").write_text(LINEAR)
    return folder


def digits(n: int, seed: int = 0) -> np.ndarray:
    """uint8 N×28×28 images that hold every grey level 0–255."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    return images


def npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images, labels=labels)
    return path


def attack(data: Path, out: Path, models: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("attack", "--model", "linear:linear", "--data", str(data), "--attack", "fgsm",
               "--eps", "0,0.1", "--n", "50", "-q", "--out", str(out), *extra,
               extra_path=models)


# --------------------------------------------------------------------------- 4: 16-bit PNGs


def _png_folder(root: Path, images: list[np.ndarray], suffix: str = ".png") -> Path:
    """The images as ``root/0/`` and ``root/1/`` (even and odd positions)."""
    for i, image in enumerate(images):
        folder = root / str(i % 2)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}{suffix}")
    return root


def test_16_bit_grey_pngs_decode_like_their_8_bit_versions(tmp_path: Path) -> None:
    images = list(digits(6))
    eight = _png_folder(tmp_path / "8", images)
    sixteen = _png_folder(tmp_path / "16", [im.astype(np.uint16) * 257 for im in images])
    wide = _png_folder(tmp_path / "32", [im.astype(np.int32) * 257 for im in images], ".tif")
    with Image.open(next((sixteen / "0").iterdir())) as probe:
        assert probe.mode == "I;16"
    expected = load_data(str(eight), parts=("test",)).test.images
    assert float(expected.max()) == 1.0 and float((expected == 1.0).float().mean()) < 0.01
    for folder in (sixteen, wide):
        assert torch.equal(load_data(str(folder), parts=("test",)).test.images, expected)


def test_16_bit_pngs_beside_colour_ones_and_resized(tmp_path: Path) -> None:
    images = digits(4)
    colour = np.repeat(images[..., None], 3, axis=-1)
    mixed = _png_folder(tmp_path / "mixed", [colour[0], images[1].astype(np.uint16) * 257,
                                             colour[2], images[3].astype(np.uint16) * 257])
    loaded = load_data(str(mixed), parts=("test",)).test.images
    assert loaded.shape == (4, 3, 28, 28)
    reference = torch.from_numpy(images[[0, 2, 1, 3]]).float().div(255)  # class 0, then 1
    assert torch.equal(loaded, reference[:, None].expand(-1, 3, -1, -1))
    small = load_data(str(mixed), parts=("test",), resize=(14, 14)).test.images
    assert small.shape == (4, 3, 14, 14) and 0.0 <= float(small.min()) <= float(small.max()) <= 1
