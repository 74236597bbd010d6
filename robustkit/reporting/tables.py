"""The report's tables, as pandas frames (written to ``tables/*.csv`` and rendered)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from typing import Any

from robustkit.config import config_from_dict
from robustkit.config import config_hash as resolved_hash
from robustkit.errors import RobustkitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import numpy as np
import pandas as pd

from robustkit.checks.verdicts import UNRELIABLE, unreliable_attacks
from robustkit.reporting.certified import read_certified
from robustkit.reporting.load import RunData
from robustkit.results import ANY, TARGET_HIT


def fmt_eps(eps: float) -> str:
    return f"{float(eps):g}"


def fmt_interval(acc: float, low: float, high: float) -> str:
    """``0.912 [0.893, 0.928]``; the interval is left out when unknown."""
    if not math.isfinite(acc):
        return "–"
    if math.isfinite(low) and math.isfinite(high):
        return f"{acc:.3f} [{low:.3f}, {high:.3f}]"
    return f"{acc:.3f}"


def all_results(runs: list[RunData]) -> pd.DataFrame:
    """Every run's results.csv stacked, with a ``run`` column first."""
    frames = [run.results.assign(run=run.name) for run in runs]
    frame = pd.concat(frames, ignore_index=True)
    return frame[["run", *[c for c in frame.columns if c != "run"]]]


def _attack_order(frame: pd.DataFrame) -> list[str]:
    order = [a for a in frame["attack"].unique() if a != ANY]
    return order + ([ANY] if ANY in set(frame["attack"]) else [])


def accuracy_table(runs: list[RunData]) -> pd.DataFrame:
    """Robust accuracy with its 95% interval, one row per model × attack, one column per ε."""
    rows: list[dict[str, Any]] = []
    eps_all = sorted({float(e) for run in runs for e in run.results["eps"]})
    for run in runs:
        frame = run.results
        unreliable = unreliable_attacks(run.checks, run.settings, frame["attack"].unique())
        for model in frame["model"].unique():
            sub = frame[frame["model"] == model]
            for attack in _attack_order(sub):
                cells = sub[sub["attack"] == attack]
                row: dict[str, Any] = {
                    "model": model,
                    "attack": attack,
                    "norm": str(cells["norm"].iloc[0]),
                    "n": int(cells["n"].iloc[0]) if "n" in cells else "",
                }
                discredited = attack in unreliable
                for eps in eps_all:
                    row[f"ε={fmt_eps(eps)}"] = _accuracy_cell(
                        _at(cells, eps), marked=discredited and eps > 0)
                rows.append(row)
            rows += _certified_rows(run, str(model), eps_all)
    return pd.DataFrame(rows)


def _certified_rows(run: RunData, model: str, eps_all: list[float]) -> list[dict[str, Any]]:
    """The run's certified accuracy (``certified.csv``) as rows beside the attacks', one per
    bound, labelled ``certified (METHOD)``: the lower end where the attacks' are the upper."""
    certified = read_certified(run)
    if certified is None:
        return []
    rows = []
    for method in dict.fromkeys(certified["method"]):
        cells = certified[certified["method"] == method]
        row: dict[str, Any] = {"model": model, "attack": f"certified ({method})",
                               "norm": str(cells["norm"].iloc[0]) if "norm" in cells else "",
                               "n": int(cells["n"].iloc[0]) if "n" in cells else ""}
        for eps in eps_all:
            r = _at(cells, eps)
            row[f"ε={fmt_eps(eps)}"] = _accuracy_cell(r, marked=r is not None and str(
                r.get("unreliable", "") or "") not in ("", "nan"))
        rows.append(row)
    return rows


def _at(cells: pd.DataFrame, eps: float) -> pd.Series | None:
    """The row of ``cells`` at ``eps`` (None where nothing ran there)."""
    hit = cells[np.isclose(cells["eps"].astype(float), eps)]
    return None if hit.empty else hit.iloc[0]


