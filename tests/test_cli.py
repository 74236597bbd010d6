"""The CLI through its real entry point: exit codes, one-line errors, every model kind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import REPO, assert_user_error, run


def test_help_shows_worked_examples() -> None:
    top = run("--help")
    assert top.returncode == 0 and "Example: robustkit run" in top.stdout
    for command in ("train", "attack", "data"):
        result = run(command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"Example: robustkit {command}" in result.stdout


def test_help_version_and_usage_errors_do_not_import_torch() -> None:
    """The package root is lazy and the CLI imports the engine inside its commands, so what
    needs no model (help, version, a usage error) never pays for loading torch and pandas."""
    code = textwrap.dedent("""
        import sys
        from robustkit.cli import main
        for argv in (["--help"], ["attack", "--help"], ["--version"], ["train"]):
            sys.argv = ["robustkit", *argv]
            try:
                main()
            except SystemExit:
                pass
        heavy = sorted(m for m in ("torch", "pandas", "numpy") if m in sys.modules)
        sys.stderr.write(f"heavy={heavy}\\n")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert "Usage:" in result.stdout and "robustkit " in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "heavy=[]", result.stderr


def test_public_api_names_resolve_lazily() -> None:
    import robustkit

    assert set(robustkit.__all__) == {*robustkit._EXPORTS, "__version__"}
    for name in robustkit.__all__:
        assert getattr(robustkit, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        robustkit.nonexistent  # noqa: B018


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epocs=3", "config error at train.epocs: unknown key (did you mean 'epochs'?)"),
        ("train.lr=-1", "config error at train.lr: -1.0 is out of range"),
        ("model.arch=resnet", "config error at model.arch: 'resnet' is not one of"),
    ],
)
def test_train_rejects_bad_config_before_any_work(override: str, fragment: str, tmp_path: Path
                                                  ) -> None:
    result = run("train", "experiments/mnist_softmax.toml", "--set", override,
                 "--out", str(tmp_path / "out"))
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_train_missing_config_and_bad_device(tmp_path: Path) -> None:
    assert_user_error(run("train", str(tmp_path / "nope.toml")), "nope.toml not found")
    assert_user_error(run("train", "experiments/mnist_softmax.toml", "--device", "tpu",
                          "--out", str(tmp_path / "o")), "unknown device 'tpu'")


def test_train_softmax_end_to_end(tmp_path: Path, mnist_root: Path) -> None:
    out = tmp_path / "softmax"
    result = run("train", "experiments/mnist_softmax.toml", "--set", "train.epochs=1",
                 "--out", str(out), "--data-dir", str(mnist_root), "-q")
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["test_acc"].iloc[-1] > 0.90
    for name in ("model-best.safetensors", "model-best.json", "model-last.safetensors",
                 "config.toml", "manifest.json"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--eps", "0,-0.1"], ["--eps -0.1 is out of range"]),
        (["--eps", "0,8"], ["--eps 8 is out of range", "not 8"]),
        (["--eps", "0,abc"], ["--eps '0,abc': expected comma-separated numbers"]),
        (["--attack", "fgsm,deepfool"], ["unknown attack 'deepfool'"]),
        (["--loss", "hinge"], ["attacks[0].loss: 'hinge' is not one of"]),
        (["--norm", "l3"], ["'l3' is not one of"]),
        (["--steps", "0"], ["steps: 0 is out of range"]),
        (["--attack", "apgd", "--step-size", "0.01"], ["APGD adapts its own step size"]),
    ],
)
def test_attack_rejects_bad_arguments(args: list[str], fragments: list[str], user_models: Path
                                      ) -> None:
    result = run("attack", "--model", "usermodels:good", *args, path=[user_models])
    assert_user_error(result, *fragments)


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        ("usermodels:probabilities", "returns probabilities"),
        # K comes from the model: its 7 logits cannot score MNIST's label 9 (test image 7)
        ("usermodels:wrong_shape", "test image 7 has label 9, but the model "
                                   "usermodels:wrong_shape returns 7 logits"),
        ("usermodels:tupled", "returns a tuple ([0] tensor"),
        ("usermodels:missing", "has no attribute 'missing'"),
        ("nomodule:good", "cannot import 'nomodule'"),
    ],
)
def test_attack_rejects_bad_models(factory: str, fragment: str, user_models: Path,
                                   tmp_path: Path, mnist_root: Path) -> None:
    result = run("attack", "--model", factory, "--n", "50", "--out", str(tmp_path / "o"),
                 "--data-dir", str(mnist_root), path=[user_models])
    assert_user_error(result, fragment)
    assert not (tmp_path / "o").exists()


def test_attack_missing_model_file(tmp_path: Path) -> None:
    assert_user_error(run("attack", "--model", str(tmp_path / "gone.safetensors")), "not found")
    assert_user_error(run("attack", "--model", str(tmp_path / "gone.pt")), "not found")


def _linear(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))


