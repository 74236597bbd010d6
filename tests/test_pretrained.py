"""Fine-tuning (``[model] pretrained``): training starts from the named weights exactly, the
training hash follows their bytes, the outputs record them, and weights that do not fit are
refused in one line before anything is written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from robustkit.config import ExperimentConfig, config_from_dict, load_config, training_hash
from robustkit.data import Dataset
from robustkit.errors import RobustkitError
from robustkit.released import file_sha256
from robustkit.training.loop import prepare
from robustkit.training.pretrained import training_fingerprint
from tests.conftest import REPO, assert_user_error, run, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

RELEASED = REPO / "reports" / "mnist_softmax" / "model.safetensors"


def _config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config())
    return load_config(path, list(overrides))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["standard", "ibp"])
def test_training_starts_from_the_pretrained_weights(tmp_path: Path, mnist: Dataset,
                                                     method: str) -> None:
    """The model before the first step holds the file's tensors bit for bit (certified
    training's IBP initialisation is not applied over them); without ``pretrained`` it does
    not."""
    overrides = [f"train.method={method}"] + (
        ["train.certified.eps=0.1", "train.certified.ramp_epochs=1",
         "train.certified.start_epochs=0"] if method == "ibp" else [])
    released = load_file(str(RELEASED))
    tuned = _config(tmp_path, *overrides, f"model.pretrained={RELEASED}")
    setup, state = prepare(tuned, out_dir=tmp_path / "tuned", data=mnist, progress=False)
    assert _state(state.model).keys() == released.keys()
    for name, tensor in _state(state.model).items():
        assert torch.equal(tensor, released[name]), name
    assert setup.info["pretrained_sha256"] == file_sha256(RELEASED)
    _, fresh = prepare(_config(tmp_path, *overrides), out_dir=tmp_path / "fresh", data=mnist,
                       progress=False)
    assert not torch.equal(_state(fresh.model)["1.weight"], released["1.weight"])


def test_the_training_hash_follows_the_bytes_not_the_name(tmp_path: Path) -> None:
    same = tmp_path / "copy.safetensors"
    shutil.copyfile(RELEASED, same)
    by_zoo = _config(tmp_path, "model.pretrained=zoo:mnist_softmax")
    by_copy = _config(tmp_path, f"model.pretrained={same}")
    plain = _config(tmp_path)
    assert training_fingerprint(by_zoo, 0) == training_fingerprint(by_copy, 0)
    assert training_fingerprint(by_zoo, 0) != training_fingerprint(plain, 0)
    assert training_fingerprint(plain, 0) == training_hash(plain, 0)  # unchanged without one
    tensors = load_file(str(same))
    tensors["1.bias"] = tensors["1.bias"] + 1e-3
    save_file(tensors, str(same))
    assert training_fingerprint(by_copy, 0) != training_fingerprint(by_zoo, 0)
    with pytest.raises(ValueError):
        training_hash(by_zoo, 0)  # the sha256 is required with model.pretrained


def test_run_fine_tunes_records_and_retrains_when_the_bytes_change(tmp_path: Path,
                                                                    mnist_root: Path) -> None:
    (tmp_path / "tiny.toml").write_text(tiny_config())
    start = tmp_path / "start.safetensors"
    shutil.copyfile(RELEASED, start)
    shutil.copyfile(RELEASED.with_suffix(".json"), start.with_suffix(".json"))
    command = ("run", "tiny.toml", "-q", "--set", "model.pretrained=start.safetensors")
    first = run(*command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    sidecar = json.loads((tmp_path / "reports/tiny/model.json").read_text())
    manifest = json.loads((tmp_path / "runs/tiny/seed-0/manifest.json").read_text())
    for record in (sidecar, manifest):
        assert record["pretrained"] == "start.safetensors"
        assert record["pretrained_sha256"] == file_sha256(RELEASED)
    again = run(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "seed 0: reusing" in again.stdout + again.stderr
    tensors = load_file(str(start))
    tensors["1.bias"] = tensors["1.bias"] + 1e-3
    save_file(tensors, str(start))
    changed = run(*command, cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert "seed 0: training softmax" in changed.stdout + changed.stderr
    assert json.loads((tmp_path / "reports/tiny/model.json").read_text())[
        "pretrained_sha256"] == file_sha256(start)


def _tampered_release(root: Path) -> None:
    folder = root / "reports" / "mine"
    shutil.copytree(REPO / "reports" / "mnist_softmax", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["1.bias"] = tensors["1.bias"] + 1.0
    save_file(tensors, str(folder / "model.safetensors"))


def _bare_state_dict(root: Path) -> None:
    save_file(load_file(str(RELEASED)), str(root / "bare.safetensors"))


@pytest.mark.parametrize(("overrides", "make", "fragments"), [
    (["model.arch=mlp", f"model.pretrained={RELEASED}"], None,
     ("model.pretrained:", "holds a softmax network", "the config builds mlp")),
    (["model.arch=mlp", "model.pretrained=bare.safetensors"], _bare_state_dict,
     ("bare.safetensors does not fit the config's network: its 1.weight is 10×784 where the "
      "network's is 512×784",)),
    (["model.pretrained=nowhere.safetensors"], None,
     ("model.pretrained: nowhere.safetensors is not a file",)),
    (["model.pretrained=weights.pt"], None,
     ("model.pretrained", "name a released model (\"zoo:NAME\"",)),
    (["model.pretrained=zoo:mine"], _tampered_release,
     ("model.pretrained:", "mine/model.safetensors differs from the sha256 recorded",
      "fine-tune from the released bytes")),
], ids=["other-arch", "other-shapes", "missing", "pickle", "tampered-release"])
@pytest.mark.parametrize("command", ["train", "run"])
def test_weights_that_do_not_fit_are_refused_before_anything_is_written(
        tmp_path: Path, mnist_root: Path, command: str, overrides: list[str],
        make: Callable[[Path], None] | None, fragments: tuple[str, ...]) -> None:
    (tmp_path / "tiny.toml").write_text(tiny_config())
    if make is not None:
        make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = ["--out", "out"] if command == "train" else []
    sets = [arg for o in overrides for arg in ("--set", o)]
    result = run(command, "tiny.toml", "-q", *out, *sets, cwd=tmp_path)
    if command == "run":  # the line saying which seed trains may come first
        result.stderr = "".join(line for line in result.stderr.splitlines(keepends=True)
                                if not line.startswith("seed 0: training "))
    assert_user_error(result, *fragments)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_config_key_is_validated_on_load() -> None:
    with pytest.raises(RobustkitError, match=r"model\.pretrained"):
        config_from_dict({"model": {"pretrained": "zoo:"}})
