"""Issue #37 item 2: transfer attacks. Examples crafted on a source model, blind to its
verdict, judged on the evaluated (target) model; rows ``transfer:<attack>``; the check
``transfer_not_stronger`` (Carlini et al., 2019, §5) fails when a transfer attack breaks what
the white-box attacks left robust, and discredits the white-box rows only."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks import pgd
from robustkit.attacks.registry import Draws
from robustkit.attacks.transfer import craft
from robustkit.checks import run_checks, unreliable_attacks
from robustkit.checks.results import check_transfer_not_stronger
from robustkit.config import AttackConfig, config_from_dict
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.evaluation import evaluate
from robustkit.runs import attack_records
from tests.test_autoattack import QuantisedPlusLinear, synthetic_split

REPO = Path(__file__).resolve().parent.parent
EPS = [0.0, 0.02, 0.05]
WHITE = AttackConfig(name="pgd", steps=20)


def transfer(name: str = "pgd", **settings: object) -> AttackConfig:
    return AttackConfig(name=name, source="source", **settings)  # type: ignore[arg-type]


def settings_of(*attacks: AttackConfig, eps: list[float] = EPS) -> dict[str, object]:
    return {"attacks": attack_records(attacks), "eps": eps}


def checked(target: nn.Module, source: nn.Module, split: Split
            ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, object]]:
    """The sweep's results and the quick checks of white-box PGD-20 and its transfer twin."""
    attacks = [WHITE, transfer(steps=20)]
    evaluation = evaluate(target, split, attacks, EPS, sources={"source": source})
    settings = settings_of(*attacks)
    checks = run_checks(target, split, evaluation.results, settings, n=len(split),
                        level="quick", per_sample=evaluation.per_sample)
    return evaluation.results, checks.set_index("name"), settings


def test_transfer_check_fails_on_masked_gradients_and_marks_the_white_box_only() -> None:
    """The input-quantising model of the masking tests: its only gradient is a tiny random
    linear term, so white-box PGD breaks nothing; PGD crafted on the sound model it wraps
    breaks most samples (measured: 77 of the 97 white-box-robust at ε = 0.05)."""
    sound, split = synthetic_split(100, seed=4)
    masked = QuantisedPlusLinear(sound, 784, 10, 1e-4).eval()
    results, checks, settings = checked(masked, sound, split)
    check = checks.loc["transfer_not_stronger"]
    assert check["status"] == "fail"
    assert float(str(check["value"])) > 0.5
    assert "gradient masking suspected" in check["detail"]
    assert "at ε=0.05 transfer broke" in check["detail"]
    marked = unreliable_attacks(checks.reset_index(), settings, results["attack"].unique())
    assert set(marked) == {"pgd20", "any"}  # every failure here speaks of the white box
    assert checks.loc["accuracy_at_large_eps", "status"] == "fail"
    alone = checks.reset_index()
    alone.loc[alone["name"] != "transfer_not_stronger", "status"] = "pass"
    assert set(unreliable_attacks(alone, settings, results["attack"].unique())) == {
        "pgd20", "any"}


def test_transfer_check_passes_on_a_sound_target() -> None:
    """A sound target and a source of the same architecture with other weights: the transfer
    breaks some samples, only ones white-box PGD breaks too."""
    sound, split = synthetic_split(100, seed=4)
    source = copy.deepcopy(sound)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in source.parameters():
            parameter.add_(0.3 * parameter.abs().mean()
                           * torch.randn(parameter.shape, generator=generator))
    results, checks, _ = checked(sound, source, split)
    rows = results.set_index(["attack", "eps"])["accuracy"]
    assert rows["transfer:pgd20", 0.05] < rows["transfer:pgd20", 0.0]  # it transfers
    assert rows["pgd20", 0.05] < rows["transfer:pgd20", 0.05]  # weaker than white-box
    assert checks.loc["transfer_not_stronger", "status"] == "pass"
    assert set(checks["status"]) == {"pass"}


