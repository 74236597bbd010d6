"""``build_report``: run folders in, one HTML file + one Markdown file + CSV tables out."""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustkit.checkpoint import naming, write_json, write_text
from robustkit.checks import unreliable_attacks
from robustkit.data import DATASETS
from robustkit.errors import RobustkitError
from robustkit.outputs import (
    Owner,
    config_file_label,
    guard_folder,
    prepare_staging,
    refuse_working_folder,
    staging_path,
    swap_in,
    version_change,
    writing,
)
from robustkit.reporting import figures, tables
from robustkit.reporting.certified import certified_section, read_certified
from robustkit.reporting.headline import headlines
from robustkit.reporting.load import RunData, load_runs
from robustkit.reporting.physical import physical_section
from robustkit.reporting.render import (
    Block,
    Code,
    FigureBlock,
    Heading,
    Section,
    Table,
    Text,
    to_html,
    to_markdown,
)
from robustkit.results import ANY
from robustkit.runtime import command_line, git_commit, now_iso
from robustkit.version import __version__

FIGURE_DIR = "figures"
TABLE_DIR = "tables"
OUR_FIGURES = re.compile(
    r"^(accuracy|examples-.*|confusion-.*|training-.*|physical-.*|certified-.*)\.png$")
OUR_TABLES = re.compile(
    r"^(accuracy|results|cost|checks|provenance|reference|confusion-.*|physical-.*|"
    r"certified-.*)\.csv$")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def _classes(run: RunData) -> list[str]:
    spec = DATASETS.get(str(run.settings.get("dataset", "")))
    if spec:
        return list(spec.classes)
    named = run.settings.get("classes")
    return [str(c) for c in named] if isinstance(named, list) else [str(i) for i in range(10)]


# --------------------------------------------------------------------------- examples


def _adv_keys(examples: dict[str, np.ndarray]) -> dict[str, dict[float, str]]:
    """attack → {ε: key} for the keys ``adv/<attack>@<eps>``."""
    found: dict[str, dict[float, str]] = {}
    for key in examples:
        if not key.startswith("adv/") or "@" not in key:
            continue
        attack, _, eps_text = key[4:].rpartition("@")
        try:
            eps = float(eps_text)
        except ValueError:
            continue
        found.setdefault(attack, {})[eps] = key[4:]
    return found


class _Predictions:
    """Prediction and confidence of the example samples, clean and under attack: from stored
    probabilities when the file has them, else from per_sample.csv, else labels only."""

    def __init__(self, run: RunData, classes: list[str]) -> None:
        assert run.examples is not None
        self.run, self.ex, self.classes = run, run.examples, classes
        k = len(self.ex["clean"])
        self.labels = self.ex["labels"].astype(int) if "labels" in self.ex else np.full(k, -1)
        self.index = self.ex["index"].astype(int) if "index" in self.ex else None

    def name(self, c: int) -> str:
        return self.classes[c] if 0 <= c < len(self.classes) else str(c)

    @staticmethod
    def _from_probs(probs: np.ndarray, i: int) -> tuple[int, float]:
        row = probs[i].astype(np.float64)
        return int(row.argmax()), float(row.max())

    def clean(self, i: int) -> str:
        if "clean_probs" in self.ex:
            c, p = self._from_probs(self.ex["clean_probs"], i)
            return f"clean: {self.name(c)} ({p:.1%})"
        label = int(self.labels[i])
        return f"clean: label {self.name(label)}" if label >= 0 else "clean"

    def adversarial(self, key: str, attack: str, eps: float, i: int) -> tuple[str, bool | None]:
        label = int(self.labels[i])
        probs = self.ex.get(f"adv_probs/{key}")
        if probs is not None:
            c, p = self._from_probs(probs, i)
            return f"adversarial: {self.name(c)} ({p:.1%})", (c != label if label >= 0 else None)
        pred = self._per_sample_pred(attack, eps, i)
        if pred is None:
            return "adversarial", None
        return f"adversarial: {self.name(pred)}", (pred != label if label >= 0 else None)

    def _per_sample_pred(self, attack: str, eps: float, i: int) -> int | None:
        frame = self.run.per_sample
        if (
            frame is None
            or self.index is None
            or not {f"{attack}_eps", f"{attack}_pred"} <= set(frame.columns)
        ):
            return None
        rows = frame[frame["index"] == self.index[i]]
        if rows.empty:
            return None
        row = rows.iloc[0]
        broken = float(row[f"{attack}_eps"]) <= eps + 1e-9
        return int(row[f"{attack}_pred"] if broken else row["clean_pred"])


