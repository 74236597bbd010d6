"""Hostile data (issue #31): 16-bit PNGs, class counts taken from labels instead of the model,
PIL's exceptions on crafted images, npz compression bombs, user code printing into the
``--json`` document, bfloat16 array files, and what an interrupted ``attack`` says and a
resumed one prints."""

from __future__ import annotations

import io
import json
import resource
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

from robustkit.errors import RobustkitError
from robustkit.outputs import staging_path
from robustkit.sources import MAX_ARRAY_BYTES, load_data
from tests.conftest import REPO, assert_user_error, cli, robustkit_env, run
from tests.test_hostile_input import _interrupt_when, _popen

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
               path=[models])


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


# --------------------------------------------------------------------------- 5: class count


def test_labels_below_the_models_width_are_evaluated(tmp_path: Path, models: Path) -> None:
    """Labels 0–7 and a 10-class model: K comes from the model, not from the largest label."""
    rng = np.random.default_rng(1)
    data = npz(tmp_path / "d.npz", digits(60), rng.integers(0, 8, 60))
    result = attack(data, tmp_path / "o", models)
    assert result.returncode == 0, result.stderr
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert settings["classes"] == [str(i) for i in range(10)]


def test_a_label_beyond_the_models_width_is_named(tmp_path: Path, models: Path) -> None:
    labels = np.zeros(60, dtype=np.int64)
    labels[7] = 12
    result = attack(npz(tmp_path / "d.npz", digits(60), labels), tmp_path / "o", models)
    assert_user_error(result, "label 12", "returns 10 logits")
    assert "expected [N, 13]" not in result.stderr


