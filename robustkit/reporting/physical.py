"""The report section "Physical-world robustness": examples under random transformations.

Reads what :mod:`robustkit.physical` wrote into a run folder (``physical.csv``,
``physical.json``, ``physical.safetensors``) and the ``defence`` entry of ``settings.json``:

* the picture the physical-world story ends on, for digits: one sample's clean image and each
  attack's adversarial example, untransformed and under the same few random transformations,
  with the model's prediction under each (red: not the label);
* success under transformation against ε, one line per attack, with the clean images' error
  under the same transformations;
* the table and the settings (distribution, draws, EOT samples, defence, BPDA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from safetensors import SafetensorError
from safetensors.numpy import load_file

from robustkit.config import AttackConfig, DefenceConfig, config_from_dict
from robustkit.defence_specs import RANDOM_STEPS, describe_step
from robustkit.errors import RobustkitError
from robustkit.records import RunSettings
from robustkit.reporting.figures import to_png
from robustkit.reporting.load import RunData
from robustkit.reporting.render import Block, FigureBlock, Heading, Part, Section, Table, Text
from robustkit.storage import UnreadableJsonError, read_json

CSV, JSON, VIEWS = "physical.csv", "physical.json", "physical.safetensors"


def physical_section(runs: list[RunData], safe: Callable[[str], str]) -> Part:
    """The section, and its tables (``physical-<run>``), for the runs that have one;
    ``safe`` turns a run name into a file-name part."""
    blocks: list[Block] = []
    tables: dict[str, pd.DataFrame] = {}
    for run in runs:
        found = _run_blocks(run, safe(run.name))
        if not found:
            continue
        if len(runs) > 1:
            blocks.append(Heading(run.name))
        blocks += found[0]
        if found[1] is not None:
            tables[f"physical-{safe(run.name)}"] = found[1]
    if not blocks:
        return Part(None, tables)
    if not tables:  # a defence without transformations: only its notes
        return Part(Section("defence", "Defence", blocks), tables)
    intro = Text(
        "Adversarial examples in the physical world must survive the camera: a little rotation, "
        "shift, zoom, lighting, noise and blur. Plain PGD makes its example for the exact image; "
        "EOT (Athalye et al., 2018) ascends the loss averaged over random transformations at "
        "every step. Each attack runs from scratch at each ε on the correctly classified "
        "samples; each example is then shown to the model under fresh random transformations "
        "(none of those the attack saw). “success under T” is the mean fraction of those "
        "transformations that are misclassified; “clean error under T” is the same for the "
        "clean images, what the transformations do without any attack. “attack's own "
        "success” is what the attack counted: plain PGD, its example misclassified as it is; "
        "EOT, misclassified under all K draws it checked last.")
    return Part(Section("physical", "Physical-world robustness", [intro, *blocks]), tables)


def _run_blocks(run: RunData, name: str) -> tuple[list[Block], pd.DataFrame | None] | None:
    blocks: list[Block] = [Text(note) for note in defence_notes(run.settings)]
    table, info = _read(run)
    if table is None:
        return (blocks, None) if blocks else None
    blocks += [Text(str(n)) for n in info.get("notes", [])]
    views = _views(run)
    if views:
        blocks.append(FigureBlock(
            f"physical-views-{name}.png", views_figure(views),
            "one adversarial example under random transformations",
            "First column: untransformed; then the same random transformations applied to the "
            "clean image and to each attack's example, with the model's prediction (red: wrong)."))
    attacks = table[table["attack"] != "clean"]
    if not attacks.empty:
        blocks.append(FigureBlock(
            f"physical-success-{name}.png", success_figure(table),
            "success rate under transformation vs epsilon",
            "Success under random transformations against ε; the dotted line is the clean "
            "images' error under the same transformations (95% intervals shaded, a guide)."))
    shown = table.rename(columns={
        "success": "attack's own success", "success_transformed": "success under T",
        "clean_error_transformed": "clean error under T", "draws": "draws per image"})
    blocks.append(Table(shown.drop(columns=["ci_low", "ci_high"]).round(4),
                        caption="Success under transformation (row clean: error of the clean "
                        "images under T over all samples)"))
    blocks.append(Table(_settings_table(info, run.settings), caption="Settings"))
    return blocks, table


def _read(run: RunData) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    csv, meta = run.files / CSV, run.files / JSON
    if not csv.is_file():
        return None, {}
    try:
        table = pd.read_csv(csv)
        info = read_json(meta) if meta.is_file() else {}
    except (ValueError, OSError, pd.errors.ParserError, UnreadableJsonError) as exc:
        run.problems.append(f"{CSV} skipped: {exc}")
        return None, {}
    needed = {"attack", "eps", "success", "success_transformed", "clean_error_transformed"}
    if not needed <= set(table.columns):
        run.problems.append(f"{CSV} skipped: it lacks the columns {sorted(needed)}")
        return None, {}
    return table, info


def _views(run: RunData) -> dict[str, np.ndarray]:
    path = run.files / VIEWS
    if not path.is_file():
        return {}
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        run.problems.append(f"{VIEWS} skipped: {exc}")
        return {}


def defence_notes(settings: RunSettings) -> list[str]:
    """What the settings say about a preprocessing defence and how it was attacked."""
    if settings.defence is None:
        return []
    try:
        config = config_from_dict({"attacks": [], "defence": dict(settings.defence)}).defence
        attacks = [AttackConfig(**a) for a in settings.attacks]
    except (RobustkitError, TypeError):
        return ["The model is defended by a preprocessing step (settings.json: defence)."]
    assert isinstance(config, DefenceConfig)
    step = describe_step(config.preprocess, bits=config.bits, size=config.size,
                         sigma=config.sigma)
    notes = [f"The model is defended: {step} in front of the trained classifier."]
    if config.preprocess in RANDOM_STEPS:
        eot = [a.title for a in attacks if a.eot_samples]
        notes.append("Its forward pass is random, so it is attacked with EOT ("
                     + (", ".join(eot) if eot else "none here: add eot_samples")
                     + "); a plain attack's success, judged on one random pass, overstates "
                     "what survives a fresh pass.")
    bpda = [a.title for a in attacks if a.bpda]
    if bpda:
        notes.append(f"BPDA: {', '.join(bpda)} replace the preprocessing's backward pass by a "
                     "differentiable approximation (Athalye, Carlini & Wagner, 2018); their "
                     "predictions are the defended model's.")
    return notes


def _settings_table(info: dict[str, Any], settings: RunSettings) -> pd.DataFrame:
    rows = [("transformations", info.get("transform", "")),
            ("draws per image (M)", (info.get("transforms") or {}).get("eval_samples", ""))]
    for a in settings.attacks:
        if a.get("eot_samples"):
            rows.append((f"EOT samples per step ({a.get('name')})", a["eot_samples"]))
        if a.get("bpda"):
            rows.append((f"BPDA ({a.get('name')})", a["bpda"]))
    if settings.defence is not None:
        rows.append(("defence", ", ".join(f"{k}={v}" for k, v in settings.defence.items())))
    return pd.DataFrame(rows, columns=["setting", "value"])


def views_figure(views: dict[str, np.ndarray]) -> bytes:
    """Rows: clean, then each attack's example; columns: untransformed, then the draws."""
    label = int(views["label"][0])
    rows = [("clean", views["clean"], views["clean_pred"])]
    rows += [(key[4:], views[key], views[f"pred/{key[4:]}"])
             for key in sorted(k for k in views if k.startswith("adv/"))]
    cols = rows[0][1].shape[0]
    fig = Figure(figsize=(1.15 * cols + 1.3, 1.3 * len(rows) + 0.4))
    grid = fig.add_gridspec(len(rows), cols, wspace=0.08, hspace=0.45)
    for r, (title, images, preds) in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(images[c, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            pred = int(preds[c])
            ax.set_title(f"→ {pred}", fontsize=9, color="black" if pred == label else "#b2182b")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle(f"label {label}: untransformed, then {cols - 1} random transformations",
                 fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.99, top=1 - 0.5 / fig.get_figheight(), bottom=0.02)
    return to_png(fig)


def success_figure(table: pd.DataFrame) -> bytes:
    """Success under transformation against ε, one line per attack."""
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    attacks = table[table["attack"] != "clean"]
    for attack, rows in attacks.groupby("attack", sort=False):
        rows = rows.sort_values("eps")
        style = "o-" if len(rows) >= 3 else "o"
        line = ax.plot(rows["eps"], rows["success_transformed"], style,
                       label=f"{attack} under T")[0]
        ax.plot(rows["eps"], rows["success"], "x--", color=line.get_color(), alpha=0.6,
                label=f"{attack}, its own success")
        if "ci_low" in rows:
            ax.fill_between(rows["eps"], rows["ci_low"], rows["ci_high"],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    baseline = attacks["clean_error_transformed"]
    if len(baseline) and not math.isnan(float(baseline.iloc[0])):
        ax.axhline(float(baseline.iloc[0]), color="grey", linestyle=":",
                   label="clean images under T")
    ax.set_xlabel("ε (L∞, pixel units)")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.subplots_adjust(left=0.11, right=0.62, bottom=0.14, top=0.96)
    return to_png(fig)
