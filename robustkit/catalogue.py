"""The ``robustkit zoo`` listing: one entry per set of released weights, with the figure that
the strongest evaluation of those weights measured, at the ε they were trained for.

Several reports can release the same weights (``mnist_cnn_pgd_at`` evaluated with PGD, then
with AutoAttack, then under transformations): they are one entry, named by the shortest report
name, the others listed as aliases (each ``zoo:NAME`` loads the same file). Weights are told
apart by the sha256 of the file as it is now, so a modified copy is an entry of its own
(marked, as :func:`robustkit.released.release_mismatch` says).

The figure of an entry:

* the ε: the training budget (``train.adversarial.eps``) of adversarially trained weights;
  for standard training, the largest ε any of the reports evaluated;
* the evaluations: reports of the plain model only (no ``defence`` in front, no
  ``transforms``), whose ``results.csv`` has rows at that ε; a report's figure is its
  per-sample worst case (``any``), else its single attack's accuracy, else its lowest;
* the strongest: the lowest of those figures (robust accuracy under attack is an upper bound,
  so the lowest is the closest), shown with its report and attacks;
* unreliable: a failed check of that report that discredits the figure's attack
  (:func:`robustkit.checks.unreliable_attacks`), unless the figure is 0 (robust accuracy under
  attack is an upper bound: 0 cannot overstate); the listing also names each other report
  whose own figure a check discredits, so a report's unreliable number is never unexplained;
* certified: the highest certified accuracy any plain report's ``certified.csv`` gives at that
  ε (per sample the best of its bounds; every sound bound is a lower bound on the true robust
  accuracy, so the highest is the closest), the lower end of the bracket certified ≤ true ≤
  robust. A certification whose consistency check failed is named as such, not quoted.
"""

from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from robustkit.checks.verdicts import unreliable_attacks
from robustkit.records import RunSettings
from robustkit.released import Released
from robustkit.results import ANY

#: The listing's width: it fits a terminal of 80 columns.
WIDTH = 80
#: The mark beside a figure that a failed check discredits.
MARK = "*"


@dataclass(frozen=True)
class Figure:
    """One report's robust accuracy at one ε: the worst case over its attacks."""

    report: str
    attacks: tuple[str, ...]
    accuracy: float
    clean: float | None
    unreliable: str | None  # why a failed check discredits it; None when none does
    checked: bool  # whether the report ran checks at all


@dataclass(frozen=True)
class Certified:
    """One report's certified accuracy at one ε: per sample the best of its bounds."""

    report: str
    methods: tuple[str, ...]
    accuracy: float
    unreliable: str | None  # the failed consistency check; None when it passed


@dataclass(frozen=True)
class Entry:
    """One set of released weights: its handle, aliases, training and strongest figure."""

    name: str
    aliases: tuple[str, ...]
    arch: str
    dataset: str
    method: str
    train_eps: float | None
    eps: float | None  # the ε the figure is quoted at
    figure: Figure | None
    discredited: tuple[tuple[str, Figure], ...]  # other reports' figures a check discredits
    modified: bool
    certified: Certified | None = None  # the highest lower bound at ε


# --------------------------------------------------------------------------- reading


def _settings(folder: Path) -> RunSettings:
    """``folder``'s settings; empty when it has none that can be read."""
    return RunSettings.read_if_any(folder) or RunSettings()


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _plain(folder: Path) -> bool:
    """Whether the report measured the weights alone: no defence, no transformations."""
    settings = _settings(folder)
    return not settings.defence and not settings.transforms


def _at(rows: list[dict[str, str]], eps: float) -> list[dict[str, str]]:
    return [r for r in rows if (e := _number(r.get("eps"))) is not None and abs(e - eps) < 1e-9]


def _figure(folder: Path, name: str, eps: float) -> Figure | None:
    """The report's worst case at ``eps`` (``any``, else its one attack, else the lowest
    row), with its clean accuracy and whether a failed check discredits it."""
    rows = _read_rows(folder / "results.csv")
    here = [r for r in _at(rows, eps) if _number(r.get("accuracy")) is not None]
    if not here:
        return None
    worst = [r for r in here if r.get("attack") == ANY]
    row = min(worst or here, key=lambda r: float(r["accuracy"]))
    attacks = tuple(dict.fromkeys(str(r.get("attack")) for r in here if r.get("attack") != ANY))
    clean = [a for r in _at(rows, 0.0) if (a := _number(r.get("accuracy"))) is not None]
    checks_path = folder / "checks.csv"
    reasons = _unreliable(checks_path, folder, [str(r.get("attack")) for r in here])
    accuracy = float(row["accuracy"])
    reason = reasons.get(str(row.get("attack"))) if accuracy > 0 else None  # 0 is exact
    return Figure(name, attacks, accuracy, min(clean) if clean else None, reason,
                  checks_path.is_file())