def _limit_memory() -> None:
    """Room for torch, not for a billion class names: a regression fails with MemoryError
    instead of taking the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))


def test_a_huge_label_builds_no_class_names(tmp_path: Path) -> None:
    labels = np.zeros(10, dtype=np.int64)
    labels[3] = 10**9
    data = npz(tmp_path / "d.npz", digits(10), labels)
    result = run("data", "--data", str(data), preexec=_limit_memory)
    assert_user_error(result, "1000000000", str(data))
    with pytest.raises(RobustkitError, match="at most 100000 classes"):
        load_data(str(data), parts=("test",))


def test_one_class_data_is_refused_before_training(tmp_path: Path) -> None:
    zeros = np.zeros(60, dtype=np.int64)
    np.savez(tmp_path / "d.npz", train_images=digits(60), train_labels=zeros,
             test_images=digits(20, seed=1), test_labels=zeros[:20])
    config = tmp_path / "c.toml"
    config.write_text('[model]\narch = "mlp"\n[train]\nepochs = 1\n[data]\nval_size = 10\n')
    result = run("train", str(config), "--data", str(tmp_path / "d.npz"), "-q", "--out",
                 str(tmp_path / "t"))
    assert_user_error(result, "one class", "at least two")
    assert not (tmp_path / "t" / "metrics.csv").exists()


# --------------------------------------------------------------------------- 6: PIL errors


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _header(width: int, height: int) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def garbled_chunk_png() -> bytes:
    """A grey 28×28 PNG whose image data is split over two chunks, the second with a garbled
    chunk header: PIL raises SyntaxError while decoding."""
    body = zlib.compress(b"".join(b"\x00" + bytes(range(28)) for _ in range(28)))
    half = len(body) // 2
    return (PNG_SIGNATURE + _header(28, 28) + _chunk(b"IDAT", body[:half])
            + struct.pack(">I", len(body) - half) + b"\x01\x02\x03\x04" + body[half:]
            + _chunk(b"IEND", b""))


def oversized_ztxt_png() -> bytes:
    """A PNG with a 2 MB compressed text chunk: PIL raises ValueError above its 1 MB limit."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 2**21, zip=True)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A PNG whose header claims 20000×20000 pixels (400 MB) over a one-row body: PIL raises
    DecompressionBombError. Nothing of that size is allocated here."""
    return (PNG_SIGNATURE + _header(20000, 20000)
            + _chunk(b"IDAT", zlib.compress(bytes(20001))) + _chunk(b"IEND", b""))


@pytest.mark.parametrize(("make", "fragment"), [
    (garbled_chunk_png, "broken PNG file"),
    (oversized_ztxt_png, "MAX_TEXT_CHUNK"),
    (bomb_png, "exceeds limit"),
])
def test_crafted_pngs_are_one_error_naming_the_file(make: Callable[[], bytes], fragment: str,
                                                     tmp_path: Path) -> None:
    folder = tmp_path / "images" / "digit"
    _png_folder(tmp_path / "images", [digits(1)[0]])
    folder.mkdir(parents=True)
    bad = folder / "bad.png"
    bad.write_bytes(make())
    assert bad.stat().st_size < 2**20
    assert_user_error(cli("data", "--data", str(tmp_path / "images")), str(bad), fragment)


# --------------------------------------------------------------------------- 8: npz bombs


def write_npz_bomb(path: Path, images: int, *, declared: int | None = None) -> Path:
    """A compressed npz of ``images`` zero images of 28×28 (and as many zero labels), written
    16 MiB at a time: a large array in a small file. ``declared``: the image count the .npy
    header claims instead (the member then holds less than it says)."""
    block = bytes(16 * 2**20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, shape in (("images", (declared or images, 28, 28)), ("labels", (images,))):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(
                    member, {"descr": "|u1", "fortran_order": False, "shape": shape})
                left = images * (784 if name == "images" else 1)
                while left > 0:
                    member.write(block[:min(left, len(block))])
                    left -= len(block)
    return path


def peak_rss(*args: str, extra_path: Path | None = None
             ) -> tuple[subprocess.CompletedProcess[str], int]:
    """``robustkit ARGS`` in a fresh parent process, and its peak resident memory in bytes."""
    code = textwrap.dedent("""
        import resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", "robustkit", *sys.argv[1:]],
                              capture_output=True, text=True)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        sys.stdout.write(f"\\npeak-rss {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
        sys.exit(done.returncode)
    """)
    env = robustkit_env([extra_path] if extra_path else [])
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=600)
    stdout, _, peak = result.stdout.rpartition("\npeak-rss ")
    result.stdout = stdout
    return result, int(peak) * 1024


#: robustkit with torch loaded peaks near 0.75 GB; inflating a 512 MiB member and converting it
#: to float32 took it to 3.1 GB
SMALL_PEAK = 1.25 * 2**30


@pytest.mark.slow
def test_npz_bomb_above_the_cap_is_refused_before_inflating(tmp_path: Path) -> None:
    over = MAX_ARRAY_BYTES // 784 + 1000
    bomb = write_npz_bomb(tmp_path / "bomb.npz", over)
    assert bomb.stat().st_size < 2 * 2**20
    result, peak = peak_rss("data", "--data", str(bomb))
    assert_user_error(result, str(bomb), "images", "MiB")
    assert peak < SMALL_PEAK, peak


def test_npz_header_claiming_more_than_the_cap_is_refused(tmp_path: Path) -> None:
    liar = write_npz_bomb(tmp_path / "liar.npz", 10, declared=10**8)
    assert_user_error(cli("data", "--data", str(liar)), str(liar), "images", "MiB")


@pytest.mark.slow
def test_npz_bomb_below_the_cap_reads_only_what_n_needs(tmp_path: Path, models: Path) -> None:
    bomb = write_npz_bomb(tmp_path / "bomb.npz", 512 * 2**20 // 784)
    assert bomb.stat().st_size < 2**20
    result, peak = peak_rss("attack", "--model", "linear:linear", "--data", str(bomb),
                            "--attack", "fgsm", "--eps", "0,0.1", "--n", "50", "-q",
                            "--out", str(tmp_path / "o"), extra_path=models)
    assert peak < SMALL_PEAK, peak
    assert result.returncode == 0, result.stderr
    assert "50 test images" in (tmp_path / "o" / "manifest.json").read_text()


def test_uncompressed_npz_and_safetensors_read_a_prefix(tmp_path: Path) -> None:
    images, labels = digits(30), np.arange(30) % 10
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    save_file({"images": images, "labels": labels}, str(tmp_path / "d.safetensors"))
    for name in ("d.npz", "d.safetensors"):
        whole = load_data(str(tmp_path / name), parts=("test",)).test
        first = load_data(str(tmp_path / name), parts=("test",), limit=7).test
        assert len(whole) == 30 and len(first) == 7
        assert torch.equal(first.images, whole.images[:7])
        assert torch.equal(first.labels, whole.labels[:7])


# --------------------------------------------------------------------------- bfloat16


def test_bfloat16_safetensors_images_load_as_float32(tmp_path: Path) -> None:
    images = torch.from_numpy(digits(5)).float().div(256).to(torch.bfloat16)
    path = tmp_path / "d.safetensors"
    save_torch_file({"images": images, "labels": torch.arange(5)}, str(path))
    loaded = load_data(str(path), parts=("test",)).test
    assert loaded.images.dtype == torch.float32
    assert torch.equal(loaded.images[:, 0], images.float())


def test_other_dtypes_are_named_with_the_accepted_ones(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_torch_file({"images": torch.zeros(5, 28, 28, dtype=torch.int16),
                     "labels": torch.arange(5)}, str(path))
    with pytest.raises(RobustkitError, match=r"int16: give uint8 \(0–255\) or floats") as info:
        load_data(str(path), parts=("test",))
    assert "safetensors" not in str(info.value).split(":", 1)[1]


# --------------------------------------------------------------------------- 10: --json stdout


PRINTER = textwrap.dedent("""
    import os
    from torch import nn

    print("printed on import")

    class Loud(nn.Sequential):
        def forward(self, x):
            print("printed in forward")
            os.write(1, b"written to fd 1\\n")
            return super().forward(x)

    def factory():
        print("printed in the factory")
        return Loud(nn.Flatten(), nn.Linear(784, 10))
""")


def test_user_prints_stay_out_of_the_json_document(tmp_path: Path) -> None:
    (tmp_path / "printer.py").write_text(PRINTER)
    data = npz(tmp_path / "d.npz", digits(20), np.arange(20) % 10)
    result = run("attack", "--model", "printer:factory", "--data", str(data), "--attack",
                 "fgsm", "--eps", "0,0.1", "--n", "20", "-q", "--json", "--out",
                 str(tmp_path / "o"), path=[tmp_path])
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["results"]
    for text in ("printed on import", "printed in the factory", "printed in forward",
                 "written to fd 1"):
        assert text in result.stderr


# --------------------------------------------------------------------------- interrupt, resume


STUBBORN = textwrap.dedent("""
    import os
    import time

    import torch
    from torch import nn

    class Stubborn(nn.Module):
        \"\"\"Always predicts 7, with no input gradient, so PGD runs all its steps; sleeps in
        each forward while the file named by $STUBBORN_SLOW exists.\"\"\"

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.register_buffer("logits", 5 * nn.functional.one_hot(torch.tensor(7), 10) - 1.0)

        def forward(self, x):
            if os.path.exists(os.environ["STUBBORN_SLOW"]):
                time.sleep(0.05)
            return self.logits.expand(len(x), 10) + self.w * x.flatten(1)[:, :1]

    def stubborn():
        return Stubborn()
""")


@pytest.mark.slow
def test_interrupted_attack_names_the_cells_folder_and_resume_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    slow = tmp_path / "slow"
    slow.touch()
    monkeypatch.setenv("STUBBORN_SLOW", str(slow))
    labels = np.array([7, 7, 7, 7, 9, 1, 2, 3])
    data = npz(tmp_path / "d.npz", digits(8), labels)
    out = tmp_path / "s"
    args = ("attack", "--model", "stubborn:stubborn", "--data", str(data), "--attack", "pgd",
            "--steps", "100", "--eps", "0,0.1,0.2,0.3", "-q", "--out", str(out))
    sweep = _popen(*args, cwd=tmp_path)
    _interrupt_when(sweep, staging_path(out) / "sweep-state" / "state.json")
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: finished (attack, ε) cells, batches and checks are "
                           "kept in")
    assert str(staging_path(out)) in last
    assert (staging_path(out) / "sweep-state" / "state.json").is_file()

    slow.unlink()
    resumed = _popen(*args, cwd=tmp_path)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("resuming ")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("resuming 1 finished cell from ") or lines[0].startswith(
        "resuming 2 finished cells from "), lines[0]
    assert str(staging_path(out)) in lines[0]
    assert (out / "results.csv").is_file()
