"""Your own data and networks: array files, image folders, torchvision sets, 3-channel images end
to end, `model.factory` with PGD-AT, `package.module:factory` from the current folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from robustkit.errors import RobustkitError
from robustkit.sources import load_data
from tests.conftest import REPO, run

CLASSES = ("0_red", "1_green", "2_blue")  # sorted, as ImageFolder orders class folders

TINYNET = textwrap.dedent("""
    from torch import nn

    def tiny_net(width=8, classes=3):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))
""")


def robustkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # -P: the current folder is not put on sys.path, as for the installed `robustkit` script;
    # finding a user's module there is robustkit's own doing
    return run(*args, cwd=cwd, safe_path=True)


def colour_images(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×H×W×3 images whose class is the dominant channel, with noise; grouped by class
    (the order an image folder is read in)."""
    rng = np.random.default_rng(seed)
    labels = np.sort(np.arange(n) % len(CLASSES))
    images = rng.integers(0, 120, size=(n, size, size, 3))
    images[np.arange(n), :, :, labels] += 100
    return images.astype(np.uint8), labels.astype(np.int64)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")


# --------------------------------------------------------------------------- loading


def test_array_layouts_and_types_give_the_same_pixels(tmp_path: Path) -> None:
    images, labels = colour_images(12, seed=0)
    nhwc = tmp_path / "nhwc.npz"
    np.savez(nhwc, images=images, labels=labels)
    nchw = tmp_path / "nchw.npz"
    np.savez(nchw, images=images.transpose(0, 3, 1, 2).astype(np.float32) / 255, labels=labels)
    a, b = load_data(str(nhwc), parts=("test",)), load_data(str(nchw), parts=("test",))
    assert a.test.images.shape == (12, 3, 32, 32) and a.in_shape == (3, 32, 32)
    assert torch.equal(a.test.images, b.test.images)
    assert torch.equal(a.test.images[3, :, 5, 7], torch.from_numpy(images[3, 5, 7]).float() / 255)
    assert a.test.labels.tolist() == labels.tolist()
    assert a.classes == ("0", "1", "2")  # no names stored: the label values
    assert len(a.train) == 0
    assert a.provenance["data_sha256"] != b.provenance["data_sha256"]
    assert a.provenance["data_size"] == "12 test images of 3×32×32"


def test_safetensors_with_train_test_and_class_names(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    train, train_y = colour_images(30, seed=1)
    test, test_y = colour_images(9, seed=2)
    path = tmp_path / "data.safetensors"
    save_file({"train_images": train, "train_labels": train_y, "test_images": test,
               "test_labels": test_y}, str(path), metadata={"classes": json.dumps(CLASSES)})
    data = load_data(str(path), val_size=6)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 9)
    assert data.classes == CLASSES
    with pytest.raises(RobustkitError, match=r"data\.val_size = 5000"):
        load_data(str(path))


