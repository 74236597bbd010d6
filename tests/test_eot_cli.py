"""EOT, transformations, defences and BPDA from configs and the command line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from robustkit.config import config_from_dict, parse_transform_spec
from robustkit.errors import RobustkitError
from tests.conftest import assert_user_error, run

PGD_EOT = [{"name": "pgd", "steps": 5}, {"name": "pgd", "steps": 5, "eot_samples": 2}]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"transforms": {"rotat": 15}}, "transforms.rotat: unknown key (did you mean 'rotate'?)"),
        ({"transforms": {"rotate": 200}}, "transforms.rotate: 200.0 is out of range"),
        ({"transforms": {"scale": [1.2, 0.9]}}, "transforms.scale: expected a range of two"),
        ({"transforms": {"scale": [0.9]}}, "transforms.scale: expected a range"),
        ({"transforms": {"noise": -0.1}}, "transforms.noise: -0.1 is out of range"),
        ({"transforms": {"eps": [0.0]}}, "transforms.eps[0]: 0.0 is out of range"),
        ({"attacks": [{"name": "pgd", "eot_samples": 0}]}, "attacks[0].eot_samples: 0 is out"),
        ({"attacks": [{"name": "fgsm", "eot_samples": 4}]}, "use name = \"pgd\" or \"apgd\""),
        ({"attacks": [{"name": "pgd", "bpda": "identity"}]}, "declare one (a defence table"),
        ({"attacks": [{"name": "pgd", "bpda": "identiy"}], "defence": {}},
         "did you mean 'identity'?"),
        ({"defence": {"preprocess": "bit-depht"}}, "did you mean 'bit-depth'?"),
        ({"defence": {"preprocess": "median", "bits": 3}}, "defence.bits: does not apply"),
        ({"defence": {"preprocess": "median", "size": 4}}, "defence.size: 4 is even"),
    ],
)
def test_config_errors_name_their_key(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(RobustkitError) as info:
        config_from_dict(raw)
    assert fragment in str(info.value)


def test_attack_titles_and_hash_of_plain_configs_unchanged() -> None:
    config = config_from_dict({"attacks": [*PGD_EOT, {"name": "apgd", "bpda": "identity"}],
                               "defence": {"preprocess": "bit-depth"}})
    assert [a.title for a in config.attacks] == ["pgd5", "pgd5-eot2", "apgd100-bpda"]
    plain = config_from_dict({"attacks": [{"name": "pgd"}]})
    assert "eot_samples" not in str(plain) or plain.attacks[0].eot_samples is None
    from robustkit.config import to_dict

    assert "eot_samples" not in to_dict(plain.attacks[0])  # old configs keep their hash


def test_transform_spec_syntax() -> None:
    raw = parse_transform_spec("rotate=15,translate=2,scale=0.9:1.1,brightness=0.1,blur=1,"
                               "noise=0.05,eval_samples=7,eps=0.1:0.3")
    assert raw == {"rotate": 15.0, "translate": 2.0, "scale": [0.9, 1.1],
                   "brightness": [-0.1, 0.1], "blur": [0.0, 1.0], "noise": 0.05,
                   "eval_samples": 7, "eps": [0.1, 0.3]}
    config = config_from_dict({"transforms": raw}).transforms
    assert config is not None and config.scale == (0.9, 1.1)
    for bad, fragment in [("rotate", "key=value"), ("rotate=x", "not a number"),
                          ("rotate=1:2", "takes one number")]:
        with pytest.raises(RobustkitError, match=fragment):
            parse_transform_spec(bad)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--transform", "rotat=15"], ["transforms.rotat", "did you mean 'rotate'?"]),
        (["--transform", "scale=1.1:0.9"], ["transforms.scale", "low <= high"]),
        (["--bpda", "identity"], ["attacks[0].bpda", "--defence on the command line"]),
        (["--defence", "median:4"], ["defence.size: 4 is even"]),
        (["--defence", "jpeg:50"], ["'jpeg' is not one of"]),
        (["--attack", "pgd", "--eot-samples", "0"], ["eot_samples: 0 is out of range"]),
    ],
)
def test_attack_rejects_bad_eot_options(args: list[str], fragments: list[str],
                                        user_models: Path) -> None:
    result = run("attack", "--model", "usermodels:good", *args, path=[user_models])
    assert_user_error(result, *fragments)


def test_attack_with_transformations_writes_the_physical_section(
        user_models: Path, tmp_path: Path, mnist_root: Path) -> None:
    out = tmp_path / "phys"
    result = run("attack", "--model", "usermodels:good", "--attack", "pgd", "--steps", "5",
                 "--eot-samples", "2", "--eps", "0", "--n", "40", "-q",
                 "--transform", "rotate=10,noise=0.05,eval_samples=3,examples=2,eps=0.1:0.2",
                 "--out", str(out), "--data-dir", str(mnist_root), path=[user_models])
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out / "physical.csv")
    assert list(table["attack"]) == ["clean", "pgd5-eot2", "pgd5-eot2"]
    assert table["eps"].tolist() == [0.0, 0.1, 0.2]
    assert ((table["success_transformed"] >= 0) & (table["success_transformed"] <= 1)).all()
    report = (out / "report.md").read_text()
    assert "Physical-world robustness" in report
    assert "rotate=10,noise=0.05" in report
    assert (out / "figures" / f"physical-views-{out.name}.png").is_file()
    assert not (out / "examples.safetensors").exists()  # the sweep itself stayed at ε = 0


def test_randomised_defence_is_reported_and_attacked_with_eot(
        user_models: Path, tmp_path: Path, mnist_root: Path) -> None:
    out = tmp_path / "noise"
    result = run("attack", "--model", "usermodels:good", "--attack", "pgd", "--steps", "3",
                 "--eot-samples", "2", "--eps", "0,0.2", "--n", "30", "-q",
                 "--defence", "noise:0.1", "--out", str(out), "--data-dir", str(mnist_root),
                 path=[user_models])
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    assert "random Gaussian noise σ = 0.1" in report
    assert "attacked with EOT (pgd3-eot2)" in report
    checks = pd.read_csv(out / "checks.csv").set_index("name")
    assert checks.loc["forward_deterministic", "status"] == "pass"  # random, attacked with EOT
    assert checks["detail"].loc["forward_deterministic"].startswith("the model is random")
    assert "pgd3-eot2: K = 2" in checks["detail"].loc["forward_deterministic"]
    assert (out / "physical.csv").is_file()  # success under fresh draws of the model's noise


def test_report_names_the_defence_and_bpda_without_transformations(tmp_path: Path) -> None:
    import json

    from robustkit.reporting import build_report

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pd.DataFrame({"model": ["m"] * 2, "attack": ["pgd20-bpda"] * 2, "eps": [0.0, 0.1],
                  "accuracy": [0.99, 0.2]}).to_csv(run_dir / "results.csv", index=False)
    settings = {"attacks": [{"name": "pgd", "steps": 20, "bpda": "identity"}],
                "defence": {"preprocess": "bit-depth", "bits": 3}}
    (run_dir / "settings.json").write_text(json.dumps(settings))
    report = build_report([run_dir], run_dir)["markdown"].read_text()
    assert "## Defence" in report and "Physical-world" not in report
    assert "bit-depth reduction to 3 bits" in report
    assert "BPDA: pgd20-bpda replace" in report
