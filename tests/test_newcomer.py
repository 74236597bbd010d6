"""What a newcomer meets on a fresh clone: version, ε fractions, messages, console verdicts."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from robustkit.data import Split
from tests.conftest import run


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript 784 → 10 linear model (weights from seed 0)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    path = tmp_path_factory.mktemp("linear") / "linear.torchscript"
    torch.jit.save(torch.jit.script(model), path)
    return path


def test_version_comes_from_the_package_metadata() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"robustkit {version('robustkit')}"


def test_eps_fractions_are_accepted_and_bad_ones_refused(linear_model: Path, tmp_path: Path,
                                                         mnist_root: Path) -> None:
    out = tmp_path / "frac"
    result = run("attack", "--model", str(linear_model), "--attack", "fgsm", "--eps",
                 "0, 8/255,0.1", "--n", "20", "-q", "--out", str(out), "--trust-model-file")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "settings.json").read_text())["eps"] == [0.0, 8 / 255, 0.1]
    for bad in ("0,1/0", "0,8/", "0,a/255"):
        refused = run("attack", "--model", str(linear_model), "--eps", bad, "-q")
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"error: --eps {bad!r}: expected comma-separated "
                                         "numbers or fractions"), refused.stderr


def test_example_figures_never_repeat_a_smaller_eps_pictures(tmp_path: Path) -> None:
    """A sample broken at ε_k keeps its ε_k picture at larger ε: such copies are not shown as
    pictures of the larger ε, and an ε whose pictures all repeat gets no figure (the quickstart
    report showed the ε = 0.2 pictures again under ε = 0.3)."""
    import pandas as pd
    from safetensors.torch import save_file

    from robustkit.evaluation import wilson_interval
    from robustkit.reporting import build_report

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    eps = [0.0, 0.1, 0.2, 0.3]
    rows = []
    for e, correct in zip(eps, [3, 2, 0, 0], strict=True):
        low, high = wilson_interval(correct, 3)
        rows.append({"model": "m", "attack": "pgd5", "norm": "linf", "eps": e, "n": 3,
                     "correct": correct, "accuracy": correct / 3, "ci_low": low,
                     "ci_high": high, "grad_evals": 1})
    pd.DataFrame(rows).to_csv(run_dir / "results.csv", index=False)
    clean = torch.full((3, 1, 8, 8), 0.5)
    at = {0.1: clean + 0.1, 0.2: clean + 0.2}
    at[0.2][0] = at[0.1][0]  # sample 0 broken at 0.1: its picture is carried over
    at[0.3] = at[0.2].clone()  # all broken by 0.2: nothing new at 0.3
    per_sample = pd.DataFrame({"index": [0, 1, 2], "label": [0, 1, 2], "clean_pred": [0, 1, 2],
                               "pgd5_eps": [0.1, 0.2, 0.2], "pgd5_pred": [5, 6, 7]})
    per_sample.to_csv(run_dir / "per_sample.csv", index=False)
    save_file({"clean": clean, "labels": torch.arange(3), "index": torch.arange(3),
               **{f"adv/pgd5@{e:g}": x for e, x in at.items()}},
              str(run_dir / "examples.safetensors"))
    build_report([run_dir], run_dir)
    names = sorted(p.name for p in (run_dir / "figures").glob("examples-*"))
    assert names == ["examples-run-pgd5-eps0.1.png", "examples-run-pgd5-eps0.2.png"]
    markdown = (run_dir / "report.md").read_text()
    at_02 = next(line for line in markdown.splitlines() if "examples at ε=0.2" in line)
    assert "label 1" in at_02 and "label 2" in at_02 and "label 0" not in at_02


class RecordingBar:
    """Stands in for robustkit.progress.Bar and records every advance and resize."""

    made: ClassVar[list[RecordingBar]] = []

    def __init__(self, title: str, total: int, enabled: bool = True, counts: bool = True
                 ) -> None:
        self.title, self.total, self.enabled, self.counts = title, total, enabled, counts
        self.done = 0
        self.steps: list[tuple[int, str | None]] = []
        self.totals = [total]
        RecordingBar.made.append(self)

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, steps: int = 1, info: str | None = None) -> None:
        steps = max(0, min(steps, self.total - self.done))  # as Bar clips
        self.done += steps
        self.steps.append((steps, info))

    def resize(self, total: int) -> None:
        self.total = max(total, self.done)
        self.totals.append(self.total)

    def note(self, line: str) -> None:
        return None

    def pulse(self) -> None:
        return None


def _linear_split(n: int = 30) -> tuple[torch.nn.Module, Split]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x = torch.rand(n, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample clean-correct
    return model, Split(x, y)


def test_sweep_progress_advances_within_cells(monkeypatch: pytest.MonkeyPatch) -> None:
    """One bar per attack, measured in forward passes against each cell's budget: it moves
    inside a cell (per forward pass), names each ε as it ends, and ends full."""
    import robustkit.evaluation as evaluation
    from robustkit.attacks.registry import pass_budget
    from robustkit.config import AttackConfig

    monkeypatch.setattr(evaluation, "Bar", RecordingBar)
    RecordingBar.made = []
    model, split = _linear_split(30)
    attack = AttackConfig(name="pgd", steps=3)
    evaluation.evaluate(model, split, [attack], [0, 0.05, 0.5], batch_size=10, progress=True)
    (bar,) = RecordingBar.made
    assert bar.enabled and not bar.counts  # a share of the estimated work, not a count
    assert bar.totals[0] == 2 * 30 * pass_budget(attack)  # ε attacked × samples
    assert [info for _, info in bar.steps if info] == ["ε=0.05", "ε=0.5"]
    first_cell = next(i for i, (_, info) in enumerate(bar.steps) if info)
    assert first_cell >= 3  # moved before the cell ended
    assert bar.totals[-1] < bar.totals[0]  # ε = 0.5 attacks only the samples still robust
    assert bar.done == bar.total == sum(step for step, _ in bar.steps)


def test_checks_show_a_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    import robustkit.checks.runner as checks
    from robustkit.config import AttackConfig, to_dict
    from robustkit.evaluation import evaluate

    model, split = _linear_split(30)
    attacks = [AttackConfig(name="fgsm"), AttackConfig(name="pgd", steps=3)]
    ev = evaluate(model, split, attacks, [0, 0.1, 0.3])
    monkeypatch.setattr(checks, "Bar", RecordingBar)
    RecordingBar.made = []
    frame = checks.run_checks(model, split, ev.results, {
        "eps": [0, 0.1, 0.3], "attacks": [to_dict(a) for a in attacks]}, n=30, progress=True)
    (bar,) = RecordingBar.made
    named = [info for _, info in bar.steps if info]  # each probing check, as it starts
    assert bar.enabled and bar.total == len(named) >= 5 and bar.done == bar.total
    names = list(frame["name"])
    assert [names.index(n) for n in named] == sorted(names.index(n) for n in named)


NOISY = """
import torch
from torch import nn