def _accuracy_cell(r: pd.Series | None, marked: bool) -> str:
    """``accuracy [ci_low, ci_high]``, with the unreliable mark where ``marked``; empty for no
    row."""
    if r is None:
        return ""
    cell = fmt_interval(float(r["accuracy"]), float(r.get("ci_low", math.nan)),
                        float(r.get("ci_high", math.nan)))
    return cell + (f" {UNRELIABLE}" if marked else "")


def target_hit_table(runs: list[RunData]) -> pd.DataFrame:
    """The ``target_hit`` rate of each targeted attack, one column per ε (empty without one)."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        frame = run.results
        if TARGET_HIT not in frame.columns:
            continue
        targeted = frame[frame[TARGET_HIT].notna()]
        for (model, attack), cells in targeted.groupby(["model", "attack"], sort=False):
            row: dict[str, Any] = {"model": model, "attack": attack}
            for _, r in cells.sort_values("eps").iterrows():
                row[f"ε={fmt_eps(float(r['eps']))}"] = f"{float(r[TARGET_HIT]):.3f}"
            rows.append(row)
    return pd.DataFrame(rows)


def unreliable_notes(runs: list[RunData]) -> list[str]:
    """One line per run whose failing checks mark numbers of the accuracy table."""
    notes = []
    for run in runs:
        marked = unreliable_attacks(run.checks, run.settings, run.results["attack"].unique())
        if marked:
            reasons = "; ".join(sorted(set(marked.values())))
            notes.append(f"{run.name}: the numbers marked {UNRELIABLE} (attacks "
                         f"{', '.join(sorted(marked))}) may overstate robustness: {reasons}; "
                         "see Sanity checks.")
    return notes


def data_label(run: RunData) -> str:
    """The data a run was evaluated on: the data set and split, resize and content checksum
    when recorded (the built-in sets are md5-checked against the canonical files, so their
    name identifies them)."""
    s, m = run.settings, run.manifest
    label = f"{s.dataset or 'unknown data'} {s.split or 'test'} set"
    extras = [f"resized to {m.data_resize}"] if m.data_resize else []
    if m.data_sha256:
        extras.append(f"sha256 {m.data_sha256[:12]}")
    return f"{label} ({', '.join(extras)})" if extras else label


def evaluated_n(run: RunData) -> int | None:
    """How many images the run evaluated (``results.csv``'s ``n``, else the settings')."""
    if "n" in run.results.columns and len(run.results):
        return int(run.results["n"].max())
    return run.settings.n


def comparability_notes(runs: list[RunData]) -> list[str]:
    """What makes several runs' figures not comparable side by side: different data, or a
    different number n of images (the first n of the split, so other images and intervals of
    another width). One line each; none for a single run or runs on the same data and n."""
    if len(runs) < 2:
        return []
    notes = []
    data = {run.name: data_label(run) for run in runs}
    if len(set(data.values())) > 1:
        listed = "; ".join(f"{name}: {label}" for name, label in data.items())
        notes.append(f"These runs were evaluated on different data ({listed}): their figures "
                     "are not comparable with each other.")
    sizes = {run.name: evaluated_n(run) for run in runs}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {n if n is not None else 'unknown'}"
                           for name, n in sizes.items())
        notes.append(f"These runs were evaluated on different numbers of images ({listed}): "
                     "each figure holds for its own images, and a difference inside the 95% "
                     "intervals is no difference; compare runs of the same n.")
    return notes


def cost_table(runs: list[RunData]) -> pd.DataFrame:
    """Seconds and gradient evaluations per model × attack, summed over ε."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        source = run.timings if run.timings is not None else run.results
        if "grad_evals" not in source.columns or "model" not in source.columns:
            continue
        for (model, attack), cells in source.groupby(["model", "attack"], sort=False):
            if attack == ANY:
                continue
            row: dict[str, Any] = {
                "model": model,
                "attack": attack,
                "grad_evals": int(cells["grad_evals"].sum()),
            }
            if "seconds" in cells.columns:
                row["seconds"] = round(float(cells["seconds"].sum()), 2)
            rows.append(row)
    return pd.DataFrame(rows)