def test_the_check_counts_per_sample_at_each_eps() -> None:
    """Hand-made per-sample table. White-box robust: samples 1-9 at ε = 0.1, 1-3 and 6-9 at
    ε = 0.2; the transfer broke 2 and 3 at 0.1 and 1 at 0.2: 2 of 9, then 3 of 7 (the worst
    share, fail)."""
    inf = math.inf
    per_sample = pd.DataFrame({
        "index": range(10),
        "pgd40_eps": [0.1, inf, inf, inf, 0.2, 0.2, inf, inf, inf, inf],
        "transfer:pgd40_eps": [0.1, 0.2, 0.1, 0.1, inf, inf, inf, inf, inf, inf],
    })
    attacks = [AttackConfig(name="pgd"), AttackConfig(name="pgd", source="zoo:x")]
    settings = settings_of(*attacks, eps=[0, 0.1, 0.2])
    check = check_transfer_not_stronger(per_sample, settings)
    assert check.status == "fail"
    assert check.measurements["eps"] == 0.2
    assert check.measurements["robust"] == 7
    assert check.measurements["broken_by_transfer_only"] == 3
    assert check.value == pytest.approx(3 / 7)
    assert "test images 1, 2, 3)" in check.detail
    many = pd.DataFrame({"index": range(40), "pgd40_eps": [inf] * 40,
                         "transfer:pgd40_eps": [0.2] + [inf] * 39})
    lonely = check_transfer_not_stronger(many, settings)
    assert lonely.status == "warn"  # one sample of 40: a miss, not yet masking
    assert lonely.value == pytest.approx(1 / 40)
    few = many.head(4)  # fewer than 5 left robust: not judged by share
    assert check_transfer_not_stronger(few, settings).status == "pass"
    same = many.assign(**{"transfer:pgd40_eps": [inf] * 40})
    assert check_transfer_not_stronger(same, settings).status == "pass"


class Linear(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.T


def test_transfer_rows_are_judged_on_the_target() -> None:
    """FGSM crafted on a linear source S, x' = clip(x + ε·sign(Sᵀ(softmax(Sx) − e_y))), judged
    on another linear target T: broken exactly where argmax Tx' ≠ y (worked out here by hand,
    and different from where S is fooled)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 4, 4, generator=generator)
    s = torch.randn(3, 16, generator=generator)
    t = s + 1.5 * torch.randn(3, 16, generator=generator)
    y = (x.flatten(1) @ t.T).argmax(1)  # the target is right on every clean image
    eps = 0.15
    flat = x.flatten(1)
    gradient = (torch.softmax(flat @ s.T, 1) - nn.functional.one_hot(y, 3)) @ s
    crafted = (flat + eps * gradient.sign()).clamp(0, 1)
    on_target = (crafted @ t.T).argmax(1) != y
    on_source = (crafted @ s.T).argmax(1) != y
    assert on_target.sum() > 10 and bool((on_target != on_source).any())
    attack = AttackConfig(name="fgsm", source="S")
    evaluation = evaluate(Linear(t), Split(x, y), [attack], [0.0, eps],
                          sources={"S": Linear(s)})
    broken = torch.tensor(evaluation.per_sample["transfer:fgsm_eps"].to_numpy() == eps)
    assert torch.equal(broken, on_target)
    robust = evaluation.results.set_index("eps")["accuracy"][eps]
    assert robust == pytest.approx(1 - float(on_target.float().mean()))
    assert "transfer:fgsm: crafted on S" in " ".join(evaluation.notes)


def test_blind_crafting_runs_every_step_and_keeps_the_highest_source_loss() -> None:
    """On the source, blind PGD never stops at its first success: every step of every sample
    is spent, and its example's loss is at least that of the last iterate (the plain attack
    stops where the source is first fooled, at a lower loss)."""
    sound, split = synthetic_split(48, seed=4)
    x, y = split.images, split.labels
    settings = AttackConfig(name="pgd", steps=10, random_start=False)
    blind = craft(sound, settings, x, y, 0.05, Draws())
    plain = pgd(sound, x, y, eps=0.05, steps=10, random_start=False)
    attacked = int((sound(x).argmax(1) == y).sum())
    assert blind.grad_evals == 10 * attacked
    assert plain.grad_evals < blind.grad_evals
    with torch.no_grad():
        def loss(images: Tensor) -> Tensor:
            return nn.functional.cross_entropy(sound(images), y, reduction="none")
        fooled = plain.success & (sound(x).argmax(1) == y)
        assert bool((loss(blind.x_adv)[fooled] >= loss(plain.x_adv)[fooled]).all())
        assert bool((loss(blind.x_adv)[fooled] > loss(plain.x_adv)[fooled]).any())
    assert float((blind.x_adv - x).abs().max()) <= 0.05 + 1e-6


def test_evaluate_without_the_source_says_so() -> None:
    sound, split = synthetic_split(8, seed=4)
    with pytest.raises(RobustkitError, match=r"transfer:pgd20 crafts on source, which was not "
                                             r"loaded"):
        evaluate(sound, split, [transfer(steps=20)], EPS)


@pytest.mark.parametrize(("table", "message"), [
    ({"name": "square", "source": "zoo:x"},
     r"attacks\[0\]\.source: square is not transferred .*: transfer fgsm, pgd, apgd"),
    ({"name": "pgd", "source": "zoo:x", "eot_samples": 4},
     r"attacks\[0\]\.eot_samples: a transfer attack crafts on its source model as it is"),
    ({"name": "pgd", "source_weights": "w.pt"}, r"attacks\[0\]\.source_weights: only used with"),
    ({"name": "pgd", "source": " "}, r"attacks\[0\]\.source: is empty"),
])
def test_config_refuses_what_cannot_transfer(table: dict[str, object], message: str) -> None:
    with pytest.raises(RobustkitError, match=message):
        config_from_dict({"attacks": [table]})


def test_config_form_titles_and_hash() -> None:
    config = config_from_dict({"attacks": [{"name": "pgd"}, {"name": "pgd",
                                                             "source": "zoo:mnist_cnn"}]})
    assert [a.title for a in config.attacks] == ["pgd40", "transfer:pgd40"]
    assert "source" not in attack_records(config.attacks[:1])[0]  # other hashes do not move


NETS = textwrap.dedent("""
    import torch
    from torch import nn

    def _net(inputs, classes):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 16), nn.ReLU(),
                             nn.Linear(16, classes))

    def plain(): return _net(784, 10)
    def other(): torch.manual_seed(1); return _net(784, 10)
    def seven(): return _net(784, 7)
    def colour(): return _net(3 * 32 * 32, 10)
