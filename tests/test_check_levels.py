"""Issue #32: the checks at three levels (quick reuses the sweep and keeps the power to fail),
progress inside every cell, and an interrupt in the checks that loses no finished work."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from robustkit.checks import run_checks
from robustkit.config import AttackConfig
from robustkit.data import Split
from robustkit.evaluation import evaluate
from robustkit.progress import Bar, counting_rows
from tests.test_autoattack import QuantisedPlusLinear, synthetic_split
from tests.test_checks import (
    EPS,
    BatchStatistics,
    NoiseGate,
    QuietOnly,
    Rounding,
    linear_model,
    settings_for,
    template_data,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data() -> tuple[Split, Tensor]:
    return template_data()


def quick(model: nn.Module, split: Split, attacks: list[AttackConfig], eps: list[float] = EPS,
          n: int = 100) -> pd.Series:
    """The quick checks' statuses, by name, after a sweep of ``attacks``."""
    evaluation = evaluate(model, split, attacks, eps)
    frame = run_checks(model, split, evaluation.results, settings_for(*attacks, eps=eps), n=n,
                       level="quick", per_sample=evaluation.per_sample)
    return frame.set_index("name")["status"]


def test_quick_checks_pass_a_sound_model(data: tuple[Split, Tensor]) -> None:
    split, templates = data
    status = quick(linear_model(templates), split,
                   [AttackConfig(name="fgsm"), AttackConfig(name="pgd", steps=20)])
    assert set(status) == {"pass"}, status
    assert len(status) == 11


def test_quick_checks_keep_the_power_to_fail(data: tuple[Split, Tensor]) -> None:
    """Each model that trips a check at the full level trips it at the quick level too."""
    split, templates = data
    rounded = quick(Rounding(linear_model(templates)), split,
                    [AttackConfig(name="fgsm"), AttackConfig(name="pgd", steps=10)])
    assert rounded["input_gradients_usable"] == "fail"
    assert rounded["accuracy_at_large_eps"] == "fail"

    sound, masked_data = synthetic_split(100, seed=4)  # gradients usable, but misleading
    masked = quick(QuantisedPlusLinear(sound, 784, 10, 1e-4).eval(), masked_data,
                   [AttackConfig(name="apgd", steps=50)], eps=[0.0, 0.05])
    assert masked["gradient_free_finds_no_more"] == "fail"  # Square breaks what APGD cannot

    timid = quick(linear_model(templates), split,
                  [AttackConfig(name="pgd", steps=10, step_size=0.001)], eps=[0.0, 0.3])
    assert timid["attack_converged"] == "fail"  # APGD on what the stalled PGD left

    gate = Split(torch.full((20, 1, 8, 8), 0.5), torch.zeros(20, dtype=torch.long))
    stalled = quick(NoiseGate(), gate, [AttackConfig(name="pgd", steps=10)],
                    eps=[0.0, 0.05, 0.3], n=20)
    assert stalled["accuracy_monotone_in_eps"] == "fail"

    grey = Split(torch.cat([torch.full((10, 1, 8, 8), 0.6), torch.full((10, 1, 8, 8), 0.9)]),
                 torch.ones(20, dtype=torch.long))
    weak = quick(QuietOnly(), grey, [AttackConfig(name="pgd", steps=10, random_start=False)],
                 eps=[0.0, 0.3], n=20)
    assert weak["noise_weaker_than_attack"] == "fail"  # the sweep's own outcome, reused

    batchy = quick(BatchStatistics(linear_model(templates)), split,
                   [AttackConfig(name="pgd", steps=5)], eps=[0.0, 0.1])
    assert batchy["batch_independent"] == "fail"


def _forward_rows(model: nn.Module, split: Split, attacks: list[AttackConfig],
                  evaluation: object, level: str) -> int:
    rows = [0]

    def count(n: int) -> None:
        rows[0] += n

    with counting_rows(model, count):
        run_checks(model, split, evaluation.results,  # type: ignore[attr-defined]
                   settings_for(*attacks), level=level,  # type: ignore[arg-type]
                   per_sample=evaluation.per_sample)  # type: ignore[attr-defined]
    return rows[0]


def test_quick_checks_reuse_the_sweep_and_cost_a_fraction_of_full(
        data: tuple[Split, Tensor]) -> None:
    split, templates = data
    model = linear_model(templates)
    attacks = [AttackConfig(name="pgd", steps=20)]
    evaluation = evaluate(model, split, attacks, EPS)
    full = _forward_rows(model, split, attacks, evaluation, "full")
    fast = _forward_rows(model, split, attacks, evaluation, "quick")
    assert fast * 5 < full, (fast, full)  # measured: 39,063 against 273,447 rows