class Quantised(nn.Module):
    '''A linear model on pixels rounded to 1/8: its input gradient is zero everywhere, so
    the gradient check must fail (gradient masking).'''
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(784, 10)
    def forward(self, x):
        return self.linear(torch.round(x.flatten(1) * 8) / 8)

def quantised():
    return Quantised()

def wrong_width():
    return nn.Sequential(nn.Flatten(), nn.Linear(700, 10))
"""

#: The --json document: field → type, a one-item list for "list of", a dict for an object.
RESULT_ROW = {"attack": str, "norm": str, "eps": float, "n": int, "correct": int,
              "accuracy": float, "ci_low": float, "ci_high": float, "grad_evals": int,
              "unreliable": (str, type(None))}
CHECK_ROW = {"name": str, "status": str, "value": (float, type(None)), "threshold": str,
             "detail": str}
ATTACK_JSON = {"model": str, "model_spec": str, "dataset": str, "split": str, "n": int,
               "eps": [float], "attacks": [str], "results": [RESULT_ROW], "checks_level": str,
               "checks": [CHECK_ROW],
               "checks_summary": {"pass": int, "warn": int, "fail": int}, "warnings": [str],
               "outputs": {"folder": str, "results": str, "per_sample": str, "timings": str,
                           "checks": str, "report_html": str, "report_markdown": str,
                           "report_figures": str, "report_tables": str}}


def conforms(value: object, schema: object, where: str = "$") -> list[str]:
    """Problems of ``value`` against ``schema`` (exact keys for objects, item type for lists)."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object"]
        problems = [f"{where}: missing {k}" for k in schema if k not in value]
        problems += [f"{where}: unexpected {k}" for k in value if k not in schema]
        for k in schema:
            if k in value:
                problems += conforms(value[k], schema[k], f"{where}.{k}")
        return problems
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [p for i, v in enumerate(value) for p in conforms(v, schema[0], f"{where}[{i}]")]
    types = schema if isinstance(schema, tuple) else (schema,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return []
    return [] if isinstance(value, types) and not isinstance(value, bool) else [
        f"{where}: {value!r} is not {' or '.join(t.__name__ for t in types)}"]


def test_conforms_catches_schema_breaks() -> None:
    assert conforms({"a": 1}, {"a": int}) == []
    assert conforms({"a": "1"}, {"a": int}) == ["$.a: '1' is not int"]
    assert conforms({"a": [1, "x"]}, {"a": [int]}) == ["$.a[1]: 'x' is not int"]
    assert conforms({}, {"a": int}) == ["$: missing a"]
    assert conforms({"a": 1, "b": 2}, {"a": int}) == ["$: unexpected b"]


@pytest.fixture(scope="module")
def noisy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("noisy")
    (folder / "noisymodels.py").write_text(NOISY)
    return folder


def test_json_summary_verdict_and_fail_on_check(noisy_dir: Path, mnist_root: Path) -> None:
    import pandas as pd

    args = ["attack", "--model", "noisymodels:quantised", "--attack", "fgsm,pgd", "--steps", "3",
            "--eps", "0,0.1", "--n", "40", "-q"]
    plain = run(*args, "--out", "plain", cwd=noisy_dir)
    assert plain.returncode == 0, plain.stderr  # a failed check alone keeps exit code 0
    checks = pd.read_csv(noisy_dir / "plain" / "checks.csv")
    counts = {s: int((checks["status"] == s).sum()) for s in ("pass", "warn", "fail")}
    assert counts["fail"] >= 1
    lines = plain.stdout.splitlines()
    verdict = lines.index(f"checks (quick): {counts['pass']} pass, {counts['warn']} warn, "
                          f"{counts['fail']} fail")
    table_end = next(i for i, line in enumerate(lines) if line.startswith("0.1"))
    assert verdict > table_end  # after the results table
    flowing = " ".join(plain.stdout.split())  # a long detail wraps at the terminal's width
    for _, row in checks[checks["status"] != "pass"].iterrows():
        assert f"  {row['status']}: {row['name']}: " in plain.stdout
        assert " ".join(f"{row['status']}: {row['name']}: {row['detail']}".split()) in flowing
    assert "  fail: input_gradients_usable: " in plain.stdout

    as_json = run(*args, "--out", "as-json", "--json", "--fail-on-check", cwd=noisy_dir)
    assert as_json.returncode == 1, as_json.stderr
    assert "checks failed: " in as_json.stderr and "input_gradients_usable" in as_json.stderr
    document = json.loads(as_json.stdout)  # stdout holds the JSON document and nothing else
    assert conforms(document, ATTACK_JSON) == []
    results = pd.read_csv(noisy_dir / "as-json" / "results.csv")
    assert [r["accuracy"] for r in document["results"]] == pytest.approx(
        results["accuracy"].tolist(), abs=1e-6)
    assert {(r["attack"], r["eps"]) for r in document["results"]} == {
        (a, e) for a in ("fgsm", "pgd3", "any") for e in (0.0, 0.1)}
    assert document["checks_summary"]["fail"] >= 1 and document["checks_level"] == "quick"
    # the unreliable mark where scripts read (#33): every attacked row of results.csv and of
    # the JSON names the failed checks; clean accuracy (ε = 0) is not discredited
    failed = sorted(checks.loc[checks["status"] == "fail", "name"])
    reason = f"check{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed"
    assert results["unreliable"].fillna("").tolist() == [
        reason if eps > 0 else "" for eps in results["eps"]]
    assert [r["unreliable"] for r in document["results"]] == [
        reason if r["eps"] > 0 else None for r in document["results"]]
    assert document["attacks"] == ["fgsm", "pgd3"] and document["eps"] == [0.0, 0.1]
    for path in document["outputs"].values():
        assert (noisy_dir / path).exists(), path


def test_export_hint_only_for_exported_programs(noisy_dir: Path, mnist_root: Path) -> None:
    result = run("attack", "--model", "noisymodels:wrong_width", "--n", "20", "-q",
                 cwd=noisy_dir)
    assert result.returncode == 2
    assert "the model failed on a batch of 8 images [8, 1, 28, 28]" in result.stderr
    assert "torch.export" not in result.stderr


def test_attack_reads_only_the_test_files(linear_model: Path, mnist_root: Path,
                                          tmp_path: Path) -> None:
    """Damaged training files do not matter to an evaluation on the test set."""
    import shutil

    from robustkit.data import FILE_NAMES

    for key in ("test_images", "test_labels"):
        shutil.copy(mnist_root / f"{FILE_NAMES[key]}.gz", tmp_path)
    for key in ("train_images", "train_labels"):
        (tmp_path / f"{FILE_NAMES[key]}.gz").write_bytes(b"not a gzip file")
    result = run("attack", "--model", str(linear_model), "--attack", "fgsm", "--eps", "0,0.1",
                 "--n", "20", "-q", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--trust-model-file")
    assert result.returncode == 0, result.stderr
    refused = run("train", "experiments/mnist_softmax.toml", "--data-dir", str(tmp_path),
                  "--out", str(tmp_path / "t"), "-q")
    assert refused.returncode == 2 and "truncated or corrupt" in refused.stderr


@pytest.mark.parametrize("written", ["mnist", "MNIST"])
def test_a_folder_named_like_a_builtin_data_set_does_not_hijack_it(
        tmp_path: Path, mnist_root: Path, written: str) -> None:
    """A `mnist/` folder in the working folder: the default data (and `--data mnist`) stay the
    built-in MNIST; only a path the user writes (`./mnist`) names the folder."""
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "notes.txt").write_text("not an image")
    options = ["--model", "zoo:mnist_softmax", "--attack", "fgsm", "--eps", "0,0.1", "--n", "20",
               "-q"]
    default = run("attack", *options, "--out", "default", cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    named = run("attack", *options, "--data", written, "--out", "named", cwd=tmp_path)
    assert named.returncode == 0, named.stderr
    for out in ("default", "named"):
        settings = json.loads((tmp_path / out / "settings.json").read_text())
        assert settings["dataset"] == "mnist" and settings["n"] == 20
    as_folder = run("attack", *options, "--data", "./mnist", "--out", "folder", cwd=tmp_path)
    assert as_folder.returncode == 2
    assert as_folder.stderr.startswith("error: ") and "class folders" in as_folder.stderr, \
        as_folder.stderr


def test_builtin_names_and_written_paths() -> None:
    from robustkit.sources import builtin_name

    assert builtin_name("mnist") == "mnist" and builtin_name(" CIFAR10 ") == "cifar10"
    assert builtin_name("fashion-mnist") == "fashion-mnist"
    for path in ("./mnist", "data/mnist", "/abs/mnist", "mnist/", "my.npz", "digits"):
        assert builtin_name(path) is None, path


@pytest.mark.parametrize(("checks", "verdict"), [
    ("quick", r"checks \(quick\): \d+ pass, \d+ warn, \d+ fail"),
    ("off", r"no checks ran \(--checks off\)"),
])
def test_attack_prints_the_headline_first(linear_model: Path, tmp_path: Path, mnist_root: Path,
                                          checks: str, verdict: str) -> None:
    """The terminal opens with the report's headline: robust accuracy at the largest ε with its
    interval, the strongest attack, clean accuracy and the checks' verdict."""
    import re

    import pandas as pd

    out = tmp_path / "out"
    result = run("attack", "--model", str(linear_model), "--attack", "fgsm,pgd", "--steps", "3",
                 "--eps", "0,0.1", "--n", "30", "-q", "--checks", checks, "--out", str(out),
                 "--trust-model-file")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    results = pd.read_csv(out / "results.csv")
    worst = results[(results["attack"] == "any") & (results["eps"] == 0.1)].iloc[0]
    clean = results[(results["attack"] == "any") & (results["eps"] == 0)].iloc[0]
    strongest = results[(results["attack"] != "any") & (results["eps"] == 0.1)].sort_values(
        "accuracy", kind="stable").iloc[0]["attack"]
    head = (f"linear: robust accuracy {worst['accuracy']:.2%} [{worst['ci_low']:.2%}, "
            f"{worst['ci_high']:.2%}] at ε = 0.1 (worst case of fgsm, pgd3; strongest "
            f"{strongest}) · clean {clean['accuracy']:.2%} · 30 images · ")
    assert text.startswith(head), text[:400]
    assert re.match(verdict, text[len(head):]), text[:400]
    assert text.index(head) < text.index("robust accuracy of linear on 30")
    report = (out / "report.md").read_text()
    assert report.split("\n\n")[1].startswith(f"**linear**: {head[len('linear: '):]}")


def test_training_console_formats_rates_and_seconds() -> None:
    import pandas as pd

    from robustkit.training.loop import epoch_line, metrics_text

    row = {"epoch": 1, "lr": 0.0, "train_loss": 0.29045988, "train_acc": 0.91549,
           "val_acc": 0.9512, "test_acc": 0.9563, "seconds": 57.9433}
    assert epoch_line(row) == ("epoch 1 · lr at end 0 · train_loss 0.2905 · train_acc 0.9155 · "
                               "val_acc 0.9512 · test_acc 0.9563 · 57.9 s")
    assert "lr at end 1.71e-08" in epoch_line({**row, "lr": 1.7106296765648377e-08})
    table = metrics_text(pd.DataFrame([row, {**row, "epoch": 2, "lr": 0.05}]))
    assert "57.9" in table and "57.9433" not in table and "0.0000" not in table
    assert "0.05" in table and "0.2905" in table


def test_factory_models_get_a_folder_each() -> None:
    """#36: two module:factory models, or one factory with two weight files, no longer share
    runs/attack-factory."""
    from robustkit.jobs.attack import model_name

    assert model_name("my_nets:factory") == "my_nets.factory"
    assert model_name("other.nets:factory") == "nets.factory"
    assert model_name("my_nets:factory", "w/cnn_a.pt") == "my_nets.factory-cnn_a"
    assert model_name("my_nets:factory", "w/cnn_b.safetensors") == "my_nets.factory-cnn_b"
    assert model_name("zoo:mnist_cnn") == model_name("reports/mnist_cnn/model.safetensors")