""")


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("transfer")
    (folder / "tnets.py").write_text(NETS)
    return folder


def _robustkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(REPO)]),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "robustkit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


COMMON = ("--attack", "pgd", "--steps", "5", "--eps", "0,0.1", "--n", "20", "-q",
          "--checks", "off")


@pytest.mark.parametrize(("source", "expected"), [
    ("tnets:seven", "error: the transfer source tnets:seven returns 7 logits per image but the "
                    "evaluated model returns 10: craft on a model of the same classes"),
    ("tnets:colour", "error: the transfer source tnets:colour cannot take the target's 1×28×28 "
                     "images (RuntimeError: "),
])
def test_a_source_of_another_shape_is_one_line(source: str, expected: str, nets: Path,
                                               mnist_root: Path) -> None:
    done = _robustkit("attack", "--model", "tnets:plain", "--transfer-from", source, *COMMON,
                      "--out", "out", cwd=nets)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(expected), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "craft on a model of the" in done.stderr
    assert not (nets / "out").exists()


@pytest.mark.parametrize(("extra", "expected"), [
    (("--transfer-weights", "w.pt"), "error: --transfer-weights is the state dict of a factory"),
    (("--transfer-from", "tnets:other", "--attack", "square"),
     "error: --transfer-from crafts with fgsm, pgd, apgd: name one in --attack"),
])
def test_transfer_options_misused_are_one_line(extra: tuple[str, ...], expected: str,
                                               nets: Path) -> None:
    done = _robustkit("attack", "--model", "tnets:plain", "--eps", "0,0.1", *extra,
                      cwd=nets)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(expected), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_attack_with_transfer_from_writes_transfer_rows(nets: Path, mnist_root: Path) -> None:
    done = _robustkit("attack", "--model", "tnets:plain", "--transfer-from", "tnets:other",
                      "--attack", "fgsm,pgd", "--steps", "5", "--eps", "0,0.1", "--n", "20",
                      "-q", "--checks", "quick", "--out", "rows", cwd=nets)
    assert done.returncode == 0, done.stderr
    results = pd.read_csv(nets / "rows" / "results.csv")
    assert list(results["attack"].unique()) == ["fgsm", "pgd5", "transfer:fgsm",
                                                "transfer:pgd5", "any"]
    per_sample = pd.read_csv(nets / "rows" / "per_sample.csv")
    assert "transfer:pgd5_eps" in per_sample
    any_eps = per_sample[[c for c in per_sample.columns
                          if str(c).endswith("_eps") and c != "any_eps"]]
    assert (per_sample["any_eps"] == any_eps.min(axis=1)).all()  # part of the worst case
    checks = pd.read_csv(nets / "rows" / "checks.csv").set_index("name")
    assert "transfer_not_stronger" in checks.index
    assert "transfer:pgd5" in (nets / "rows" / "report.md").read_text()
