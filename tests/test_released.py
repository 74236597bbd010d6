"""Released weights: `robustkit run` leaves the evaluated weights in the report folder, and
`robustkit attack --model <report>/model.safetensors` (or zoo:NAME) reproduces the report's
numbers with no training, from any folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, run, tiny_config

TINY = tiny_config()



def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    """A workdir where `robustkit run tiny.toml` wrote reports/tiny (training a softmax)."""
    workdir = tmp_path_factory.mktemp("released")
    (workdir / "tiny.toml").write_text(TINY)
    result = run("run", "tiny.toml", "-q", "--data-dir", str(mnist_root), cwd=workdir)
    assert result.returncode == 0, result.stderr
    return workdir


def test_run_releases_the_evaluated_weights_with_their_hashes(released: Path) -> None:
    report = released / "reports" / "tiny"
    best = released / "runs" / "tiny" / "seed-0" / "model-best"
    weights, sidecar = report / "model.safetensors", report / "model.json"
    assert weights.read_bytes() == best.with_suffix(".safetensors").read_bytes()
    assert sidecar.read_bytes() == best.with_suffix(".json").read_bytes()
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["weights_sha256"] == sha256(weights)
    assert manifest["sidecar_sha256"] == sha256(sidecar)
    markdown = (report / "report.md").read_text()
    assert f"| sidecar sha256 | {sha256(sidecar)} |" in markdown
    assert f"| weights sha256 | {sha256(weights)} |" in markdown


def test_attack_on_released_weights_reproduces_the_report_from_another_folder(
        released: Path, tmp_path: Path) -> None:
    """A fresh clone has reports/ but no runs/: copy only the report folder elsewhere."""
    clone = tmp_path / "clone"
    shutil.copytree(released / "reports" / "tiny", clone / "reports" / "tiny")
    expected = pd.read_csv(released / "reports" / "tiny" / "results.csv")
    common = ["--attack", "fgsm,pgd", "--steps", "5", "--eps", "0,0.1,0.2", "--n", "300", "-q"]
    for spec, out in (("reports/tiny/model.safetensors", "by-path"), ("zoo:tiny", "by-name")):
        result = run("attack", "--model", spec, *common, "--out", out, cwd=clone)
        assert result.returncode == 0, result.stderr
        assert "robust accuracy of tiny on 300" in result.stdout
        got = pd.read_csv(clone / out / "results.csv")
        assert got["accuracy"].tolist() == expected["accuracy"].tolist()
        assert got["attack"].tolist() == expected["attack"].tolist()
        manifest = json.loads((clone / out / "manifest.json").read_text())
        assert manifest["sidecar_sha256"] == sha256(clone / "reports" / "tiny" / "model.json")


def test_zoo_lists_released_models_and_rejects_unknown_names(released: Path) -> None:
    listing = run("zoo", cwd=released)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("zoo:tiny "))
    results = pd.read_csv(released / "reports" / "tiny" / "results.csv")
    clean = results.loc[results["eps"] == 0, "accuracy"].min()
    worst = results.loc[results["eps"] == 0.2, "accuracy"].min()
    assert "softmax" in row and "mnist" in row and "standard" in row
    assert f"{clean:.2%}" in row and f"{worst:.2%}" in row and row.endswith(" 0.2")
    unknown = run("attack", "--model", "zoo:nope", "-q", cwd=released)
    assert unknown.returncode == 2
    # the checkout's committed reports with released weights (quickstart, …) are listed too
    assert unknown.stderr.startswith("error: no released model 'zoo:nope' (released: ")
    assert "tiny" in unknown.stderr.splitlines()[0]
    escape = run("attack", "--model", "zoo:../reports/tiny", "-q", cwd=released)
    assert escape.returncode == 2 and "no released model" in escape.stderr


def test_forgotten_normalize_is_named(released: Path, tmp_path: Path) -> None:
    """A model trained on normalised inputs, fed raw pixels: clean accuracy falls and the
    warning names --normalize; with the right statistics the accuracy is the original's."""
    import torch

    from robustkit.models import load_model

    trained, _ = load_model(released / "reports" / "tiny" / "model.safetensors")
    mean, std = 0.1307, 0.3081

    class ExpectsNormalised(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = trained
            self.mean, self.std = mean, std

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = self.inner(z * self.std + self.mean)  # undoes the normalisation
            return logits

    path = tmp_path / "normalised.torchscript"
    torch.jit.save(torch.jit.script(ExpectsNormalised()), path)
    common = ["--attack", "fgsm", "--eps", "0,0.1", "--n", "300", "-q", "--trust-model-file"]
    original = pd.read_csv(released / "reports" / "tiny" / "results.csv")
    clean = float(original.loc[original["eps"] == 0, "accuracy"].iloc[0])
    assert clean >= 0.9  # the trained softmax is a plausible MNIST model
    right = run("attack", "--model", str(path), "--normalize", f"{mean},{std}", *common,
                "--out", "right", cwd=tmp_path)
    assert right.returncode == 0, right.stderr
    assert "warning: clean accuracy" not in right.stderr
    got = pd.read_csv(tmp_path / "right" / "results.csv")
    assert float(got.loc[got["eps"] == 0, "accuracy"].iloc[0]) == pytest.approx(clean, abs=0.004)
    forgot = run("attack", "--model", str(path), *common, "--out", "forgot", cwd=tmp_path)
    assert forgot.returncode == 0, forgot.stderr
    bad = pd.read_csv(tmp_path / "forgot" / "results.csv")
    bad_clean = float(bad.loc[bad["eps"] == 0, "accuracy"].iloc[0])
    assert bad_clean < 0.9
    assert (f"warning: clean accuracy {bad_clean:.1%} on mnist is far below what models reach "
            "there") in forgot.stderr
    assert "pass --normalize MEAN,STD (for mnist: --normalize 0.1307,0.3081)" in " ".join(
        forgot.stderr.split())


# ------------------------------------------------------- the listing of the committed reports


def zoo_blocks(stdout: str) -> dict[str, list[str]]:
    """``robustkit zoo``'s output by entry: zoo:NAME → its row and the indented notes."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in stdout.splitlines():
        if line.startswith("zoo:"):
            current = blocks.setdefault(line.split()[0], [])
        elif not line.startswith("  "):
            current = None
        if current is not None:
            current.append(line)
    return blocks


def committed_releases() -> dict[str, str]:
    """Report name → the weights sha256 its manifest records, for the committed reports."""
    found = {}
    for weights in sorted((REPO / "reports").glob("*/model.safetensors")):
        manifest = json.loads((weights.parent / "manifest.json").read_text())
        found[weights.parent.name] = manifest["weights_sha256"]
    return found


def test_zoo_lists_each_set_of_weights_once_with_its_strongest_figure(tmp_path: Path) -> None:
    listing = run("zoo", cwd=tmp_path)  # ./reports absent: the checkout's
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert str(REPO) not in listing.stdout and "model.safetensors" not in listing.stdout
    blocks = zoo_blocks(listing.stdout)
    releases = committed_releases()
    assert len(blocks) == len(set(releases.values())) < len(releases)  # one row per sha256
    for name in releases:  # every report is named once: as a row or as an alias
        assert listing.stdout.count(f"zoo:{name} ") + listing.stdout.count(f"zoo:{name},") \
            + listing.stdout.count(f"zoo:{name}\n") == 1, name
    pgd_at = blocks["zoo:mnist_cnn_pgd_at"]
    assert "89.79%" in pgd_at[0] and "98.73%" in pgd_at[0] and "91.67%" not in listing.stdout
    assert "from mnist_cnn_pgd_at_autoattack" in " ".join(pgd_at)
    assert "zoo:mnist_cnn_pgd_at_autoattack" in " ".join(pgd_at)
    fast_at = " ".join(" ".join(blocks["zoo:mnist_cnn_fast_at"]).split())
    assert "71.25%" in blocks["zoo:mnist_cnn_fast_at"][0]
    assert "mnist_cnn_fast_at: its 82.84% is unreliable (check attack_converged failed)" \
        in fast_at
    mlp_pgd_at = blocks["zoo:mnist_mlp_pgd_at"][0]  # trained at ε = 0.1: quoted there
    assert mlp_pgd_at.endswith(" 0.1") and "ε=0.1" in mlp_pgd_at and "2.05%" not in mlp_pgd_at
    assert "90.40%" in mlp_pgd_at
    assert "MODIFIED" not in listing.stdout
    # the lower end of the bracket, from each entry's certified.csv at the same ε
    certified = " ".join(" ".join(blocks["zoo:mnist_cnn_crown_ibp_01"]).split())
    assert ("certified 96.11% by ibp, crown-ibp: true robust accuracy in [96.11%, 96.41%]"
            in certified)
    assert "certified 0.00% by ibp: true robust accuracy in [0.00%, 89.79%]" in " ".join(pgd_at)
    assert "certified" not in " ".join(blocks["zoo:mnist_cnn"])  # no certified.csv there


def test_zoo_names_a_failed_certification_instead_of_quoting_it(tmp_path: Path) -> None:
    """A certification whose consistency check failed is not quoted as the lower end."""
    folder = tmp_path / "reports" / "cert"
    shutil.copytree(REPO / "reports" / "mnist_cnn_crown_ibp_01", folder)
    table = pd.read_csv(folder / "certified.csv")
    table["unreliable"] = ["3 sample(s) certified at an ε where an attack broke them"
                           if e > 0 else "" for e in table["eps"]]
    table.to_csv(folder / "certified.csv", index=False)
    listing = run("zoo", "--reports", str(tmp_path / "reports"), cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    notes = " ".join(" ".join(zoo_blocks(listing.stdout)["zoo:cert"]).split())
    assert ("certified by ibp, crown-ibp: unreliable (3 sample(s) certified at an ε where an "
            "attack broke them)") in notes
    assert "96.11%" not in notes


def test_zoo_marks_a_figure_a_failed_check_discredits(tmp_path: Path) -> None:
    """Alone (without its AutoAttack report), fast_at's own 82.84% is the figure: marked."""
    shutil.copytree(REPO / "reports" / "mnist_cnn_fast_at", tmp_path / "reports" / "fast")
    listing = run("zoo", "--reports", str(tmp_path / "reports"), cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    (row, *notes) = zoo_blocks(listing.stdout)["zoo:fast"]
    assert "82.84%*" in row
    assert "unreliable: check attack_converged failed" in " ".join(" ".join(notes).split())