def _certified(folder: Path, name: str, eps: float) -> Certified | None:
    """The report's certified accuracy at ``eps`` (its ``best`` row, else its one bound's),
    from ``certified.csv``."""
    here = [r for r in _at(_read_rows(folder / "certified.csv"), eps)
            if _number(r.get("accuracy")) is not None]
    methods = tuple(dict.fromkeys(m for r in here if (m := str(r.get("method"))) != "best"))
    if not methods:
        return None
    best = [r for r in here if r.get("method") == "best"]
    row = max(best or here, key=lambda r: float(r["accuracy"]))
    return Certified(name, methods, float(row["accuracy"]), row.get("unreliable") or None)


def _unreliable(checks_path: Path, folder: Path, titles: list[str]) -> dict[str, str]:
    """Attack title → why a failed check discredits it, from the report's checks.csv."""
    if not checks_path.is_file():
        return {}
    try:
        checks = pd.read_csv(checks_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return {}
    return unreliable_attacks(checks, _settings(folder), titles)


def _evaluated_eps(folders: Sequence[Path]) -> list[float]:
    return sorted({e for f in folders for r in _read_rows(f / "results.csv")
                   if (e := _number(r.get("eps"))) is not None and e > 0})


# --------------------------------------------------------------------------- grouping


def _entry(group: list[Released]) -> Entry:
    """The entry of one set of weights (``group``: its reports, any order)."""
    group = sorted(group, key=lambda r: (len(r.name), r.name))
    handle = group[0]
    method, train_eps = next(((r.method, r.train_eps) for r in group if r.method),
                             ("", None))
    plain = [r for r in group if _plain(r.path.parent)]
    evaluated = _evaluated_eps([r.path.parent for r in plain])
    eps = train_eps if train_eps is not None else (evaluated[-1] if evaluated else None)
    figures = [] if eps is None else [
        f for r in plain if (f := _figure(r.path.parent, r.name, eps)) is not None]
    order = {r.name: i for i, r in enumerate(group)}  # ties: the handle's own report first
    strongest = min(figures, key=lambda f: (f.accuracy, f.unreliable is not None,
                                            order[f.report]), default=None)
    discredited = tuple((f.report, f) for f in figures
                        if f.unreliable is not None and f is not strongest)
    aliases = tuple(sorted(r.name for r in group[1:]))
    certified = [] if eps is None else [
        c for r in plain if (c := _certified(r.path.parent, r.name, eps)) is not None]
    highest = max(certified, key=lambda c: (c.unreliable is None, c.accuracy, -order[c.report]),
                  default=None)
    return Entry(handle.name, aliases, handle.arch, handle.dataset, method, train_eps, eps,
                 strongest, discredited, any(r.modified for r in group), highest)


def entries(released: Sequence[Released]) -> list[Entry]:
    """One entry per set of weights (the sha256 of the file now), sorted by name."""
    groups: dict[str, list[Released]] = {}
    for r in released:
        groups.setdefault(r.sha256, []).append(r)
    return sorted((_entry(g) for g in groups.values()), key=lambda e: e.name)


# --------------------------------------------------------------------------- layout

HEADER = ("name", "arch", "data", "training", "clean", "robust ", "ε")
FOOTER = (
    f"robust: the lowest accuracy under attack that any report of these weights measured "
    f"(its per-sample worst case over the report's attacks), at the ε the weights were "
    f"trained for, or for standard training at the largest ε evaluated; evaluations behind a "
    f"defence or under transformations are left out. {MARK}: a failed check discredits the "
    f"figure. certified: the highest accuracy bound propagation proves there (a lower bound). "
    f"Each zoo:NAME (aliases too) loads its weights: robustkit attack --model "
    f"zoo:NAME --attack apgd --eps 0,0.3 --n 200")


def _percent(value: float | None) -> str:
    return f"{value:.2%}" if value is not None else "?"


def _cells(entry: Entry) -> tuple[str, ...]:
    figure = entry.figure
    training = entry.method + (f" ε={entry.train_eps:g}" if entry.train_eps is not None else "")
    marked = figure is not None and figure.unreliable is not None
    robust = _percent(figure.accuracy if figure else None) + (MARK if marked else " ")
    clean = figure.clean if figure is not None else None
    eps = f"{entry.eps:g}" if entry.eps is not None else "?"
    return (f"zoo:{entry.name}", entry.arch, entry.dataset, training, _percent(clean), robust,
            eps)


def _details(entry: Entry) -> list[str]:
    """What the row does not say: where the figure comes from, the aliases, the reports whose
    own figure is discredited, a modified file."""
    notes = []
    figure = entry.figure
    if figure is not None:
        notes.append(f"from {figure.report} ({'+'.join(figure.attacks)})"
                     + (f", unreliable: {figure.unreliable}" if figure.unreliable else "")
                     + ("" if figure.checked else ", no checks ran"))
    elif entry.eps is not None:
        notes.append(f"no report evaluated these weights at ε={entry.eps:g}")
    if entry.certified is not None:
        notes.append(_certified_note(entry.certified, figure))
    if entry.aliases:
        notes.append("also " + ", ".join(f"zoo:{a}" for a in entry.aliases))
    notes += [f"{report}: its {_percent(f.accuracy)} is unreliable ({f.unreliable})"
              for report, f in entry.discredited]
    if entry.modified:
        notes.append("MODIFIED: not the weights its report measured")
    return notes


def _certified_note(certified: Certified, figure: Figure | None) -> str:
    """The lower end of the bracket, and the bracket itself where the row's figure is sound."""
    where = "" if figure is not None and figure.report == certified.report \
        else f" in {certified.report}"
    quoted = f"certified {_percent(certified.accuracy)} by {', '.join(certified.methods)}{where}"
    if certified.unreliable:
        return f"certified by {', '.join(certified.methods)}{where}: unreliable " \
               f"({certified.unreliable})"
    if figure is not None and figure.unreliable is None:
        return f"{quoted}: true robust accuracy in [{_percent(certified.accuracy)}, " \
               f"{_percent(figure.accuracy)}]"
    return quoted


def _widths(rows: list[tuple[str, ...]]) -> tuple[list[int], str]:
    """Column widths and the gap between columns (two spaces where they fit, else one):
    each column's widest cell; the name column takes what the others leave of :data:`WIDTH`
    (a longer name gets a line of its own)."""
    rest = [max(len(row[i]) for row in rows) for i in range(1, len(HEADER))]
    names = max(len(row[0]) for row in rows)
    gap = "  " if names + sum(rest) + 2 * len(rest) <= WIDTH else " "
    room = WIDTH - sum(rest) - len(gap) * len(rest)
    return [max(len(HEADER[0]), min(names, room)), *rest], gap


def _row(row: tuple[str, ...], widths: list[int], gap: str) -> list[str]:
    """One row: text columns left-aligned, figures right-aligned, one space apart; a name
    wider than its column first, on its own line; a row still too wide, wrapped."""
    lines = []
    if len(row[0]) > widths[0]:
        lines.append(row[0])
        row = ("", *row[1:])
    cells = [c.ljust(w) if i < 4 else c.rjust(w)
             for i, (c, w) in enumerate(zip(row, widths, strict=True))]
    line = gap.join(cells).rstrip()
    return lines + (textwrap.wrap(line, WIDTH, subsequent_indent="    ")
                    if len(line) > WIDTH else [line])


def _wrap(text: str, indent: str = "", more: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=more,
                         break_on_hyphens=False, break_long_words=True)


def listing(released: Sequence[Released]) -> list[str]:
    """The ``robustkit zoo`` output: a header, then per set of weights its row and indented
    notes (:func:`_details`), then what the figures mean; no line above :data:`WIDTH`."""
    found = entries(released)
    rows = [_cells(e) for e in found]
    widths, gap = _widths([HEADER, *rows])
    lines = _row(HEADER, widths, gap)
    for entry, row in zip(found, rows, strict=True):
        lines += _row(row, widths, gap)
        for note in _details(entry):
            lines += _wrap(note, "  ", "    ")
    return [*lines, "", *_wrap(FOOTER)]
