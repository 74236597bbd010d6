"""The adversarial examples on disk (``--save-adversarial``, ``Evaluation.adversarial``): they
reproduce the logged accuracy to the sample, stay in the ε-ball and the box as stored, survive
an interrupted and resumed sweep, and can be evaluated on another model with ``--data``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from robustkit.config import AttackConfig
from robustkit.data import Split
from robustkit.evaluation import SweepState, evaluate
from robustkit.models import load_model
from robustkit.runs import load_sweep, save_sweep
from robustkit.stages.adversarial import model_digest

REPO = Path(__file__).resolve().parent.parent
ATTACKS = [AttackConfig(name="fgsm"), AttackConfig(name="pgd", steps=10)]
EPS = [0.0, 0.05, 0.1, 0.2]


@pytest.fixture(scope="module")
def mlp_and_split(mnist: object) -> tuple[torch.nn.Module, Split]:
    model, _ = load_model("zoo:mnist_mlp")
    return model, mnist.test.take(120)  # type: ignore[attr-defined]


def test_kept_examples_reproduce_every_cell_and_keep_the_ball(
        mlp_and_split: tuple[torch.nn.Module, Split]) -> None:
    model, split = mlp_and_split
    ev = evaluate(model, split, ATTACKS, EPS, batch_size=50, keep_adversarial=True)
    correct = ev.results.set_index(["attack", "eps"])["correct"]
    for attack in ("fgsm", "pgd10"):
        for eps in EPS[1:]:
            cell = ev.adversarial(attack, eps)
            with torch.no_grad():
                predicted = model(cell.images).argmax(1)
            assert torch.equal(predicted, cell.adv_pred), (attack, eps)
            assert int((cell.adv_pred == cell.labels).sum()) == correct[(attack, eps)]
            distance = (cell.images - split.images.cpu()).abs().flatten(1).amax(1)
            assert bool((distance <= cell.eps + 1e-6).all()) and bool((cell.eps <= eps).all())
            assert float(cell.images.min()) >= 0 and float(cell.images.max()) <= 1
            assert len(cell.broken().index) == len(split) - correct[(attack, eps)]
    with pytest.raises(Exception, match=r"no adversarial examples kept for pgd10 at ε = 0\.3"):
        ev.adversarial("pgd10", 0.3)


def test_a_resumed_sweep_keeps_the_same_examples(
        tmp_path: Path, mlp_and_split: tuple[torch.nn.Module, Split]) -> None:
    model, split = mlp_and_split
    whole = evaluate(model, split, ATTACKS, EPS, batch_size=50, keep_adversarial=True)

    class SweepInterruptedError(Exception):
        pass

    cells = []

    def save_then_stop(state: SweepState) -> None:
        save_sweep(tmp_path, "fp", state)
        cells.append(1)
        if len(cells) == 4:  # fgsm's three cells and pgd's first are done
            raise SweepInterruptedError

    with pytest.raises(SweepInterruptedError):
        evaluate(model, split, ATTACKS, EPS, batch_size=50, keep_adversarial=True,
                 on_cell=save_then_stop)
    state = load_sweep(tmp_path, "fp")
    assert state is not None and set(state.adversarial) == {"fgsm@0.05", "fgsm@0.1",
                                                             "fgsm@0.2", "pgd10@0.05"}
    resumed = evaluate(model, split, ATTACKS, EPS, batch_size=50, keep_adversarial=True,
                       state=state)
    assert set(resumed.kept) == set(whole.kept)
    for key, cell in whole.kept.items():
        for part, tensor in cell.items():
            assert torch.equal(resumed.kept[key][part], tensor), (key, part)
    pd.testing.assert_frame_equal(resumed.results, whole.results)


def _robustkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "robustkit", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_saved_files_reproduce_the_logged_accuracy_and_load_as_data(
        tmp_path: Path, mnist_root: Path) -> None:
    done = _robustkit("attack", "--model", "zoo:mnist_mlp", "--attack", "pgd", "--eps",
                      "0,0.05,0.1", "--n", "80", "--save-adversarial", "broken", "--checks",
                      "off", "-q", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "out"
    results = pd.read_csv(folder / "results.csv").set_index("eps")["correct"]
    model, _ = load_model("zoo:mnist_mlp")
    for eps in (0.05, 0.1):
        path = folder / "adversarial" / f"pgd40@{eps:g}.safetensors"
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        assert metadata["model_sha256"] == model_digest(model)
        assert json.loads(metadata["settings"])["name"] == "pgd"
        assert metadata["mode"] == "broken" and metadata["eps"] == f"{eps:g}"
        with torch.no_grad():
            predicted = model(tensors["images"]).argmax(1)
        assert torch.equal(predicted, tensors["adv_pred"])
        assert bool((tensors["adv_pred"] != tensors["labels"]).all())
        assert len(tensors["index"]) == 80 - int(results[eps])  # broken = n − correct
    again = _robustkit("attack", "--model", "zoo:mnist_mlp", "--data",
                       "out/adversarial/pgd40@0.1.safetensors", "--attack", "fgsm", "--eps",
                       "0,0.1", "--checks", "off", "-q", "--out", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    clean = pd.read_csv(tmp_path / "again" / "results.csv").set_index("eps")["accuracy"][0.0]
    assert clean == 0.0  # every saved example is misclassified by the model it was made on


def test_a_bad_save_adversarial_value_is_one_line(tmp_path: Path) -> None:
    done = _robustkit("attack", "--model", "zoo:mnist_mlp", "--eps", "0,0.1",
                      "--save-adversarial", "some", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --save-adversarial 'some': choose all (every "
                                   "sample's example) or broken (the misclassified ones)")
    assert not any(tmp_path.iterdir())
