"""The post-sweep stage interface and the certified-bounds stage.

The stages run in order on one record; a user model failing inside one is one line naming the
stage; the certification stage writes ``certified.csv``, ``certified_eps`` and its
consistency check, which fails (and discredits every number) when a bound certifies a sample
an attack broke."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from robustkit.certify.evaluate import Certification, certify_sweep
from robustkit.config import AttackConfig
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.evaluation import evaluate
from robustkit.stages import CertifiedBounds, SweepDone, run_stages

REPO = Path(__file__).resolve().parent.parent


def _linear_model() -> nn.Module:
    """Two pixels, two classes: z = (x₀ − x₁, x₁ − x₀), so the margin of class 0 is 2(x₀ − x₁)
    and the worst case over the L∞ ball of radius ε lowers it by exactly 4ε (before the box)."""
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    return nn.Sequential(nn.Flatten(), linear).eval()


def _split() -> Split:
    # margins 2(x₀ − x₁): 0.8, 0.32, 0.16, and a misclassified sample (−0.2)
    images = torch.tensor([[0.7, 0.3], [0.58, 0.42], [0.54, 0.46], [0.45, 0.55]]).view(4, 1, 1,
                                                                                    2)
    return Split(images, torch.tensor([0, 0, 0, 0]))


def _done(tmp_path: Path, model: nn.Module, split: Split, eps: list[float]) -> SweepDone:
    evaluation = evaluate(model, split, [AttackConfig(name="pgd", steps=20)], eps)
    evaluation.results.to_csv(tmp_path / "results.csv", index=False)
    return SweepDone(model=model, split=split, evaluation=evaluation, checks=None,
                     settings={"eps": eps, "attacks": [{"name": "pgd", "steps": 20}]},
                     folder=tmp_path, shown=tmp_path, seed=0, batch_size=100, progress=False,
                     log=lambda message: None)


def test_certified_stage_matches_the_closed_form(tmp_path: Path) -> None:
    """Margin 2(x₀ − x₁) − 4ε (the box does not bind here): certified at ε iff
    x₀ − x₁ > 2ε. At ε = 0.05: samples 0 and 1 (0.4, 0.16 > 0.1; sample 2's 0.08 is not); at
    ε = 0.1: sample 0 only (0.16 < 0.2); the misclassified sample never, and ε = 0 is clean
    accuracy."""
    done = run_stages([CertifiedBounds(("ibp", "crown"))],
                      _done(tmp_path, _linear_model(), _split(), [0.0, 0.05, 0.1]), "linear")
    table = pd.read_csv(tmp_path / "certified.csv")
    best = table[table["method"] == "best"].set_index("eps")["certified"].to_dict()
    assert best == {0.0: 3, 0.05: 2, 0.1: 1}
    assert set(table["method"]) == {"ibp", "crown", "best"}
    # radii (x₀ − x₁)/2 bisected to 1e-3 inside the sweep: 0.2 stays at the largest ε swept,
    # 0.08 and 0.04 from below (a bisected radius is one the bound certified)
    radius = pd.read_csv(tmp_path / "per_sample.csv")["certified_eps"]
    assert radius[0] == 0.1
    assert 0.079 <= radius[1] <= 0.08 and 0.039 <= radius[2] <= 0.04
    assert np.isnan(radius[3])
    assert done.checks is not None
    assert done.checks.set_index("name").loc["certified_not_broken", "status"] == "pass"
    assert done.certified is not None and len(done.certified) == 9


def test_a_broken_bound_fails_the_check_and_discredits_every_number(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bound that certifies everything (wrong) meets PGD's examples: the check fails, names
    the samples, marks results.csv and certified.csv unreliable."""
    real = certify_sweep

    def everything_certified(*args: object, **kwargs: object) -> Certification:
        found = real(*args, **kwargs)  # type: ignore[arg-type]
        correct = found.per_sample["label"] == found.per_sample["clean_pred"]
        wrong = found.per_sample.assign(best_eps=np.where(correct, max(found.eps), np.nan))
        return dataclasses.replace(found, per_sample=wrong)

    monkeypatch.setattr("robustkit.stages.certified.certify_sweep", everything_certified)
    done = run_stages([CertifiedBounds(("ibp",))],
                      _done(tmp_path, _linear_model(), _split(), [0.0, 0.1, 0.3]), "linear")
    assert done.checks is not None
    check = done.checks.set_index("name").loc["certified_not_broken"]
    assert check["status"] == "fail"
    # ε = 0.3 breaks every correct sample (2(x₀ − x₁) ≤ 0.8 < 4·0.3); the misclassified one is
    # certified nowhere (a certificate needs the clean prediction right)
    assert "3 sample(s)" in check["detail"] and "test images 0, 1, 2)" in check["detail"]
    results = pd.read_csv(tmp_path / "results.csv", keep_default_na=False)
    assert (results.loc[results["eps"] > 0, "unreliable"] != "").all()
    certified = pd.read_csv(tmp_path / "certified.csv", keep_default_na=False)
    assert (certified.loc[certified["eps"] > 0, "unreliable"] != "").all()
    assert "unreliable" in done.evaluation.results


@dataclass(frozen=True)
class _Failing:
    title: str = "the exploding stage"

    def run(self, done: SweepDone) -> SweepDone:
        raise ValueError("boom\nsecond line")


@dataclass(frozen=True)
class _Counting:
    seen: list[int]
    title: str = "the counting stage"

    def run(self, done: SweepDone) -> SweepDone:
        self.seen.append(len(done.split))
        return done.with_(split=done.split.take(1))


def test_stages_run_in_order_on_the_record_and_fail_in_one_line(tmp_path: Path) -> None:
    seen: list[int] = []
    done = _done(tmp_path, _linear_model(), _split(), [0.0, 0.1])
    after = run_stages([_Counting(seen), _Counting(seen)], done, "m")
    assert seen == [4, 1] and len(after.split) == 1
    with pytest.raises(RobustkitError) as error:
        run_stages([_Failing()], done, "my_nets:factory")
    assert str(error.value).startswith("the model my_nets:factory failed during the exploding "
                                       "stage (ValueError: boom); finished")


def _robustkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "robustkit", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_attack_certify_brackets_the_attack_in_every_output(tmp_path: Path,
                                                            mnist_root: Path) -> None:
    """``--certify`` on the released MLP: certified ≤ attacked at every ε, in certified.csv,
    the terminal, --json's folder, the report's section and headline."""
    done = _robustkit("attack", "--model", "zoo:mnist_mlp", "--attack", "pgd", "--eps",
                      "0,0.01,0.02", "--certify", "ibp,crown-ibp", "--n", "40", "-q",
                      "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "out"
    certified = pd.read_csv(folder / "certified.csv")
    results = pd.read_csv(folder / "results.csv").set_index("eps")["accuracy"]
    for _, row in certified.iterrows():
        assert row["accuracy"] <= results[row["eps"]] + 1e-12
    best = certified[certified["method"] == "best"].set_index("eps")["accuracy"]
    assert f"certified {best[0.02]:.2%} (best)" in done.stdout
    report = (folder / "report.md").read_text()
    assert "## Certified bounds" in report and "certified_not_broken" in report
    assert (folder / "figures" / "certified-out.png").is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["certify"] == ["ibp", "crown-ibp"]


@pytest.mark.parametrize(("args", "message"), [
    (["--certify", "ibp,exact"], "error: --certify 'ibp,exact': choose from ibp, crown-ibp, "
                                 "crown, comma-separated (e.g. --certify ibp,crown-ibp)"),
    (["--certify", "ibp", "--norm", "l1", "--attack", "apgd"],
     "error: --certify bounds the L∞ or the L2 ball: attack with --norm linf or l2 to compare "
     "the certified and the attacked numbers"),
])
def test_attack_certify_refuses_bad_requests_in_one_line(tmp_path: Path, args: list[str],
                                                         message: str) -> None:
    done = _robustkit("attack", "--model", "zoo:mnist_mlp", "--eps", "0,0.1", *args,
                      cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == message
    assert not any(tmp_path.iterdir())


def test_a_model_the_bounds_do_not_cover_is_refused_before_the_sweep(tmp_path: Path) -> None:
    done = _robustkit("attack", "--model", "zoo:mnist_cnn", "--attack", "fgsm", "--eps",
                      "0,0.1", "--certify", "ibp,crown", "--n", "5", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: CROWN does not cover MaxPool2d: certify this model "
                                   "with IBP alone (--certify ibp), or pool with AvgPool2d or "
                                   "a strided convolution")
    assert not (tmp_path / "runs" / "attack-mnist_cnn" / "results.csv").exists()


def test_config_certify_needs_one_norm_the_bounds_cover() -> None:
    from robustkit.config import config_from_dict

    with pytest.raises(RobustkitError, match=r"evaluate\.certify"):
        config_from_dict({"evaluate": {"certify": ["ibp"]},
                          "attacks": [{"name": "apgd", "norm": "l1"}]})
    with pytest.raises(RobustkitError, match=r"evaluate\.certify"):
        config_from_dict({"evaluate": {"certify": ["ibp"]},
                          "attacks": [{"name": "pgd"}, {"name": "apgd", "norm": "l2"}]})
    assert config_from_dict({"evaluate": {"certify": ["ibp"]},
                             "attacks": [{"name": "pgd", "norm": "l2"}]}).evaluate.certify
    with pytest.raises(RobustkitError, match=r"evaluate\.certify"):
        config_from_dict({"evaluate": {"certify": ["exact"]}})