def _fresh_pictures(ex: dict[str, np.ndarray], by_eps: dict[float, str],
                    eps_sorted: list[float]) -> dict[float, list[int]]:
    """ε → the example samples whose picture was made at that ε.

    The sweep attacks a sample again only while it is unbroken, so a sample broken at ε_k
    carries its ε_k picture to every larger ε; such a copy is not fresh."""
    fresh: dict[float, list[int]] = {}
    previous: np.ndarray | None = None
    for eps in eps_sorted:
        images = ex[f"adv/{by_eps[eps]}"]
        fresh[eps] = [i for i in range(len(images))
                      if previous is None or not np.array_equal(images[i], previous[i])]
        previous = images
    return fresh


def _picture(image: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` → ``[H, W]`` (one channel) or ``[H, W, C]`` (colour), for imshow."""
    if image.ndim == 3 and image.shape[0] > 1:
        return np.ascontiguousarray(image.transpose(1, 2, 0))
    return image.reshape(image.shape[-2:])


def _strongest_examples(run: RunData
                        ) -> tuple[dict[str, np.ndarray], str, dict[float, str]] | None:
    """The stored examples of ``run``, the attack they are shown for (the one with the lowest
    mean accuracy among those with adversarial images; ties by name) and its keys by ε; None
    when the run stored no clean images or no adversarial ones."""
    ex = run.examples
    if ex is None or "clean" not in ex:
        return None
    keys = _adv_keys(ex)
    if not keys:
        return None
    strength = run.results.groupby("attack")["accuracy"].mean()
    attack = min(keys, key=lambda a: (float(strength.get(a, math.inf)), a))
    return ex, attack, keys[attack]


def _attack_norm(results: pd.DataFrame, attack: str) -> str:
    """The norm ``attack`` ran under (``linf`` when the results do not name one)."""
    rows = results.loc[results["attack"] == attack, "norm"]
    return str(rows.iloc[0]) if len(rows) else "linf"


def _eps_to_show(shown: list[float], first_flip: float, max_eps: int) -> list[float]:
    """At most ``max_eps`` of the ε ``shown`` (ascending): the first at which a sample flips,
    one half-way to the largest (only when more than two may be shown) and the largest."""
    chosen = [first_flip]
    middle = [e for e in shown if first_flip < e < shown[-1]]
    if max_eps > 2 and middle:
        chosen.append(middle[len(middle) // 2])
    chosen.append(shown[-1])
    return sorted(dict.fromkeys(chosen))[:max_eps]


def _samples_to_show(ex: dict[str, np.ndarray], key: str, norm: str, fresh: list[int],
                     flags: list[bool | None]) -> list[int]:
    """The ``fresh`` samples (pictures made at this ε: a sample broken at a smaller ε keeps
    that ε's picture, which would repeat it) in the order they are shown: broken ones first,
    then by perturbation size (``norm``; largest first) and position."""
    k = len(ex["clean"])
    delta = np.abs(ex[f"adv/{key}"].astype(np.float64) - ex["clean"]).reshape(k, -1)
    size = [figures.perturbation_size(row, norm) for row in delta]
    return sorted(fresh, key=lambda i: (flags[i] is not True, -round(size[i], 4), i))


def _panel(ex: dict[str, np.ndarray], preds: _Predictions, attack: str, eps: float, key: str,
           i: int) -> figures.Panel:
    """Sample ``i`` clean and under ``attack`` at ``eps`` (``key``), with its predictions."""
    text, flip = preds.adversarial(key, attack, eps, i)
    return figures.Panel(
        clean=_picture(ex["clean"][i]),
        adv=_picture(ex[f"adv/{key}"][i]),
        clean_text=preds.clean(i),
        adv_text=text,
        flipped=bool(flip),
    )


def _example_caption(run_name: str, attack: str, eps: float, ex: dict[str, np.ndarray]) -> str:
    """How to read an example figure: the perturbation's magnification and colours, and a
    note when confidences are missing for want of stored probabilities."""
    colours = ("grey: unchanged, a tint: those channels pushed up" if ex["clean"].shape[1] > 1
               else "red brighter, blue darker")
    caption = (
        f"{run_name}, {attack} at ε = {eps:g}: clean image + perturbation "
        f"(magnified ×{1 / eps:.3g}; {colours}) = adversarial image."
    )
    if "clean_probs" not in ex:
        caption += " Confidences need probabilities stored in examples.safetensors."
    return caption


def _example_figure(run_name: str, ex: dict[str, np.ndarray], preds: _Predictions,
                    attack: str, eps: float, key: str, norm: str,
                    order: list[int]) -> FigureBlock:
    """The figure of the samples ``order`` under ``attack`` at ``eps``, named, described
    (alt text) and captioned."""
    rows = [_panel(ex, preds, attack, eps, key, i) for i in order]
    png = figures.example_figure(rows, eps, norm, attack)
    name = f"examples-{_safe(run_name)}-{_safe(attack)}-eps{eps:g}.png"
    caption = _example_caption(run_name, attack, eps, ex)
    alt = f"{attack} examples at ε={eps:g}: " + "; ".join(
        f"{row.clean_text} → {row.adv_text}" for row in rows
    )
    return FigureBlock(name, png, alt, caption)


def _example_blocks(
    run: RunData, classes: list[str], max_eps: int, samples: int = 3
) -> list[tuple[str, FigureBlock]]:
    """The example figures of ``run``, each with the attack it shows: for the strongest
    attack with stored images, up to ``max_eps`` ε (:func:`_eps_to_show`) with at most
    ``samples`` samples each (:func:`_samples_to_show`); empty when there is nothing new to
    show at any ε > 0."""
    picked = _strongest_examples(run)
    if picked is None:
        return []
    ex, attack, by_eps = picked
    eps_sorted = sorted(e for e in by_eps if e > 0)
    if not eps_sorted:
        return []
    preds = _Predictions(run, classes)
    k = len(ex["clean"])
    norm = _attack_norm(run.results, attack)

    def flipped(eps: float) -> list[bool | None]:
        return [preds.adversarial(by_eps[eps], attack, eps, i)[1] for i in range(k)]

    fresh = _fresh_pictures(ex, by_eps, eps_sorted)
    shown = [e for e in eps_sorted if fresh[e]]  # an ε whose pictures all repeat is left out
    if not shown:
        return []
    first_flip = next((e for e in shown if any(flipped(e)[i] for i in fresh[e])), shown[0])
    blocks = []
    for eps in _eps_to_show(shown, first_flip, max_eps):
        key = by_eps[eps]
        order = _samples_to_show(ex, key, norm, fresh[eps], flipped(eps))[:samples]
        blocks.append((attack, _example_figure(run.name, ex, preds, attack, eps, key, norm,
                                               order)))
    return blocks


# --------------------------------------------------------------------------- sections


def _summary_section(
    runs: list[RunData], results: pd.DataFrame
) -> tuple[Section, dict[str, pd.DataFrame]]:
    accuracy = tables.accuracy_table(runs)
    cost = tables.cost_table(runs)
    blocks: list[Block] = [Text(f"Not like for like: {note}")
                           for note in tables.comparability_notes(runs)]
    blocks += [
        Text(
            "Robust accuracy (fraction of samples classified correctly under every attack "
            f'point within ε) with its 95% Wilson score interval. The attack "{ANY}" is the '
            "per-sample worst case over the attacks. " + INTERVAL_SCOPE
        ),
        Table(accuracy),
    ]
    target_hits = tables.target_hit_table(runs)
    if not target_hits.empty:
        blocks += [
            Text(
                "A targeted attack pushes towards the class (y + 1) mod K but, as in AutoAttack, "
                "counts a sample as broken once it is misclassified, into whatever class; its "
                "worst case is the first misclassified iterate. Target hit: the fraction of "
                "samples whose kept example is classified as the target (a lower bound on how "
                "often the attack could reach it, since it stops at the first misclassification)."
            ),
            Table(target_hits),
        ]
    blocks += [Text(note) for note in tables.unreliable_notes(runs)]
    if not cost.empty:
        blocks += [
            Text("Cost of each attack, summed over ε (per-sample input gradients)."),
            Table(cost),
        ]
    return Section("summary", "Summary", blocks), {
        "accuracy": accuracy,
        "cost": cost,
        "results": results,
    }


def _examples_section(runs: list[RunData]) -> Section | None:
    blocks: list[Block] = []
    for run in runs:
        found = _example_blocks(run, _classes(run), max_eps=3 if len(runs) == 1 else 2)
        if found and len(runs) > 1:
            blocks.append(Heading(run.name))
        blocks += [figure for _, figure in found]
    if not blocks:
        return None
    return Section(
        "examples",
        "Adversarial examples",
        [
            Text(
                "After the classic “x + ε·sign(∇) = adversarial” figure: each row shows a clean "
                "test image with its prediction, the perturbation the attack added, and the "
                "adversarial image with the new prediction (red when the label changed)."
            ),
            *blocks,
        ],
    )


def _confusion_section(runs: list[RunData]) -> tuple[Section | None, dict[str, pd.DataFrame]]:
    blocks: list[Block] = []
    out: dict[str, pd.DataFrame] = {}
    for run in runs:
        choice = tables.strongest_attack(run)
        if choice is None:
            continue
        attack, eps = choice
        table = tables.confusion_table(run, attack, eps, _classes(run))
        out[f"confusion-{_safe(run.name)}"] = table
        title = f"{run.name}: {attack} at ε = {eps:g}"
        if len(runs) > 1:
            blocks.append(Heading(run.name))
        png = figures.confusion_figure(table, title)
        blocks.append(
            FigureBlock(
                f"confusion-{_safe(run.name)}.png",
                png,
                f"label to adversarial prediction, {title}",
                f"{title}: rows are true labels, columns the prediction "
                "under attack; the diagonal kept its label.",
            )
        )
        flips = tables.top_flips(table)
        if not flips.empty:
            blocks.append(Table(flips, caption="Most frequent label changes"))
    if not blocks:
        return None, out
    return Section(
        "confusion",
        "What the digits turn into",
        [
            Text(
                "Which class each sample is pushed to by the strongest attack at the largest ε "
                "(from per_sample.csv)."
            ),
            *blocks,
        ],
    ), out


#: What the intervals cover, said next to them.
INTERVAL_SCOPE = (
    "Each figure is robust accuracy under these attacks: an upper bound, since a stronger "
    "attack can only lower it, so the true value can only be lower. The interval covers "
    "test-set sampling alone (which n images were drawn), not the attack's weakness."
)


#: How each ``selected_by`` of a checkpoint sidecar reads in the report.
SELECTION_TEXT = {
    "val_robust_acc": "the epoch with the best robust validation accuracy",
    "val_acc": "the epoch with the best clean validation accuracy",
    "last_epoch": ("the last epoch: there was no validation split, and test accuracy never "
                   "selects a checkpoint"),
}


def _checkpoint_text(manifest: dict[str, Any]) -> str | None:
    """Which training epoch the evaluated checkpoint is and why it was chosen."""
    epoch, selected = manifest.get("checkpoint_epoch"), manifest.get("checkpoint_selected_by")
    if epoch is None or selected is None:
        return None
    return f"Evaluated checkpoint: epoch {epoch}, {SELECTION_TEXT.get(selected, selected)}."


#: metrics.csv columns renamed in the report's last-epoch table: ``lr`` is the rate after the
#: epoch's last step (0 at the end of a cosine schedule), not the one it trained with.
LAST_EPOCH_LABELS = {"lr": "lr at end"}


def _training_section(runs: list[RunData]) -> Section | None:
    blocks: list[Block] = []
    for run in runs:
        metrics = run.metrics
        if metrics is None or metrics.empty:
            continue
        if len(runs) > 1:
            blocks.append(Heading(run.name))
        blocks.append(
            FigureBlock(
                f"training-{_safe(run.name)}.png",
                figures.training_figure(metrics),
                f"training curves of {run.name}",
                f"{run.name}: loss and accuracies per epoch (metrics.csv).",
            )
        )
        last = metrics.tail(1).reset_index(drop=True).rename(columns=LAST_EPOCH_LABELS)
        blocks.append(Table(last, caption="Last epoch"))
        chosen = _checkpoint_text(run.manifest)
        if chosen:
            blocks.append(Text(chosen))
    return Section("training", "Training", blocks) if blocks else None


#: What a report says for a run made with ``--checks off``, where a verdict would stand.
UNCHECKED = ("No sanity check ran (--checks off): nothing tested whether these numbers "
             "overstate robustness (masked gradients, an attack that has not converged, a "
             "random or batch-dependent model). Run again with --checks quick or full before "
             "relying on them.")
#: What a report says for a run made with ``--checks quick``.
QUICK_NOTE = ("Quick checks: every check that can discredit a number, at budgets scaled to "
              "the evaluation and reusing its per-sample outcomes; --checks full runs each "
              "check at its own, larger budget.")


def _checks_level(run: RunData) -> str:
    """The checks level a run was made with (runs from before levels existed: full)."""
    return str(run.manifest.get("checks", "full"))


def _checks_section(runs: list[RunData]) -> tuple[Section | None, pd.DataFrame]:
    frame = tables.checks_table(runs)
    unchecked = [run.name for run in runs if _checks_level(run) == "off"]
    blocks: list[Block] = []
    if unchecked:
        named = f" ({', '.join(unchecked)})" if len(runs) > 1 else ""
        blocks.append(Text(UNCHECKED.replace("(--checks off)", f"(--checks off){named}")))
    if not frame.empty:
        shown = frame if len(runs) > 1 else frame.drop(columns=["run"])
        counts = frame["status"].value_counts()
        summary = ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("pass", "warn", "fail"))
        blocks.append(Text(
            f"Checks for gradient masking and mis-configured attacks (Carlini et al. 2019, "
            f"“On Evaluating Adversarial Robustness”): {summary}."))
        if any(_checks_level(run) == "quick" for run in runs):
            blocks.append(Text(QUICK_NOTE))
        blocks.append(Table(shown, status_column="status"))
    if not blocks:
        return None, frame
    return Section("checks", "Sanity checks", blocks), frame


def _reference_section(runs: list[RunData]) -> tuple[Section | None, pd.DataFrame]:
    frame = tables.reference_table(runs)
    if frame.empty:
        return None, frame
    shown = frame if len(runs) > 1 else frame.drop(columns=["run"])
    return Section(
        "reference",
        "Published reference",
        [Text("The published number this run reproduces, next to ours."), Table(shown)],
    ), frame


def _provenance_section(runs: list[RunData]) -> tuple[Section, pd.DataFrame]:
    blocks: list[Block] = []
    for run in runs:
        if len(runs) > 1:
            blocks.append(Heading(run.name))
        items = tables.provenance(run)
        blocks.append(Table(pd.DataFrame(items, columns=["field", "value"])))
        if run.config_text is not None:
            blocks.append(Code(run.config_text, "toml", "resolved config (config.toml)"))
        if run.settings:
            blocks.append(
                Code(tables.settings_text(run), "json", "evaluation settings (settings.json)")
            )
        notes = run.manifest.get("notes")
        if isinstance(notes, list):
            blocks += [Text(f"Note: {note}") for note in notes]
    return Section("provenance", "Provenance", blocks), tables.provenance_table(runs)


def _headline(runs: list[RunData]) -> list[tuple[str, str]]:
    """(model, headline) for every model of every run: robust accuracy at the largest ε with
    its interval, the strongest attack, clean accuracy, the checks' verdict."""
    lines = []
    for run in runs:
        unreliable = unreliable_attacks(run.checks, run.settings, run.results["attack"].unique())
        lines += [(h.model, h.text())
                  for h in headlines(run.results, run.checks, _checks_level(run), unreliable,
                                     read_certified(run))]
    return lines


def _intro(runs: list[RunData]) -> list[str]:
    lines = []
    for run in runs:
        s = run.settings
        parts = [", ".join(run.models)]
        if s.get("dataset"):
            parts.append(f"{s['dataset']} {s.get('split', 'test')} set")
        n = s.get("n") or (int(run.results["n"].iloc[0]) if "n" in run.results else None)
        if n:
            parts.append(f"{n} samples")
        parts.append(f"attacks {tables.attack_titles(run)}")
        eps = sorted({float(e) for e in run.results["eps"]})
        parts.append("ε ∈ {" + ", ".join(f"{e:g}" for e in eps) + "}")
        lines.append(" · ".join(parts))
    return lines


# --------------------------------------------------------------------------- build


def _clean_stale(folder: Path, pattern: re.Pattern[str], keep: set[str]) -> None:
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and pattern.match(path.name) and path.name not in keep:
            path.unlink()


def _made_by(runs: list[RunData], out_dir: Path, current: str) -> str:
    """The command behind a report: a report rebuilt inside its own run folder keeps the
    command that made the run and names the rebuild."""
    if len(runs) == 1 and runs[0].path.resolve() == out_dir.resolve():
        original = runs[0].manifest.get("command_line")
        if original and original != current:
            return f"{original} (report rebuilt by `{current}`)"
    return current


def build_report(run_dirs: list[Path], out_dir: Path, title: str | None = None,
                 made_by: str | None = None, shown_as: Path | None = None) -> dict[str, Path]:
    """Write ``report.html`` (self-contained), ``report.md`` (+ ``figures/``) and
    ``tables/*.csv`` for one or more evaluation run folders into ``out_dir``.

    ``made_by`` is the command shown as the report's origin (default: the running command; for
    a report rebuilt in its own run folder, the run's command and the rebuild's).
    ``shown_as``: ``out_dir`` is a staging folder that will be renamed to this one; run folders
    inside it are named as they will be.
    Returns the paths written: ``html``, ``markdown``, ``figures`` and ``tables``. A folder
    without a readable ``results.csv`` raises :class:`RobustkitError`.
    """
    shown = shown_as or out_dir

    def final(path: Path) -> Path:
        try:
            return shown / Path(path).resolve().relative_to(out_dir.resolve())
        except ValueError:
            return Path(path)

    runs = load_runs([Path(p) for p in run_dirs], shown=final)
    results = tables.all_results(runs)
    models = list(dict.fromkeys(results["model"]))
    title = title or f"Robustness report: {', '.join(models)}"

    summary, csvs = _summary_section(runs, results)
    accuracy_png = figures.accuracy_figure(results)
    summary.blocks.insert(
        next(i for i, block in enumerate(summary.blocks) if isinstance(block, Table)),
        FigureBlock(
            "accuracy.png",
            accuracy_png,
            "robust accuracy vs epsilon",
            "Robust accuracy vs ε, one line per model × attack; shaded: 95% intervals of "
            "test-set sampling around robust accuracy under these attacks (the true value can "
            "only be lower).",
        ),
    )
    certified, certified_csvs = certified_section(runs, _safe)
    csvs.update(certified_csvs)
    sections: list[Section | None] = [summary, certified, _examples_section(runs)]
    confusion, confusion_csvs = _confusion_section(runs)
    csvs.update(confusion_csvs)
    physical, physical_csvs = physical_section(runs, _safe)
    csvs.update(physical_csvs)
    sections += [physical, confusion, _training_section(runs)]
    checks, checks_frame = _checks_section(runs)
    reference, reference_frame = _reference_section(runs)
    provenance, provenance_frame = _provenance_section(runs)
    sections += [checks, reference, provenance]
    csvs.update(
        {"checks": checks_frame, "reference": reference_frame, "provenance": provenance_frame}
    )
    problems = [f"{run.name}: {p}" for run in runs for p in run.problems]
    if problems:
        sections.append(Section("problems", "Files skipped", [Text(p) for p in problems]))
    present = [s for s in sections if s is not None]

    intro = [*_intro(runs), f"Made by: {made_by or _made_by(runs, shown, command_line())}"]
    footer = f"Generated by robustkit {__version__} from {', '.join(run.name for run in runs)}."
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        figure_dir, table_dir = out_dir / FIGURE_DIR, out_dir / TABLE_DIR
        figure_dir.mkdir(exist_ok=True)
        table_dir.mkdir(exist_ok=True)
        written_figures = set()
        for section in present:
            for block in section.blocks:
                if isinstance(block, FigureBlock):
                    with naming(figure_dir / block.name):  # a failed write names the file
                        (figure_dir / block.name).write_bytes(block.png)
                    written_figures.add(block.name)
        written_tables = set()
        for name, frame in csvs.items():
            if frame.empty:
                continue
            path = table_dir / f"{name}.csv"
            with naming(path):
                frame.to_csv(path, index=name.startswith("confusion-"))
            written_tables.add(path.name)
        _clean_stale(figure_dir, OUR_FIGURES, written_figures)
        _clean_stale(table_dir, OUR_TABLES, written_tables)
        html_path, md_path = out_dir / "report.html", out_dir / "report.md"
        headline = _headline(runs)
        write_text(html_path, to_html(title, intro, present, footer, headline))
        write_text(md_path, to_markdown(title, intro, present, footer, FIGURE_DIR, headline))
    except OSError as exc:
        raise _cannot_write(exc, out_dir, shown) from None
    return {"html": html_path, "markdown": md_path, "figures": figure_dir, "tables": table_dir}


def publish_report(run_dirs: list[Path], out_dir: Path, *, title: str | None = None,
                   overwrite: bool = False) -> tuple[dict[str, Path], str | None]:
    """``robustkit report``: build the report in a staging folder and swap it in whole.

    ``out_dir`` is one of ``run_dirs`` (its own report rebuilt: the run's files are carried
    over), or a report folder owned by the same sources (replaced), or new; anything else
    (another experiment's results or report, files robustkit did not write) is refused unless
    ``overwrite``. Another robustkit process writing ``out_dir`` is refused before anything is
    read. A failure (a full disk, Ctrl-C) leaves the old report and no staging folder.
    Returns the paths written and the line saying what was replaced, if any.
    """
    run_dirs = [Path(p) for p in run_dirs]
    refuse_working_folder(out_dir)
    with writing([(out_dir, "--out")]):  # one writer of the folder, for the whole job
        in_place = any(d.resolve() == out_dir.resolve() for d in run_dirs)
        for d in run_dirs:
            load_runs([d])  # every source readable before anything is written
        line = None if in_place else guard_folder(
            out_dir, Owner("report", ", ".join(_sources(run_dirs))), overwrite,
            lambda held: f"the same sources, {version_change(held.manifest)}")
        work = staging_path(out_dir)
        with _removed_on_failure(work, out_dir):
            prepare_staging(out_dir)
            paths = _stage_report(run_dirs, out_dir, work, title, in_place)
            swap_in(work, out_dir)
    return {kind: out_dir / path.relative_to(work) for kind, path in paths.items()}, line


def _sources(run_dirs: list[Path]) -> list[str]:
    """A report's sources as its manifest and owner record them."""
    return sorted(config_file_label(d) for d in run_dirs)


def _stage_report(run_dirs: list[Path], out_dir: Path, work: Path, title: str | None,
                  in_place: bool) -> dict[str, Path]:
    """Build in the staging folder ``work`` the report ``out_dir`` becomes: a copy of the run
    folder rebuilt in place, or a report folder with its manifest."""
    if in_place:
        shutil.copytree(out_dir, work, symlinks=True, dirs_exist_ok=True)
    else:
        sources = _sources(run_dirs)
        write_json(work / "manifest.json", {
            "command": "report", "owner": Owner("report", ", ".join(sources)).record(),
            "sources": sources, "robustkit": __version__, "git_commit": git_commit(),
            "date": now_iso(), "command_line": command_line()})
    sources_now = [work if d.resolve() == out_dir.resolve() else d for d in run_dirs]
    return build_report(sources_now, work, title=title, shown_as=out_dir)


@contextmanager
def _removed_on_failure(work: Path, shown: Path) -> Iterator[None]:
    """Remove the staging folder ``work`` when the block fails; a failed write becomes one
    :class:`RobustkitError` line naming the file as ``shown`` would hold it."""
    try:
        yield
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise _cannot_write(exc, work, shown) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _cannot_write(exc: OSError, work: Path, shown: Path) -> RobustkitError:
    """A failed write into the staging folder ``work`` as one line naming the file as it
    would have been named in ``shown`` (``shutil.copytree`` reports its first failure)."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        _, target, reason = exc.args[0][0]
        path, why = Path(target), re.sub(r"^\[Errno \d+\] |: '.*$", "", str(reason))
    else:
        path, why = Path(str(exc.filename or work)), exc.strerror or str(exc)
    with suppress(ValueError):  # a file outside the staging folder keeps its name
        path = shown / path.resolve().relative_to(work.resolve())
    return RobustkitError(f"cannot write {path} ({why}): check the folder is writable and has "
                          "free space, or choose another --out")
