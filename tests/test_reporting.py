"""Tests for robustkit.reporting: reports built from synthetic run folders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustkit.config import ExperimentConfig, to_toml
from robustkit.errors import RobustkitError
from robustkit.evaluation import wilson_interval
from robustkit.reporting import add_probabilities, build_report

CHROMIUM = Path("/usr/bin/chromium")
EPS = [0.0, 0.1, 0.2, 0.3]
CURVES = {
    "fgsm": [0.95, 0.6, 0.3, 0.1],
    "pgd40": [0.95, 0.5, 0.1, 0.0],
    "any": [0.95, 0.5, 0.1, 0.0],
}
SECTIONS = ["summary", "certified", "examples", "confusion", "training", "checks", "reference",
            "provenance"]
CERTIFIED = [0.95, 0.3, 0.05, 0.0]  # IBP's lower bound, under the attacks' "any" curve
N, K = 40, 4  # samples in the sweep, example images


def write_run(folder: Path, model: str = "tiny", full: bool = True, probs: bool = True,
              certified: bool = False) -> Path:
    """A run folder as robustkit attack writes it (plus the optional files when ``full``, and
    ``certified.csv`` when ``certified``)."""
    folder.mkdir(parents=True)
    rows, timings = [], []
    for attack, accuracies in CURVES.items():
        for eps, acc in zip(EPS, accuracies, strict=True):
            correct = round(acc * N)
            low, high = wilson_interval(correct, N)
            rows.append(
                {
                    "model": model,
                    "attack": attack,
                    "norm": "linf",
                    "eps": eps,
                    "n": N,
                    "correct": correct,
                    "accuracy": correct / N,
                    "ci_low": low,
                    "ci_high": high,
                    "grad_evals": 10 * correct,
                }
            )
            if attack != "any":
                timings.append(
                    {
                        "model": model,
                        "attack": attack,
                        "eps": eps,
                        "seconds": 0.01,
                        "grad_evals": 10 * correct,
                    }
                )
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    if not full:
        return folder
    rng = np.random.default_rng(0)
    labels = np.arange(N) % 10
    per_sample = pd.DataFrame({"index": np.arange(N), "label": labels, "clean_pred": labels})
    for attack in ("fgsm", "pgd40"):
        per_sample[f"{attack}_eps"] = rng.choice([0.1, 0.2, 0.3, np.inf], N)
        per_sample[f"{attack}_pred"] = np.where(
            per_sample[f"{attack}_eps"] < np.inf, (labels + 3) % 10, labels
        )
    per_sample["any_eps"] = per_sample[["fgsm_eps", "pgd40_eps"]].min(axis=1)
    per_sample.to_csv(folder / "per_sample.csv", index=False)
    pd.DataFrame(timings).to_csv(folder / "timings.csv", index=False)
    if certified:
        pd.DataFrame([{"method": "ibp", "norm": "linf", "eps": eps, "n": N,
                       "certified": round(acc * N), "accuracy": acc,
                       "ci_low": wilson_interval(round(acc * N), N)[0],
                       "ci_high": wilson_interval(round(acc * N), N)[1]}
                      for eps, acc in zip(EPS, CERTIFIED, strict=True)]
                     ).to_csv(folder / "certified.csv", index=False)

    clean = torch.zeros(K, 1, 28, 28)
    clean[:, :, 6:22, 12:16] = 1.0  # a "1"
    tensors = {"clean": clean, "labels": torch.arange(K), "index": torch.arange(K)}
    generator = torch.Generator().manual_seed(0)
    for attack in ("fgsm", "pgd40"):
        for eps in EPS[1:]:
            step = eps * torch.randint(-1, 2, clean.shape, generator=generator).float()
            key = f"{attack}@{eps:g}"
            tensors[f"adv/{key}"] = (clean + step).clamp(0, 1)
            if probs:
                p = torch.full((K, 10), 0.02)
                p[torch.arange(K), (torch.arange(K) + 3) % 10] = 0.82
                tensors[f"adv_probs/{key}"] = p
    if probs:
        p = torch.full((K, 10), 0.01)
        p[torch.arange(K), torch.arange(K)] = 0.91
        tensors["clean_probs"] = p
    save_file(tensors, str(folder / "examples.safetensors"))

    settings = {
        "model": model,
        "dataset": "mnist",
        "split": "test",
        "n": N,
        "eps": EPS,
        "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": 40}],
        "seed": 0,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    manifest = {
        "robustkit": "0.1.0",
        "git_commit": "abc1234",
        "torch": "2.3.0",
        "numpy": "1.26.0",
        "python": "3.11.7",
        "device": "cpu (x86_64)",
        "seed": 0,
        "date": "2025-01-01T00:00:00+00:00",
        "evaluation_seconds": 12.5,
        "command": "attack",
        "command_line": f"robustkit attack --model {model}.st",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "lr": [0.1, 0.05, 0.0],
            "train_loss": [0.9, 0.5, 0.4],
            "train_acc": [0.7, 0.85, 0.9],
            "val_acc": [0.72, 0.86, 0.88],
            "test_acc": [0.71, 0.85, 0.89],
        }
    ).to_csv(folder / "metrics.csv", index=False)
    (folder / "config.toml").write_text(to_toml(ExperimentConfig(name=model)))
    pd.DataFrame(
        [
            {
                "name": "accuracy_monotone_in_eps",
                "status": "pass",
                "value": 0.0,
                "threshold": "rise = 0",
                "detail": "never rises",
            },
            {
                "name": "attack_converged",
                "status": "warn",
                "value": 0.03,
                "threshold": "drop ≤ 0.02",
                "detail": "more restarts help",
            },
            {
                "name": "input_gradients_usable",
                "status": "fail",
                "value": 0.5,
                "threshold": "fraction ≤ 0.01",
                "detail": "zero gradients",
            },
        ]
    ).to_csv(folder / "checks.csv", index=False)
    (folder / "reference.json").write_text(
        json.dumps(
            {
                "source": "Goodfellow et al. 2015",
                "metric": "FGSM error at ε=0.25",
                "value": 0.897,
                "ours": 0.9,
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One full report, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("report")
    return build_report([write_run(root / "run-a", certified=True)], root / "out",
                        title="Test report")


def test_html_has_every_section_and_only_embedded_images(report: dict[str, Path]) -> None:
    html = report["html"].read_text(encoding="utf-8")
    assert "<title>Test report</title>" in html
    for section in SECTIONS:
        assert f'<section id="{section}">' in html, section
    sources = re.findall(r'<img[^>]*\bsrc="([^"]*)"', html)
    assert len(sources) >= 6  # accuracy, certified, examples, confusion, training
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<script" not in html and "<link" not in html
    # the summary's interval cells, the checks' statuses, provenance and the reference
    assert "0.500" in html and "[0.352, 0.648]" in html
    for status in ("pass", "warn", "fail"):
        assert f"status-{status}" in html
    assert "robustkit attack --model tiny.st" in html
    assert "abc1234" in html and "Goodfellow et al. 2015" in html
    # predictions with confidences from the stored probabilities, in the figures' alt text
    assert "clean: 0 (91.0%) → adversarial: 3 (82.0%)" in html


def test_markdown_images_and_tables_exist(report: dict[str, Path]) -> None:
    md = report["markdown"].read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 5
    for link in links:
        assert link.startswith("figures/")
        path = report["markdown"].parent / link
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    for heading in (
        "## Summary",
        "## Adversarial examples",
        "## Sanity checks",
        "## Provenance",
        "## Training",
    ):
        assert heading in md
    assert "| tiny | pgd40 | linf | 40 | 0.950 [" in md
    assert "⚠️ warn" in md and "```toml" in md
    tables = {p.name for p in report["tables"].glob("*.csv")}
    assert {
        "accuracy.csv",
        "results.csv",
        "checks.csv",
        "provenance.csv",
        "confusion-run-a.csv",
    } <= tables
    accuracy = pd.read_csv(report["tables"] / "accuracy.csv")
    assert list(accuracy["attack"]) == ["fgsm", "pgd40", "any", "certified (ibp)"]
    lower = accuracy.set_index("attack").loc["certified (ibp)"]  # beside the attacks, per ε
    assert [str(lower[f"ε={e:g}"]).split(" [")[0] for e in EPS] == [
        f"{c:.3f}" for c in CERTIFIED]
    assert "| tiny | certified (ibp) | linf | 40 | 0.950 [" in md


def test_confusion_counts_label_to_adversarial_prediction(report: dict[str, Path]) -> None:
    table = pd.read_csv(report["tables"] / "confusion-run-a.csv", index_col=0)
    per_sample = pd.read_csv(report["html"].parent.parent / "run-a" / "per_sample.csv")
    assert table.to_numpy().sum() == N
    broken = per_sample["pgd40_eps"] <= 0.3
    assert int(table.to_numpy()[0, 3]) == int(((per_sample["label"] == 0) & broken).sum())
    assert int(np.trace(table.to_numpy())) == int((~broken).sum())


def test_figures_are_small(report: dict[str, Path]) -> None:
    sizes = [p.stat().st_size for p in report["figures"].glob("*.png")]
    assert sizes and max(sizes) < 150_000


def test_missing_results_names_the_folder(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(RobustkitError, match=r"not-a-run has no results\.csv"):
        build_report([empty], tmp_path / "out")
    with pytest.raises(RobustkitError, match="is not a folder"):
        build_report([tmp_path / "missing"], tmp_path / "out")
    (empty / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(RobustkitError, match="lacks the columns"):
        build_report([empty], tmp_path / "out")
    assert not (tmp_path / "out" / "report.html").exists()


def test_minimal_run_and_labels_only_examples(tmp_path: Path) -> None:
    minimal = build_report([write_run(tmp_path / "bare", full=False)], tmp_path / "bare-out")
    html = minimal["html"].read_text(encoding="utf-8")
    assert '<section id="summary">' in html and '<section id="provenance">' in html
    assert '<section id="examples">' not in html and '<section id="checks">' not in html
    plain = build_report([write_run(tmp_path / "noprobs", probs=False)], tmp_path / "np-out")
    text = plain["html"].read_text(encoding="utf-8")
    assert '<section id="examples">' in text and "91.0%" not in text


def test_several_runs_share_one_chart(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", model="same")
    b = write_run(tmp_path / "b", model="same")
    paths = build_report([a, b], tmp_path / "out")
    accuracy = pd.read_csv(paths["tables"] / "accuracy.csv")
    assert set(accuracy["model"]) == {"same (a)", "same (b)"}
    html = paths["html"].read_text(encoding="utf-8")
    assert html.count("<h3>a</h3>") >= 1 and html.count("<h3>b</h3>") >= 1
    assert (paths["figures"] / "confusion-a.png").is_file()
    assert (paths["figures"] / "confusion-b.png").is_file()


def test_add_probabilities_rewrites_examples(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", probs=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    path = add_probabilities(run, model)
    tensors = load_file(str(path))
    assert tensors["clean_probs"].shape == (K, 10)
    assert torch.allclose(tensors["clean_probs"].sum(1), torch.ones(K))
    expected = torch.softmax(model(tensors["adv/pgd40@0.2"]), 1)
    assert torch.allclose(tensors["adv_probs/pgd40@0.2"], expected, atol=1e-6)
    assert {k for k in tensors if k.startswith("adv/")} == {
        k.replace("adv_probs/", "adv/") for k in tensors if k.startswith("adv_probs/")
    }
    html = build_report([run], run)["html"].read_text(encoding="utf-8")
    assert re.search(r"clean: \d \(\d+\.\d%\) → adversarial: \d \(\d+\.\d%\)", html)


def _broken_images(html_file: Path, tmp_path: Path) -> tuple[int, int]:
    """Load a copy of the page in headless chromium; return (images, broken images)."""
    probe = tmp_path / "probe.html"
    script = (
        "<script>window.addEventListener('load', function () {"
        "var images = Array.prototype.slice.call(document.images);"
        "var broken = images.filter(function (i) {"
        "return !(i.complete && i.naturalWidth > 0); }).length;"
        "document.title = 'IMAGES ' + images.length + ' BROKEN ' + broken; });</script>"
    )
    html = html_file.read_text(encoding="utf-8")
    probe.write_text(html.replace("</body>", script + "</body>"), encoding="utf-8")
    profile = tmp_path / "chromium-profile"
    completed = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"<title>IMAGES (\d+) BROKEN (\d+)</title>", completed.stdout)
    assert match, f"no result from chromium (rc {completed.returncode}): {completed.stderr[-500:]}"
    return int(match.group(1)), int(match.group(2))


def test_report_renders_in_a_browser(report: dict[str, Path], tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed")
    images, broken = _broken_images(report["html"], tmp_path)
    assert images >= 6 and broken == 0
    # the probe can fail: a corrupted image is counted as broken
    html = report["html"].read_text(encoding="utf-8")
    damaged = tmp_path / "damaged.html"
    damaged.write_text(
        html.replace('src="data:image/png;base64,iVBOR', 'src="data:image/png;base64,AAAA', 1),
        encoding="utf-8",
    )
    images, broken = _broken_images(damaged, tmp_path)
    assert broken == 1


def test_rebuild_removes_stale_figures(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    out = tmp_path / "out"
    build_report([run], out)
    stale = out / "figures" / "confusion-old.png"
    stale.write_bytes(b"old")
    mine = out / "figures" / "my-notes.png"
    mine.write_bytes(b"keep")
    build_report([run], out)
    assert not stale.exists() and mine.exists()
    shutil.rmtree(out)


def test_rebuild_in_the_run_folder_keeps_the_runs_command(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    in_place = build_report([run], run, made_by=None)["markdown"].read_text(encoding="utf-8")
    assert "Made by: robustkit attack --model tiny.st (report rebuilt by `" in in_place
    elsewhere = build_report([run], tmp_path / "out")["markdown"].read_text(encoding="utf-8")
    assert "Made by: robustkit attack" not in elsewhere and "report rebuilt" not in elsewhere


def test_comparison_legend_has_one_entry_per_model_and_per_attack() -> None:
    from robustkit.reporting.figures import _legend_handles

    handles = _legend_handles(["a", "b", "c"], ["fgsm", "pgd40", "any"])
    labels = [h.get_label() for h in handles]
    assert labels == ["a", "b", "c", "fgsm", "pgd40", "any (worst case)"]
    assert [h.get_linestyle() for h in handles[3:]] == ["-", "--", ":"]


def test_training_section_says_which_checkpoint_was_evaluated_and_why(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(checkpoint_epoch=3, checkpoint_selected_by="last_epoch")
    (run / "manifest.json").write_text(json.dumps(manifest))
    markdown = build_report([run], tmp_path / "out")["markdown"].read_text(encoding="utf-8")
    assert ("Evaluated checkpoint: epoch 3, the last epoch: there was no validation split, and "
            "test accuracy never selects a checkpoint.") in markdown


def test_summary_shows_target_hits_of_targeted_attacks_only(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    results = pd.read_csv(run / "results.csv")
    targeted = results["attack"] == "pgd40"
    results["target_hit"] = np.where(targeted, results["eps"] * 2, np.nan)
    results.to_csv(run / "results.csv", index=False)
    markdown = build_report([run], tmp_path / "out")["markdown"].read_text(encoding="utf-8")
    assert "Target hit: the fraction of samples" in markdown
    hits = [line for line in markdown.splitlines() if line.startswith("| tiny | pgd40 | 0.000 |")]
    assert len(hits) == 1 and "| 0.600 |" in hits[0]  # ε = 0.3
    plain = write_run(tmp_path / "plain")
    assert "Target hit" not in build_report([plain], tmp_path / "plain-out")["markdown"].read_text(
        encoding="utf-8")


def test_intervals_say_what_they_cover(report: dict[str, Path]) -> None:
    md = report["markdown"].read_text(encoding="utf-8")
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "95% Wilson score interval" in summary
    assert "robust accuracy under these attacks" in summary
    assert "the true value can only be lower" in summary
    assert "covers test-set sampling alone" in summary


# ------------------------------------------------------------------------- the headline (#36)


def _headline_text(accuracy: float, low: float, high: float, verdict: str) -> str:
    return (f"robust accuracy {accuracy:.2%} [{low:.2%}, {high:.2%}] at ε = 0.3 (worst case of "
            f"fgsm, pgd40; strongest pgd40) · clean 95.00% · {N} images · {verdict}")


def _with_level(run: Path, level: str | None) -> Path:
    manifest = json.loads((run / "manifest.json").read_text())
    if level is not None:
        manifest["checks"] = level
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.mark.parametrize(("level", "verdict"), [
    (None, "checks: 1 pass, 1 warn, 1 fail"),  # a manifest from before the levels: full
    ("quick", "checks (quick): 1 pass, 1 warn, 1 fail"),
    ("off", "no checks ran (--checks off)"),
])
def test_report_opens_with_its_headline(tmp_path: Path, level: str | None, verdict: str
                                        ) -> None:
    import html as html_lib

    run = _with_level(write_run(tmp_path / "run"), level)
    if level == "off":
        (run / "checks.csv").unlink()
    paths = build_report([run], tmp_path / "out")
    low, high = wilson_interval(0, N)
    expected = _headline_text(0.0, low, high, verdict)
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert markdown.split("\n\n")[1] == f"**tiny**: {expected}"  # right under the title
    page = paths["html"].read_text(encoding="utf-8")
    line = f'<p class="headline"><strong>tiny</strong>: {html_lib.escape(expected)}</p>'
    assert line in page
    assert page.index(line) < min(page.index("<nav>"), page.index("<h2>"))


def test_headline_marks_a_figure_a_failed_check_discredits(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    results = pd.read_csv(run / "results.csv")
    top = results["eps"] == 0.3
    low, high = wilson_interval(4, N)
    results.loc[top & results["attack"].isin(["pgd40", "any"]),
                ["correct", "accuracy", "ci_low", "ci_high"]] = [4, 4 / N, low, high]
    results.to_csv(run / "results.csv", index=False)
    markdown = build_report([run], tmp_path / "out")["markdown"].read_text(encoding="utf-8")
    head = markdown.split("\n\n")[1]
    assert head.startswith(f"**tiny**: robust accuracy 10.00% [{low:.2%}, {high:.2%}] at ε = 0.3")
    assert "unreliable: check input_gradients_usable failed" in head


def test_one_epoch_training_plot_has_one_whole_tick() -> None:
    from robustkit.reporting.figures import training_axes

    one = pd.DataFrame({"epoch": [1], "lr": [0.0], "train_loss": [0.29], "train_acc": [0.91],
                        "val_acc": [0.95], "test_acc": [0.96]})
    for ax in training_axes(one).axes:
        assert list(ax.get_xticks()) == [1.0]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1"]
        low, high = ax.get_xlim()
        assert low < 1 < high and high - low == pytest.approx(1.0)
    many = pd.DataFrame({"epoch": range(1, 31), "train_loss": np.linspace(1, 0.1, 30)})
    ticks = training_axes(many).axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks) and len(ticks) <= 12


def test_two_eps_comparison_legend_shows_points_not_lines() -> None:
    """Series measured at two ε are drawn as points: the legend must not promise lines."""
    from robustkit.reporting.figures import _legend_handles

    handles = _legend_handles(["a", "b"], ["fgsm", "pgd40", "any"], lines=set())
    attacks = handles[2:]
    assert [h.get_linestyle() for h in handles] == ["None"] * 5  # models: colour squares
    markers = [h.get_marker() for h in attacks]
    assert len(set(markers[:2])) == 2  # the attacks told apart by their marker
    mixed = _legend_handles(["a", "b"], ["fgsm", "pgd40"], lines={"pgd40"})
    assert [h.get_linestyle() for h in mixed[2:]] == ["None", "--"]


def test_last_epoch_table_says_the_lr_is_the_end_rate(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    markdown = build_report([run], tmp_path / "out")["markdown"].read_text(encoding="utf-8")
    training = markdown.split("## Training", 1)[1].split("\n## ", 1)[0]
    assert "| epoch | lr at end | train_loss |" in training
