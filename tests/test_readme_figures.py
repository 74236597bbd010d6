"""The README's result tables quote the committed reports exactly.

Each figure in the three tables of the README's "## Results" (standard training; the
robust models' bracket, certified ≤ true ≤ the ensemble; the same CNNs under PGD-50×10) is read
from README.md and compared with the `results.csv` (and `certified.csv`) of the report the row
names, so a report re-made
with other numbers cannot leave the README quoting the old ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
CONFIG = re.compile(r"\(`(\w+)`\)")


def table_after(heading: str, first_column: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table after ``heading`` whose header
    starts with ``first_column``."""
    text = (REPO / "README.md").read_text(encoding="utf-8").split(heading, 1)[1]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def result(report: str, attack: str, eps: float) -> pd.Series:
    """The one row of ``reports/<report>/results.csv`` for ``attack`` at ``eps``."""
    results = pd.read_csv(REPO / "reports" / report / "results.csv")
    rows = results[(results["attack"] == attack) & (results["eps"] == eps)]
    assert len(rows) == 1, f"reports/{report}: no single {attack} row at ε = {eps}"
    return rows.iloc[0]


def accuracy(report: str, attack: str, eps: float) -> str:
    return f"{100 * float(result(report, attack, eps)['accuracy']):.2f}%"


def config_named(row: list[str]) -> str:
    """The config a row names in its first cell, as "(`name`)"."""
    named = CONFIG.search(row[0])
    assert named, f"no (`config`) in {row[0]!r}"
    return named.group(1)


def test_baseline_table_quotes_its_reports() -> None:
    rows = table_after("## Results", "model (config) | epochs")
    assert len(rows) == 6, rows
    eps = [0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    report = ""
    for row in rows:
        report = config_named(row) if CONFIG.search(row[0]) else report
        attack = "fgsm" if "FGSM" in row[0] else "pgd40"
        quoted = row[2:]
        assert quoted == [accuracy(report, attack, e) for e in eps], row[0]


def test_adversarial_training_table_quotes_its_reports() -> None:
    rows = table_after("## Results", "model (config) | clean")
    assert len(rows) == 4, rows
    for row in rows:
        report = config_named(row)
        clean, fgsm, pgd_ce, pgd_margin, worst, ensemble = row[1:7]
        assert clean == accuracy(report, "any", 0), report
        assert fgsm == accuracy(report, "fgsm", 0.3), report
        assert pgd_ce == accuracy(report, "pgd50x10", 0.3), report
        assert pgd_margin == accuracy(report, "pgd50x10-margin", 0.3), report
        assert worst.split(",")[0] == accuracy(report, "any", 0.3), report
        assert ensemble.strip("*") == accuracy(f"{report}_autoattack", "autoattack", 0.3), report


def certified(report: str, eps: float) -> str:
    """``reports/<report>/certified.csv`` at ``eps`` as the README writes it: the best of the
    bounds run (the only one when one ran), then the bounds, e.g. ``88.28% (IBP, CROWN-IBP)``."""
    table = pd.read_csv(REPO / "reports" / report / "certified.csv")
    at = table[table["eps"] == eps]
    methods = [m for m in dict.fromkeys(at["method"]) if m != "best"]
    row = at[at["method"] == ("best" if len(methods) > 1 else methods[0])]
    assert len(row) == 1, f"reports/{report}: no single certified row at ε = {eps}"
    return f"{100 * float(row.iloc[0]['accuracy']):.2f}% ({', '.join(m.upper() for m in methods)})"


def ensemble_report(config: str) -> str:
    """The report with a config's ensemble figure: ``<config>_autoattack`` where the config's
    own report ran a weaker sweep, else the config's own."""
    separate = f"{config}_autoattack"
    return separate if (REPO / "reports" / separate).is_dir() else config


def test_ensemble_table_quotes_its_reports() -> None:
    """The bracket table: clean, FGSM, certified (lower end) and the ensemble (upper end)."""
    rows = table_after("## Results", "model (config) | ε")
    assert len(rows) == 7, rows
    for row in rows:
        report, eps = ensemble_report(config_named(row)), float(row[1])
        clean, fgsm, lower, ensemble = row[2:6]
        alone = fgsm == "—"  # the ensemble alone: no worst-case row over several attacks
        assert clean == accuracy(report, "autoattack" if alone else "any", 0), report
        if alone:
            results = pd.read_csv(REPO / "reports" / report / "results.csv")
            assert set(results["attack"]) == {"autoattack"}, report
        else:
            assert fgsm == accuracy(report, "fgsm", eps), report
        assert lower == certified(report, eps), report
        row_aa = result(report, "autoattack", eps)
        interval = f"({100 * row_aa['ci_low']:.1f}–{100 * row_aa['ci_high']:.1f})"
        assert ensemble == f"**{accuracy(report, 'autoattack', eps)}** {interval}", report