def strongest_attack(run: RunData) -> tuple[str, float] | None:
    """(attack, ε): the single attack with the lowest accuracy at the largest swept ε that has a
    per-sample prediction column; None without per_sample.csv."""
    if run.per_sample is None:
        return None
    columns = set(run.per_sample.columns)
    frame = run.results[
        run.results["attack"].isin(
            [
                a
                for a in run.results["attack"].unique()
                if a != ANY and {f"{a}_eps", f"{a}_pred"} <= columns
            ]
        )
    ]
    if frame.empty:
        return None
    eps_max = float(frame["eps"].max())
    at_max = frame[np.isclose(frame["eps"].astype(float), eps_max)]
    mean = frame.groupby("attack")["accuracy"].mean()
    best = min(
        at_max["attack"],
        key=lambda a: (
            float(at_max.loc[at_max["attack"] == a, "accuracy"].iloc[0]),
            float(mean[a]),
        ),
    )
    return str(best), eps_max


def predictions_at(run: RunData, attack: str, eps: float) -> pd.DataFrame:
    """Per sample: label and the prediction under ``attack`` at ``eps`` (the clean prediction
    when the sample was not broken at any ε' ≤ eps)."""
    assert run.per_sample is not None
    frame = run.per_sample
    broken = frame[f"{attack}_eps"].astype(float) <= eps + 1e-12
    pred = np.where(broken, frame[f"{attack}_pred"], frame["clean_pred"]).astype(int)
    return pd.DataFrame(
        {"index": frame["index"], "label": frame["label"].astype(int), "pred": pred}
    )


def confusion_table(run: RunData, attack: str, eps: float, classes: list[str]) -> pd.DataFrame:
    """Counts of true label (rows) → prediction under attack at ε (columns)."""
    preds = predictions_at(run, attack, eps)
    k = max(len(classes), int(preds["label"].max()) + 1, int(preds["pred"].max()) + 1)
    names = classes + [str(i) for i in range(len(classes), k)]
    matrix = np.zeros((k, k), dtype=int)
    np.add.at(matrix, (preds["label"].to_numpy(), preds["pred"].to_numpy()), 1)
    table = pd.DataFrame(matrix, index=pd.Index(names, name="label"), columns=names)
    return table


def top_flips(confusion: pd.DataFrame, limit: int = 8) -> pd.DataFrame:
    """The most frequent off-diagonal label → prediction pairs."""
    rows = []
    matrix = confusion.to_numpy(dtype=np.int64)
    total = matrix.sum(axis=1)
    for i, label in enumerate(confusion.index):
        for j, pred in enumerate(confusion.columns):
            count = int(matrix[i, j])
            if i != j and count > 0:
                share = count / total[i] if total[i] else 0.0
                rows.append(
                    {
                        "label": label,
                        "becomes": pred,
                        "samples": count,
                        "share of label": f"{share:.0%}",
                    }
                )
    rows.sort(key=lambda r: (-int(r["samples"]), str(r["label"]), str(r["becomes"])))
    return pd.DataFrame(rows[:limit], columns=["label", "becomes", "samples", "share of label"])


def checks_table(runs: list[RunData]) -> pd.DataFrame:
    """Every run's checks.csv stacked, with a ``run`` column first."""
    frames = [run.checks.assign(run=run.name) for run in runs if run.checks is not None]
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    return frame[["run", *[c for c in frame.columns if c != "run"]]]


def fmt_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}"
    return str(value)


def reference_table(runs: list[RunData]) -> pd.DataFrame:
    rows = []
    for run in runs:
        if run.reference is None:
            continue
        ref = run.reference
        rows.append(
            {
                "run": run.name,
                "source": fmt_value(ref.get("source", "")),
                "metric": fmt_value(ref.get("metric", "")),
                "reference": fmt_value(ref.get("value")),
                "ours": fmt_value(ref.get("ours")),
                **{
                    k: fmt_value(v)
                    for k, v in ref.items()
                    if k not in {"source", "metric", "value", "ours"}
                },
            }
        )
    return pd.DataFrame(rows)