@pytest.mark.parametrize(("arrays", "fragment"), [
    ({"images": np.full((4, 8, 8), 2.0), "labels": np.zeros(4)}, "lie in [2, 2]"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3)}, "expected 4 integer"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.full(4, 0.5)}, "class indices"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.full(4, -1)}, "start at 0"),
    ({"images": np.zeros((4, 5, 8, 8), np.uint8), "labels": np.zeros(4)}, "no axis of 1, 3"),
    ({"pictures": np.zeros((4, 8, 8))}, "holds pictures: expected images and labels"),
])
def test_bad_arrays_are_refused_with_what_to_do(tmp_path: Path, arrays: dict[str, Any],
                                                fragment: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(RobustkitError) as caught:
        load_data(str(path), parts=("test",))
    assert fragment in str(caught.value)


def test_single_split_sources_cannot_be_trained_on(tmp_path: Path) -> None:
    images, labels = colour_images(6, seed=0)
    np.savez(tmp_path / "one.npz", images=images, labels=labels)
    with pytest.raises(RobustkitError, match="evaluates as the test set; to train"):
        load_data(str(tmp_path / "one.npz"), val_size=2)


def test_image_folder_layouts_sizes_and_resize(tmp_path: Path) -> None:
    images, labels = colour_images(9, seed=3)
    write_folder(tmp_path / "flat", images, labels)
    data = load_data(str(tmp_path / "flat"), parts=("test",))
    assert data.classes == CLASSES
    assert data.test.images.shape == (9, 3, 32, 32)
    assert data.test.labels.tolist() == labels.tolist()
    assert torch.equal(data.test.images, torch.from_numpy(images).permute(0, 3, 1, 2) / 255)
    resized = load_data(str(tmp_path / "flat"), parts=("test",), resize=(16, 20))
    assert resized.test.images.shape == (9, 3, 16, 20)
    Image.fromarray(images[0][:20]).save(tmp_path / "flat" / "0_red" / "odd.png")
    with pytest.raises(RobustkitError, match=r"0_red/odd.png is 32×20 pixels.*--resize"):
        load_data(str(tmp_path / "flat"), parts=("test",))
    assert load_data(str(tmp_path / "flat"), parts=("test",), resize=(8,)).in_shape == (3, 8, 8)
    grey = tmp_path / "grey" / "train" / "a"
    grey.mkdir(parents=True)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(grey / "x.png")
    (tmp_path / "grey" / "test" / "a").mkdir(parents=True)
    Image.fromarray(np.full((5, 5), 255, np.uint8)).save(tmp_path / "grey" / "test" / "a" / "y.png")
    split = load_data(str(tmp_path / "grey"), val_size=0)
    assert split.in_shape == (1, 5, 5) and float(split.test.images.max()) == 1.0
    assert len(split.train) == 1


def test_unknown_source_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(RobustkitError, match="data source 'imagenet9' not found: pass mnist"):
        load_data("imagenet9")


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package() -> None:
    data = load_data("fashion-mnist", parts=("test",))
    assert data.test.images.shape == (10_000, 1, 28, 28) and len(data.train) == 0
    assert data.classes[9] == "Ankle boot"
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    assert data.source == FASHION  # the provenance names the set, not this machine's folder
    assert data.provenance["data_source"] == "fashion-mnist"


def _cifar_present() -> bool:
    from robustkit.data import cache_dir

    roots = [cache_dir() / "cifar10"]
    if os.environ.get("ROBUSTKIT_DATA"):
        roots.append(Path(os.environ["ROBUSTKIT_DATA"]) / "cifar10")
    return any((r / "cifar-10-batches-py" / "test_batch").is_file() for r in roots)


def test_cifar10_where_present() -> None:
    if not _cifar_present():
        pytest.skip("CIFAR-10 is not in the cache or $ROBUSTKIT_DATA/cifar10 (no download here)")
    data = load_data("cifar10", parts=("test",))
    assert data.test.images.shape == (10_000, 3, 32, 32)
    assert data.classes[0] == "airplane"


# --------------------------------------------------------------------------- end to end


PGD_AT = """
name = "tinynet_pgd_at"
seed = 0
device = "cpu"
[data]
source = "colours.npz"
val_size = 60
[model]
factory = "tinynet:tiny_net"
args = {{ width = 8, classes = 3 }}
[train]
method = "pgd-at"
epochs = 2
batch_size = 32
optimizer = "adam"
lr = 0.01
[train.adversarial]
eps = {eps}
steps = 3
val_steps = 3
val_n = 60
[[attacks]]
name = "fgsm"
[[attacks]]
name = "pgd"
steps = 5
[evaluate]
eps = [0.0, {eps}, 0.1]
"""


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with tinynet.py, colours.npz (240 train, 60 test) and the test images as PNGs."""
    root = tmp_path_factory.mktemp("colours")
    (root / "tinynet.py").write_text(TINYNET)
    train, train_y = colour_images(240, seed=10)
    test, test_y = colour_images(60, seed=11)
    np.savez(root / "colours.npz", train_images=train, train_labels=train_y, test_images=test,
             test_labels=test_y, classes=np.array(CLASSES))
    write_folder(root / "pngs" / "test", test, test_y)
    write_folder(root / "pngs" / "train", train, train_y)
    (root / "tinynet_pgd_at.toml").write_text(PGD_AT.format(eps=8 / 255))
    return root


def test_model_factory_trains_with_pgd_at_and_runs_on_colour_images(colours: Path) -> None:
    result = robustkit("run", "tinynet_pgd_at.toml", "-q", cwd=colours)
    assert result.returncode == 0, result.stderr
    report = colours / "reports" / "tinynet_pgd_at"
    sidecar = json.loads((report / "model.json").read_text())
    assert sidecar["factory"] == "tinynet:tiny_net"
    assert sidecar["factory_args"] == {"width": 8, "classes": 3}
    assert sidecar["in_shape"] == [3, 32, 32]
    metrics = pd.read_csv(report / "metrics.csv")
    assert "val_robust_acc" in metrics.columns and len(metrics) == 2
    results = pd.read_csv(report / "results.csv")
    clean = results.loc[results["eps"] == 0, "accuracy"].iloc[0]
    assert clean > 0.9, results  # the dominant channel is easy to learn
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["data_source"].startswith("array file colours.npz")
    assert manifest["data_size"] == "240 train, 60 test images of 3×32×32"
    settings = json.loads((report / "settings.json").read_text())
    assert settings["classes"] == list(CLASSES) and len(settings["data_sha256"]) == 64
    markdown = (report / "report.md").read_text()
    assert "| data sha256 |" in markdown and "→ adversarial: " in markdown
    assert any(p.name.startswith("examples-") for p in (report / "figures").iterdir())
    assert any(f"clean: {name} (" in markdown for name in CLASSES)

    # the released weights on the same images as PNG files: the same numbers, once the user
    # names the factory (the sidecar's factory runs only by the user's choice; its arguments
    # width = 8, classes = 3 come from the sidecar)
    options = ["--data", "pngs", "--attack", "fgsm,pgd", "--steps", "5", "--eps", "0,8/255,0.1",
               "-q", "--out", "on-pngs"]
    refused = robustkit("attack", "--model", "reports/tinynet_pgd_at/model.safetensors",
                        *options, cwd=colours)
    assert refused.returncode == 2
    assert ("names the factory 'tinynet:tiny_net'" in refused.stderr
            and "--model tinynet:tiny_net --weights" in refused.stderr), refused.stderr
    attack = robustkit("attack", "--model", "tinynet:tiny_net", "--weights",
                       "reports/tinynet_pgd_at/model.safetensors", *options, cwd=colours)
    assert attack.returncode == 0, attack.stderr
    again = pd.read_csv(colours / "on-pngs" / "results.csv")
    assert again["accuracy"].tolist() == results["accuracy"].tolist()
    assert (colours / "on-pngs" / "report.html").is_file()


def test_factory_from_the_current_folder_and_app_dir(colours: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    sys.path.insert(0, str(colours))
    try:
        import tinynet
    finally:
        sys.path.remove(str(colours))
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(tinynet.tiny_net().state_dict(), str(weights))
    common = ["--weights", str(weights), "--data", str(colours / "colours.npz"), "--attack",
              "fgsm", "--eps", "0,0.1", "-q"]
    here = robustkit("attack", "--model", "tinynet:tiny_net", *common, "--out",
                     str(tmp_path / "a"), cwd=colours)
    assert here.returncode == 0, here.stderr
    elsewhere = robustkit("attack", "--model", "tinynet:tiny_net", *common, "--out",
                          str(tmp_path / "b"), cwd=tmp_path)
    assert elsewhere.returncode == 2
    assert "cannot import 'tinynet'" in elsewhere.stderr and "--app-dir" in elsewhere.stderr
    app_dir = robustkit("attack", "--model", "tinynet:tiny_net", "--app-dir", str(colours),
                        *common, "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert app_dir.returncode == 0, app_dir.stderr
    assert (pd.read_csv(tmp_path / "a" / "results.csv")["accuracy"].tolist()
            == pd.read_csv(tmp_path / "c" / "results.csv")["accuracy"].tolist())


@pytest.mark.parametrize(("model", "fragment"), [
    ({"factory": "tinynet"}, "model.factory: 'tinynet': expected \"package.module:function\""),
    ({"factory": "tinynet:"}, "model.factory: 'tinynet:'"),
    ({"args": {"width": 4}}, "model.args: only used with model.factory"),
    ({"app_dir": "nets"}, "model.app_dir: only used with model.factory"),
])
def test_model_factory_config_errors(model: dict[str, object], fragment: str) -> None:
    from robustkit.config import config_from_dict

    with pytest.raises(RobustkitError) as caught:
        config_from_dict({"model": model})
    assert fragment in str(caught.value)


def test_factory_config_round_trips_and_leaves_builtin_hashes_alone() -> None:
    import tomllib

    from robustkit.config import config_from_dict, load_config, to_dict, to_toml

    cfg = config_from_dict({"model": {"factory": "nets:cnn", "args": {"width": 4, "bn": True}},
                            "data": {"source": "x.npz", "resize": [16, 16]}})
    assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg
    builtin = load_config(REPO / "experiments" / "mnist_cnn.toml")
    # unset new keys stay out of the hashed view, so earlier checkpoints and reports still match
    assert to_dict(builtin.model) == {"arch": "cnn"}
    assert set(to_dict(builtin.data)) == {"dataset", "val_size", "split_seed"}


@pytest.mark.parametrize("arch", ["softmax", "mlp", "cnn", "madry-cnn", "strided-cnn"])
def test_builtin_architectures_take_colour_images(arch: str) -> None:
    from robustkit.models.factory import build_network, network_spec
    from robustkit.models.zoo import build_model

    torch.manual_seed(0)
    mnist = build_model(arch, 10)
    torch.manual_seed(0)
    same = build_network(network_spec(arch), 10)  # an older sidecar's description
    assert all(torch.equal(a, b) for a, b in zip(mnist.state_dict().values(),
                                                 same.state_dict().values(), strict=True))
    assert mnist(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    colour = build_network(network_spec(arch, in_shape=(3, 32, 32)), 7)
    assert colour(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    first = next(p for p in colour.parameters() if p.dim() > 1)
    assert first.shape[1] == (3 if first.dim() == 4 else 3 * 32 * 32)


def test_data_command_describes_a_source(tmp_path: Path) -> None:
    images, labels = colour_images(6, seed=0)
    np.savez(tmp_path / "one.npz", images=images, labels=labels, classes=np.array(CLASSES))
    shown = robustkit("data", "--data", "one.npz", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("one.npz: 0 train and 6 test images of 3×32×32, 3 classes "
                                   "(0_red, 1_green, 2_blue)")
    digest = __import__("hashlib").sha256((tmp_path / "one.npz").read_bytes()).hexdigest()
    assert f"data_sha256: {digest}" in shown.stdout
    missing = robustkit("data", "--data", "two.npz", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: data file two.npz")


def test_dataset_and_data_naming_different_data_is_refused(tmp_path: Path) -> None:
    result = robustkit("attack", "--model", "m.pt2", "--dataset", "fashion-mnist", "--data",
                       "one.npz", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --dataset fashion-mnist and --data one.npz name "
                                     "different data: pass only --data")