def test_piped_progress_says_one_line_per_cell_and_moves_inside_cells(
        data: tuple[Split, Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    split, templates = data
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    moves: list[int] = []
    original = Bar.advance

    def advance(self: Bar, steps: int = 1, info: str | None = None) -> None:
        moves.append(steps)
        original(self, steps, info)

    monkeypatch.setattr(Bar, "advance", advance)
    attack = AttackConfig(name="pgd", steps=20)
    evaluate(linear_model(templates), split.take(50), [attack], [0.0, 0.05, 0.1], progress=True)
    lines = stderr.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["model pgd20 ε=0.05", "model pgd20 ε=0.1"]
    assert all(" robust (" in line for line in lines)
    assert len([m for m in moves if m > 0]) >= 20  # per forward pass, not per cell


def test_piped_bar_speaks_at_least_once_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    with Bar("sweep", 100) as bar:
        bar.advance(10, "ε=0.1")
        assert stderr.getvalue() == ""
        clock[0] += 61
        bar.advance(5)
    assert stderr.getvalue() == "sweep: 15% after 61 s (ε=0.1)\n"
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    with Bar("sweep", 100, enabled=False) as silent:
        clock[0] += 120
        silent.advance(50)
        silent.note("a cell")
    assert quiet.getvalue() == ""


SLOW = textwrap.dedent("""
    import time
    import torch
    from torch import nn

    class Slow(nn.Module):
        '''A linear MNIST classifier whose every forward pass takes 20 ms.'''
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        def forward(self, x):
            time.sleep(0.02)
            return self.net(x)

    def slow():
        return Slow()
""")


def _attack(folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "robustkit", "attack", "--model", "slowmodel:slow",
            "--attack", "fgsm,pgd", "--steps", "5", "--eps", "0,0.1,0.2", "--n", "40",
            "--out", str(folder / "out"), *extra]


def _env(folder: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)]),
            "COLUMNS": "200"}


def test_ctrl_c_in_the_checks_keeps_cells_and_checks(tmp_path: Path, mnist_root: Path) -> None:
    (tmp_path / "slowmodel.py").write_text(SLOW)
    from tests.test_hostile_input import _default_sigint

    process = subprocess.Popen(_attack(tmp_path), cwd=tmp_path, env=_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_sigint)  # as a terminal user's process
    assert process.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        seen.append(line)
        if line.startswith("check batch_independent"):
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=120)
    first = "".join(seen) + rest
    assert process.returncode == 130, first
    staging = tmp_path / ".out.partial"
    assert f"kept in {staging}" in first, first
    assert not (tmp_path / "out").exists()

    again = subprocess.run(_attack(tmp_path), cwd=tmp_path, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert " robust (" not in again.stderr  # no (attack, ε) cell attacked again
    kept = [line for line in again.stderr.splitlines() if line.startswith("check ")]
    assert kept[:3] == [f"check {name}: pass (kept from the interrupted run)" for name in
                        ("accuracy_monotone_in_eps", "forward_deterministic",
                         "batch_independent")], kept
    assert all("kept" not in line for line in kept[3:])
    checks = pd.read_csv(tmp_path / "out" / "checks.csv")
    assert len(checks) == 11
    assert not (tmp_path / "out" / "sweep-state").exists()


def test_checks_off_says_so_everywhere(tmp_path: Path, mnist_root: Path) -> None:
    (tmp_path / "slowmodel.py").write_text(SLOW.replace("time.sleep(0.02)", "pass"))
    args = _attack(tmp_path, "--checks", "off", "--json", "-q")
    result = subprocess.run(args, cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["checks_level"] == "off" and document["checks"] == []
    assert "checks: none ran (--checks off)" in result.stderr
    out = tmp_path / "out"
    assert not (out / "checks.csv").exists()
    assert "No sanity check ran (--checks off)" in (out / "report.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["checks"] == "off"
    gated = subprocess.run([*args, "--fail-on-check"], cwd=tmp_path, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=300)
    assert gated.returncode == 2
    assert gated.stderr.strip() == ("error: --fail-on-check with --checks off would gate on "
                                    "nothing: choose --checks quick or full")


class Scaled(nn.Module):
    """Logits × 1000: cross-entropy saturates (its input gradient is 0), DLR and Square do not
    care about the scale."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = 1000 * self.inner(x)
        return logits


def test_scaled_logits_do_not_discredit_the_ensemble(data: tuple[Split, Tensor]) -> None:
    """#33: the ensemble on a logits × 1000 copy of a sound model gives, per sample, the
    unscaled model's verdicts; the saturated cross-entropy gradient fails
    input_gradients_usable, which must not mark the ensemble (it has Square and DLR)."""
    from robustkit.checks import unreliable_attacks

    split, templates = data
    split = split.take(40)
    sound = linear_model(templates)
    attacks = [AttackConfig(name="autoattack", steps=20, queries=200)]
    plain = evaluate(sound, split, attacks, [0.0, 0.1])
    scaled_model = Scaled(sound)
    scaled = evaluate(scaled_model, split, attacks, [0.0, 0.1])
    column = f"{attacks[0].title}_eps"
    assert scaled.per_sample[column].tolist() == plain.per_sample[column].tolist()
    checks = run_checks(scaled_model, split, scaled.results, settings_for(*attacks,
                        eps=[0.0, 0.1]), n=40, level="quick", per_sample=scaled.per_sample)
    status = checks.set_index("name")["status"]
    assert status["input_gradients_usable"] == "fail"
    assert unreliable_attacks(checks, settings_for(*attacks, eps=[0.0, 0.1]),
                              [attacks[0].title]) == {}


def test_every_check_is_documented(data: tuple[Split, Tensor]) -> None:
    """docs/checks.md has a section for each check run_checks can report, and for the
    certification stage's, and nothing else."""
    import re

    from robustkit.stages.certified import CHECK_NAME

    split, templates = data
    attacks = [AttackConfig(name="fgsm"), AttackConfig(name="pgd", steps=5)]
    evaluation = evaluate(linear_model(templates), split.take(20), attacks, [0.0, 0.1])
    frame = run_checks(linear_model(templates), split.take(20), evaluation.results,
                       settings_for(*attacks, eps=[0.0, 0.1]), n=20, level="quick",
                       per_sample=evaluation.per_sample)
    text = (REPO / "docs" / "checks.md").read_text()
    assert set(re.findall(r"^## (\w+)$", text, flags=re.M)) == set(frame["name"]) | {CHECK_NAME}
