"""Issue #37 item 3: models whose forward returns more than logits (a tuple, a dict, an object
with a ``logits`` attribute, as many hub models do): ``--output`` picks the logits, and
without it one line names the option and what the model returned."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustkit.errors import RobustkitError
from robustkit.models import check_logits, load_model
from tests.conftest import run

RICH = textwrap.dedent("""
    from dataclasses import dataclass
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
            self.head = nn.Linear(32, 10)
        def logits_and_features(self, x):
            features = self.body(x)
            return self.head(features), features

    class AsTuple(Net):
        def forward(self, x):
            return self.logits_and_features(x)

    class AsDict(Net):
        def forward(self, x):
            logits, features = self.logits_and_features(x)
            return {"features": features, "logits": logits}

    @dataclass
    class Output:
        logits: torch.Tensor
        hidden: torch.Tensor

    class AsObject(Net):
        def forward(self, x):
            return Output(*self.logits_and_features(x))

    class Plain(Net):
        def forward(self, x):
            return self.logits_and_features(x)[0]

    def as_tuple(): return AsTuple()
    def as_dict(): return AsDict()
    def as_object(): return AsObject()
    def plain(): return Plain()
""")


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rich")
    (folder / "richnets.py").write_text(RICH)
    return folder


@pytest.mark.parametrize(("factory", "output", "hint"), [
    ("as_tuple", "0", "pass --output INDEX (model.output in a config) to say which item holds "
                      "the logits, e.g. --output 0"),
    ("as_dict", "logits", "the model returns a dict ('features' tensor [8, 32], 'logits' "
                          "tensor [8, 10]): pass --output KEY"),
    ("as_object", "logits", "the model returns a Output with a logits attribute: pass "
                            "--output logits"),
])
def test_output_picks_the_logits_and_its_absence_is_one_line(
        factory: str, output: str, hint: str, rich: Path) -> None:
    x = torch.rand(8, 1, 28, 28)
    plain, _ = load_model("richnets:plain", app_dir=rich)
    bare, _ = load_model(f"richnets:{factory}", app_dir=rich)
    with pytest.raises(RobustkitError) as refused:
        check_logits(bare, x, 10)
    assert hint in str(refused.value)
    picked, info = load_model(f"richnets:{factory}", app_dir=rich, output=output)
    check_logits(picked, x, 10)
    assert info["output"] == output
    with torch.no_grad():
        assert torch.equal(picked(x), plain(x))  # the same weights, the logits picked
    assert list(picked.state_dict()) == list(plain.state_dict())  # no wrapper prefix


def test_a_wrong_output_key_says_what_is_there(rich: Path) -> None:
    model, _ = load_model("richnets:as_dict", app_dir=rich, output="scores")
    with pytest.raises(RobustkitError, match="returns a dict with keys features, logits"):
        model(torch.rand(2, 1, 28, 28))
    model, _ = load_model("richnets:as_tuple", app_dir=rich, output="2")
    with pytest.raises(RobustkitError, match="pass an index from 0 to 1"):
        model(torch.rand(2, 1, 28, 28))


def test_attack_with_output_equals_the_plain_model(rich: Path, mnist_root: Path) -> None:
    common = ["--attack", "fgsm,pgd", "--steps", "5", "--eps", "0,0.1", "--n", "50", "-q",
              "--checks", "off"]
    refused = run("attack", "--model", "richnets:as_dict", *common, "--out", "d0",
                         cwd=rich, path=[rich])
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: the model returns a dict (")
    assert len(refused.stderr.strip().splitlines()) == 1
    picked = run("attack", "--model", "richnets:as_dict", "--output", "logits",
                        *common, "--out", "d1", cwd=rich, path=[rich])
    assert picked.returncode == 0, picked.stderr
    plain = run("attack", "--model", "richnets:plain", *common, "--out", "p", cwd=rich, path=[rich])
    assert plain.returncode == 0, plain.stderr
    assert (pd.read_csv(rich / "d1" / "results.csv")["accuracy"].tolist()
            == pd.read_csv(rich / "p" / "results.csv")["accuracy"].tolist())
    assert json.loads((rich / "d1" / "settings.json").read_text())["output"] == "logits"


def test_a_trained_factory_records_its_output(rich: Path, mnist_root: Path) -> None:
    (rich / "tuple.toml").write_text(textwrap.dedent("""
        name = "tuple_net"
        [model]
        factory = "richnets:as_tuple"
        output = "0"
        [data]
        val_size = 100
        [train]
        epochs = 1
        batch_size = 256
        [[attacks]]
        name = "fgsm"
        [evaluate]
        eps = [0.0, 0.1]
        n = 100
        checks = "off"
    """))
    done = run("run", "tuple.toml", "-q", cwd=rich, path=[rich])
    assert done.returncode == 0, done.stderr
    sidecar = json.loads((rich / "reports" / "tuple_net" / "model.json").read_text())
    assert sidecar["output"] == "0"
    again = run("attack", "--model", "richnets:as_tuple", "--weights",
                       "reports/tuple_net/model.safetensors", "--attack", "fgsm", "--eps",
                       "0,0.1", "--n", "100", "-q", "--checks", "off", "--out", "again",
                       cwd=rich, path=[rich])  # the recorded output applies: no --output needed
    assert again.returncode == 0, again.stderr
    assert (pd.read_csv(rich / "again" / "results.csv")["accuracy"].tolist()
            == pd.read_csv(rich / "reports" / "tuple_net" / "results.csv")["accuracy"].tolist())


def test_output_without_a_factory_is_a_config_error() -> None:
    from robustkit.config import config_from_dict

    with pytest.raises(RobustkitError, match=r"model\.output: only used with model\.factory"):
        config_from_dict({"model": {"output": "logits"}})