def config_hash(run: RunData) -> str:
    """The resolved config's hash (as ``robustkit run`` computes it), else a hash of the file."""
    if run.manifest.config_hash is not None:
        return run.manifest.config_hash
    if run.config_text is None:
        return ""
    try:
        return resolved_hash(config_from_dict(tomllib.loads(run.config_text)))
    except (RobustkitError, tomllib.TOMLDecodeError, TypeError, ValueError):
        digest = hashlib.sha256(run.config_text.encode()).hexdigest()[:16]
        return f"{digest} (sha256 of config.toml)"


def _seconds(value: Any) -> str:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


PROVENANCE_KEYS = [
    ("robustkit", "robustkit version"),
    ("git_commit", "git commit"),
    ("torch", "torch"),
    ("numpy", "numpy"),
    ("python", "python"),
    ("device", "device"),
    ("allocator", "C allocator"),
    ("seed", "seed"),
    ("date", "date"),
    ("start", "start"),
    ("end", "end"),
    ("data_source", "data source"),
    ("data_size", "data size"),
    ("data_resize", "data resized to"),
    ("data_evaluated", "data evaluated"),
    ("data_sha256", "data sha256"),
    ("data_checksum", "data checksum"),
    ("weights_file", "weights file"),
    ("weights_sha256", "weights sha256"),
    ("sidecar_sha256", "sidecar sha256"),
]


def attack_titles(run: RunData) -> str:
    titles = [a for a in run.results["attack"].unique() if a != ANY]
    return ", ".join(titles)


def provenance(run: RunData) -> list[tuple[str, str]]:
    """(field, value) pairs that trace the run back to its code, data, settings and machine."""
    m, s = run.manifest.record, run.settings
    items: list[tuple[str, str]] = [("folder", str(run.path))]
    command = run.manifest.command_line or run.manifest.command
    if command:
        items.append(("command", command))
    for key, label in PROVENANCE_KEYS:  # whatever the manifest records of these, as written
        if m.get(key) is not None:
            items.append((label, str(m[key])))
    for key, label in (("evaluation_seconds", "evaluation time"), ("seconds", "training time")):
        if key in m:
            items.append((label, _seconds(m[key])))
    if run.timings is not None and "seconds" in run.timings.columns:
        items.append(("attack time (sum of cells)", _seconds(run.timings["seconds"].sum())))
    chash = config_hash(run)
    if chash:
        items.append(("config hash", chash))
    if run.manifest.fingerprint:
        items.append(("settings fingerprint", run.manifest.fingerprint))
    for key, value in (("model", s.model), ("dataset", s.dataset), ("split", s.split),
                       ("n", s.n), ("normalize", s.normalize)):
        if value not in (None, ""):
            items.append((key, str(value)))
    if s.eps is not None:
        items.append(("ε sweep", ", ".join(fmt_eps(e) for e in s.eps)))
    items.append(("attacks", attack_titles(run)))
    added = m.get("certified_added")
    if isinstance(added, dict):  # `robustkit certify --report` after the sweep
        items.append(("certified bounds added by",
                      f"{added.get('command_line')} (robustkit {added.get('robustkit')}, "
                      f"commit {str(added.get('git_commit'))[:12]}, {added.get('device')}, "
                      f"{added.get('date')})"))
    return items


def provenance_table(runs: list[RunData]) -> pd.DataFrame:
    rows = [{"run": run.name, "field": k, "value": v} for run in runs for k, v in provenance(run)]
    return pd.DataFrame(rows, columns=["run", "field", "value"])


def settings_text(run: RunData) -> str:
    return json.dumps(run.settings.record, indent=2, sort_keys=True, default=str)