def test_attack_every_model_kind_gives_the_same_numbers(user_models: Path, tmp_path: Path,
                                                        mnist_root: Path) -> None:
    model = _linear()
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    scripted = tmp_path / "m.torchscript"
    torch.jit.save(torch.jit.script(model), scripted)
    exported = tmp_path / "m.pt2"
    batch = {"input": {0: torch.export.Dim("batch")}}
    program = torch.export.export(model, (torch.rand(2, 1, 28, 28),), dynamic_shapes=batch)
    torch.export.save(program, exported)
    static = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(2, 1, 28, 28),)), static)
    assert_user_error(run("attack", "--model", str(static), "--n", "20",
                          "--trust-model-file"), "needs a dynamic batch dimension")
    common = ["--attack", "fgsm,pgd,apgd", "--steps", "5", "--eps", "0,0.05,0.1", "--n", "100",
              "-q"]
    tables = {}
    for kind, spec in [("factory", ["--model", "usermodels:good", "--weights", str(weights)]),
                       ("torchscript", ["--model", str(scripted), "--trust-model-file"]),
                       ("export", ["--model", str(exported), "--trust-model-file"])]:
        out = tmp_path / kind
        result = run("attack", *spec, *common, "--out", str(out), path=[user_models])
        assert result.returncode == 0, result.stderr
        assert "robust accuracy" in result.stdout
        tables[kind] = pd.read_csv(out / "results.csv").drop(columns="model")
        assert (out / "per_sample.csv").is_file() and (out / "settings.json").is_file()
    assert set(tables["factory"]["attack"]) == {"fgsm", "pgd5", "apgd5", "any"}
    assert tables["factory"].equals(tables["torchscript"])
    assert tables["factory"].equals(tables["export"])


def test_attack_refuses_a_program_exported_with_train_mode_batchnorm(tmp_path: Path,
                                                                     mnist_root: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16),
                                torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10)).train()
    batch = {"input": {0: torch.export.Dim("batch")}}
    program = torch.export.export(model, (torch.rand(4, 1, 28, 28),), dynamic_shapes=batch)
    torch.export.save(program, tmp_path / "bn.pt2")
    result = run("attack", "--model", str(tmp_path / "bn.pt2"), "--trust-model-file", "--n", "20",
                 "--data-dir", str(mnist_root), "--out", str(tmp_path / "o"))
    assert_user_error(result, "change with the other images in the batch", "model.eval()")
    assert not (tmp_path / "o").exists()


def test_normalize_wrapper_keeps_pixel_units(user_models: Path, tmp_path: Path,
                                             mnist_root: Path) -> None:
    inner = _linear(1)
    mean, std = 0.1307, 0.3081
    folded = _linear(1)
    inner_fc, folded_fc = inner[1], folded[1]
    assert isinstance(inner_fc, torch.nn.Linear) and isinstance(folded_fc, torch.nn.Linear)
    with torch.no_grad():  # fold the normalisation into the first layer by hand
        folded_fc.weight.copy_(inner_fc.weight / std)
        folded_fc.bias.copy_(inner_fc.bias - (inner_fc.weight * mean / std).sum(1))
    torch.save(inner.state_dict(), tmp_path / "inner.pt")
    torch.save(folded.state_dict(), tmp_path / "folded.pt")
    common = ["--attack", "fgsm", "--eps", "0,0.05,0.1", "--n", "200", "-q", "--data-dir",
              str(mnist_root)]
    a = run("attack", "--model", "usermodels:normalised", "--weights", str(tmp_path / "inner.pt"),
            "--normalize", f"{mean},{std}", *common, "--out", str(tmp_path / "a"),
            path=[user_models])
    b = run("attack", "--model", "usermodels:normalised", "--weights",
            str(tmp_path / "folded.pt"), *common, "--out", str(tmp_path / "b"),
            path=[user_models])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra = pd.read_csv(tmp_path / "a" / "results.csv")
    rb = pd.read_csv(tmp_path / "b" / "results.csv")
    assert (ra["correct"] - rb["correct"]).abs().max() <= 1


def test_cuda_saved_weights_map_to_cpu(user_models: Path, tmp_path: Path, mnist_root: Path
                                       ) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: saving weights on CUDA needs one")
    torch.save({k: v.cuda() for k, v in _linear().state_dict().items()}, tmp_path / "w.pt")
    result = run("attack", "--model", "usermodels:good", "--weights", str(tmp_path / "w.pt"),
                 "--device", "cpu", "--n", "20", "--eps", "0,0.1", "-q", "--out",
                 str(tmp_path / "o"), "--data-dir", str(mnist_root), path=[user_models])
    assert result.returncode == 0, result.stderr


def test_output_folder_of_another_experiment_is_not_overwritten(user_models: Path,
                                                                tmp_path: Path,
                                                                mnist_root: Path) -> None:
    out = tmp_path / "o"
    base = ["--attack", "fgsm", "--n", "20", "-q", "--out", str(out), "--data-dir",
            str(mnist_root)]
    good = ["attack", "--model", "usermodels:good", *base]
    assert run(*good, "--eps", "0,0.1", path=[user_models]).returncode == 0
    before = (out / "results.csv").read_text()
    other = ["attack", "--model", "usermodels:normalised", *base]
    assert_user_error(run(*other, "--eps", "0,0.1", path=[user_models]),
                      "already holds the attack on model 'usermodels:good'")
    assert (out / "results.csv").read_text() == before
    again = run(*good, "--eps", "0,0.2", path=[user_models])  # the same model: replaced
    assert again.returncode == 0, again.stderr
    assert f"replacing {out}, written by an earlier run of the same attack: settings " in \
        again.stderr
    assert "0.2" in (out / "results.csv").read_text()
    assert run(*other, "--eps", "0,0.1", "--overwrite", path=[user_models]).returncode == 0


def test_data_command_reports_checksums(mnist_root: Path, tmp_path: Path) -> None:
    ok = run("data", "--data-dir", str(mnist_root))
    assert ok.returncode == 0 and "md5 checksums match" in ok.stdout
    assert_user_error(run("data", "--data-dir", str(tmp_path)), f"no mnist files in {tmp_path}")
