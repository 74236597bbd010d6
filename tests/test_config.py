"""Config validation: every error names its key path; overrides; round trip; hashing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import tomllib

from robustkit.config import (
    config_from_dict,
    config_hash,
    load_config,
    parse_override,
    to_toml,
)
from robustkit.data import DATASETS
from robustkit.errors import RobustkitError
from robustkit.models.defences import build_preprocessing
from robustkit.models.zoo import ARCHITECTURES
from robustkit.vocabulary import ATTACK_NAMES, PREPROCESSING, Arch, DatasetName

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trian": {}}, r"at trian: unknown key \(did you mean 'train'\?\)"),
        ({"train": {"epocs": 3}}, r"at train\.epocs: unknown key \(did you mean 'epochs'\?\)"),
        ({"train": {"epochs": 0}}, r"at train\.epochs: 0 is out of range: must be >= 1"),
        ({"train": {"epochs": 2.5}}, r"at train\.epochs: expected an integer, got 2\.5"),
        ({"train": {"lr": "fast"}}, r"at train\.lr: expected a number, got 'fast'"),
        ({"train": {"lr": 0}}, r"at train\.lr: 0\.0 is out of range: must be > 0"),
        ({"train": {"nesterov": 1}}, r"at train\.nesterov: expected true or false"),
        ({"model": {"arch": "mpl"}}, r"at model\.arch: 'mpl' is not one of .*did you mean 'mlp'"),
        ({"train": {"adversarial": {"eps": 1.5}}},
         r"at train\.adversarial\.eps: 1\.5 is out of range: must be <= 1"),
        ({"evaluate": {"eps": [0.1, -0.2]}}, r"at evaluate\.eps\[1\]: -0\.2 is out of range"),
        ({"evaluate": {"eps": 0.3}}, r"at evaluate\.eps: expected a list of float"),
        ({"attacks": [{"name": "cw"}]}, r"at attacks\[0\]\.name: 'cw' is not one of"),
        ({"attacks": [{"name": "pgd"}, {"name": "pgd"}]}, r"two attacks share the name 'pgd40'"),
        ({"attacks": [{"name": "apgd", "step_size": 0.01}]},
         r"at attacks\[0\]\.step_size: APGD adapts its own step size"),
        ({"data": "mnist"}, r"at data: expected a table"),
        ({"seeds": []}, r"at seeds: must list at least one seed"),
    ],
)
def test_invalid_values_name_their_key_path(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(RobustkitError, match=message):
        config_from_dict(raw)


def test_eps_bound_follows_the_norms_and_the_image_size() -> None:
    """L∞ budgets stop at 1; L2 budgets at √d for the d values of the images the config fixes
    (MNIST's 784, or H·W after resize), and are left to the sweep for other sources."""
    l2 = [{"name": "pgd", "norm": "l2"}]
    with pytest.raises(RobustkitError, match=r"evaluate\.eps\[1\]: 2\.0 is out of range.*\[0, 1\]"):
        config_from_dict({"evaluate": {"eps": [0, 2]}})
    assert config_from_dict({"attacks": l2, "evaluate": {"eps": [0, 28]}}).evaluate.eps[1] == 28
    with pytest.raises(RobustkitError, match=r"\[0, 28\].*√d = 28 for d = 784"):
        config_from_dict({"attacks": l2, "evaluate": {"eps": [0, 28.5]}})
    with pytest.raises(RobustkitError, match=r"\[0, 14\].*√d = 14 for d = 196"):
        config_from_dict({"attacks": l2, "evaluate": {"eps": [0, 15]}, "data": {"resize": [14]}})
    assert config_from_dict({"attacks": l2, "evaluate": {"eps": [0, 50]},
                             "data": {"source": "x.npz"}}).evaluate.eps[1] == 50


def test_overrides_are_parsed_as_toml_and_validated() -> None:
    assert parse_override("train.epochs=5") == (["train", "epochs"], 5)
    assert parse_override("model.arch=cnn") == (["model", "arch"], "cnn")
    assert parse_override("evaluate.eps=[0, 0.1]") == (["evaluate", "eps"], [0, 0.1])
    cfg = config_from_dict({}, ["train.epochs=5", "train.adversarial.eps=0.1"])
    assert cfg.train.epochs == 5 and cfg.train.adversarial.eps == 0.1
    with pytest.raises(RobustkitError, match=r"at train\.epochs: -1 is out of range"):
        config_from_dict({}, ["train.epochs=-1"])
    with pytest.raises(RobustkitError, match=r"expected section\.key=value"):
        config_from_dict({}, ["train.epochs"])


def test_toml_round_trip_and_stable_hash(tmp_path: Path) -> None:
    cfg = config_from_dict({"name": "x", "train": {"method": "trades", "adversarial": {"beta": 3}},
                            "attacks": [{"name": "fgsm"},
                                        {"name": "pgd", "loss": "margin", "restarts": 3}],
                            "reference": {"source": "paper", "error": 0.999}})
    text = to_toml(cfg)
    again = config_from_dict(tomllib.loads(text))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(cfg) != config_hash(config_from_dict({"name": "x"}))
    path = tmp_path / "x.toml"
    path.write_text(text)
    assert load_config(path) == cfg


def test_committed_experiments_are_valid() -> None:
    paths = sorted((REPO / "experiments").glob("*.toml"))
    assert paths, "no committed experiment configs"
    for path in paths:
        cfg = load_config(path)
        assert cfg.name == path.stem or cfg.name


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RobustkitError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3\n")
    with pytest.raises(RobustkitError, match="is not valid TOML"):
        load_config(bad)


def test_vocabularies_match_what_the_engine_implements() -> None:
    """Each closed vocabulary is one Literal; the registries keyed by it list the same names."""
    assert list(ARCHITECTURES) == list(get_args(Arch))
    assert list(DATASETS) == list(get_args(DatasetName))
    assert [build_preprocessing(kind).describe() for kind in PREPROCESSING]
    assert [a.name for a in config_from_dict({"attacks": [{"name": n} for n in ATTACK_NAMES]}
                                             ).attacks] == list(ATTACK_NAMES)
