"""The smaller promises of the user's guide (#36 items 5 and 8): `--dataset` is an alias of
`--data`, a report's provenance carries no absolute data folder, and a report comparing runs
on different data or a different n says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustkit.data import load_dataset, portable_path
from robustkit.records import Manifest, RunSettings
from robustkit.reporting.load import RunData
from robustkit.reporting.tables import comparability_notes
from robustkit.sources import load_data
from tests.conftest import REPO, run

README = REPO / "README.md"


def test_readme_is_a_guide_under_300_lines() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 300
    assert "shared/data" not in text  # the project's own layout is no user's
    # the offline-data note comes before the first command that needs the data
    assert text.index("ROBUSTKIT_DATA") < text.index("robustkit run experiments/quickstart.toml")
    for page in ("docs/reproducing.md", "docs/results-log.md"):
        assert f"]({page})" in text and (REPO / page).is_file(), page


def test_help_shows_no_development_layout() -> None:
    for command in ("", "data", "attack", "run", "train", "report", "zoo", "certify"):
        shown = run(*([command] if command else []), "--help")
        assert shown.returncode == 0 and "shared/data" not in shown.stdout, command


# --------------------------------------------------------------------- --dataset = --data


def test_dataset_is_a_documented_alias_of_data(mnist_root: Path) -> None:
    shown = run("data", "--help").stdout
    assert "--dataset is an older" in " ".join(shown.split())  # named in --data's help
    assert not any(line.lstrip().startswith("--dataset") for line in shown.splitlines())
    old, new = run("data", "--dataset", "mnist"), run("data", "--data", "mnist")
    assert old.returncode == new.returncode == 0, old.stderr
    assert old.stdout == new.stdout


def test_attack_takes_dataset_as_data(tmp_path: Path, mnist_root: Path) -> None:
    args = ("attack", "--model", "zoo:mnist_mlp", "--attack", "fgsm", "--eps", "0,0.1",
            "--n", "20", "--checks", "off", "-q", "--json")
    old = run(*args, "--dataset", "mnist", "--out", str(tmp_path / "old"))
    new = run(*args, "--data", "mnist", "--out", str(tmp_path / "new"))
    assert old.returncode == new.returncode == 0, old.stderr
    assert json.loads(old.stdout)["results"] == json.loads(new.stdout)["results"]
    both = run(*args, "--dataset", "mnist", "--data", "mnist", "--out", str(tmp_path / "both"))
    assert both.returncode == 0, both.stderr  # the same data twice is no conflict


# ------------------------------------------------------------------ portable provenance


def test_builtin_provenance_names_no_absolute_folder(mnist_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the data folder lies outside the current folder
    data = load_dataset("mnist", mnist_root, "cpu", parts=("test",))
    assert data.provenance["data_source"] == "mnist"
    assert "md5" in data.provenance["data_checksum"]
    inside = tmp_path / "data" / "mnist"
    shutil.copytree(mnist_root, inside)
    data = load_dataset("mnist", inside.resolve(), "cpu", parts=("test",))
    assert data.provenance["data_source"] == "mnist (data/mnist)"


def test_array_file_provenance_is_relative_or_its_name(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.zeros((4, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", images=images, labels=np.array([0, 1, 0, 1]))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    outside = load_data(str(tmp_path / "tiny.npz"), parts=("test",))
    assert outside.provenance["data_source"] == "array file tiny.npz"
    monkeypatch.chdir(tmp_path)
    inside = load_data(str(tmp_path / "tiny.npz"), parts=("test",))
    assert inside.provenance["data_source"] == "array file tiny.npz"
    assert portable_path(tmp_path / "sub" / "x.npz") == "sub/x.npz"
    assert portable_path(Path("/")) is None


# ------------------------------------------------------------ comparing unlike runs


def _run(name: str, n: int, dataset: str = "mnist", sha: str | None = None) -> RunData:
    results = pd.DataFrame({"model": [name], "attack": ["fgsm"], "eps": [0.1], "n": [n],
                            "accuracy": [0.5]})
    manifest = Manifest.from_record({"data_sha256": sha} if sha else {})
    settings = RunSettings.from_record({"dataset": dataset, "split": "test"})
    return RunData(Path(name), name, results, settings=settings, manifest=manifest)


def test_comparing_unlike_runs_says_so() -> None:
    assert comparability_notes([_run("a", 100)]) == []
    assert comparability_notes([_run("a", 100), _run("b", 100)]) == []
    (n_note,) = comparability_notes([_run("a", 100), _run("b", 1000)])
    assert "different numbers of images (a: 100, b: 1000)" in n_note
    (data_note,) = comparability_notes([_run("a", 100), _run("b", 100, "fashion-mnist")])
    assert "different data (a: mnist test set; b: fashion-mnist test set)" in data_note
    files = comparability_notes([_run("a", 9, "x.npz", "ab" * 32),
                                 _run("b", 9, "x.npz", "cd" * 32)])
    assert len(files) == 1 and "sha256 abababababab" in files[0]
    assert len(comparability_notes([_run("a", 1, "svhn"), _run("b", 2)])) == 2


def test_report_of_runs_with_different_n_warns(tmp_path: Path) -> None:
    result = run("report", "reports/quickstart", "reports/mnist_mlp", "--out",
                 str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr
    assert ("warning: These runs were evaluated on different numbers of images (quickstart: "
            "1000, mnist_mlp: 10000)") in result.stderr
    markdown = (tmp_path / "cmp" / "report.md").read_text(encoding="utf-8")
    assert "Not like for like: These runs were evaluated on different numbers" in markdown
    # the note opens the summary; the chart still stands between its text and the table
    assert (markdown.index("Not like for like") < markdown.index("Robust accuracy (fraction")
            < markdown.index("figures/accuracy.png") < markdown.index("| model | attack |"))
    same = run("report", "reports/mnist_mlp", "reports/mnist_cnn", "--out", str(tmp_path / "s"))
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr


def test_committed_reports_name_no_absolute_data_folder() -> None:
    manifests = sorted((REPO / "reports").glob("**/manifest.json"))
    sources = {m.parent.name: json.loads(m.read_text(encoding="utf-8")).get("data_source")
               for m in manifests}
    assert sum(s is not None for s in sources.values()) >= 10, sources
    absolute = {name: s for name, s in sources.items() if s and "/" in s and
                any(Path(part.strip("()")).is_absolute() for part in s.split())}
    assert not absolute, absolute
