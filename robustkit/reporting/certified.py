"""The report section "Certified bounds": the bracket certified ≤ true robust accuracy ≤
attacked, per ε.

Reads ``certified.csv`` (written by :class:`robustkit.stages.CertifiedBounds`) beside the
run's ``results.csv``. The attacked figure is the per-sample worst case over the attacks (the
``any`` row, else the single attack's); the certified figure is the best bound's (``best`` of
several). True robust accuracy under every perturbation in the ball lies between them: the
attacks found examples for everything above the attacked figure's complement, and the bounds
prove the certified samples robust. The width of the bracket is what neither side knows.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from matplotlib.figure import Figure

from robustkit.reporting.figures import to_png
from robustkit.reporting.load import RunData
from robustkit.reporting.render import Block, FigureBlock, Heading, Section, Table, Text
from robustkit.results import ANY

CSV = "certified.csv"
#: Below this certified accuracy at every ε > 0, a model has no useful certificate.
USEFUL = 0.01

MEANING = Text(
    "Attacks give an upper bound on robust accuracy: a stronger attack could only lower it. "
    "Certified bounds give a lower bound: a certified sample's margins are proven positive "
    "over the whole ε-ball (clipped to [0, 1]) by bound propagation (IBP: intervals pushed "
    "through the layers; CROWN: linear bounds built backwards; CROWN-IBP: CROWN for the last "
    "layer over IBP's intermediate bounds), so no attack, known or not, can change its "
    "prediction. The true robust accuracy lies in the bracket between them.")


def read_certified(run: RunData) -> pd.DataFrame | None:
    """The run's ``certified.csv``, None when it has none (or an unreadable one)."""
    path = run.files / CSV
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        run.problems.append(f"{CSV} skipped: not a readable CSV")
        return None
    if not {"method", "eps", "accuracy"} <= set(frame.columns):
        run.problems.append(f"{CSV} skipped: it lacks the columns method, eps and accuracy")
        return None
    return frame


def bracket(results: pd.DataFrame, certified: pd.DataFrame) -> pd.DataFrame:
    """Per ε of the certification: the certified accuracy (the best bound), the attacked one
    (the worst case over the attacks), and the gap between them in percentage points."""
    best = certified.sort_values("accuracy", kind="stable").groupby("eps").tail(1)
    worst = results[results["attack"] == ANY] if (results["attack"] == ANY).any() else results
    attacked = worst.groupby("eps")["accuracy"].min()
    rows = []
    for _, row in best.sort_values("eps").iterrows():
        eps = float(row["eps"])
        if eps not in attacked.index:
            continue
        upper = float(attacked[eps])
        rows.append({"eps": eps, "certified": float(row["accuracy"]),
                     "bound": str(row["method"]), "attacked": upper,
                     "gap (points)": round(100 * (upper - float(row["accuracy"])), 2)})
    return pd.DataFrame(rows, columns=["eps", "certified", "bound", "attacked", "gap (points)"])


def bracket_figure(frame: pd.DataFrame, title: str) -> bytes:
    """One band from certified to attacked accuracy against ε, the gap written on it."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    eps = frame["eps"].to_numpy()
    ax.fill_between(eps, frame["certified"], frame["attacked"], color="tab:blue", alpha=0.25,
                    label="true robust accuracy lies here", linewidth=0)
    ax.plot(eps, frame["attacked"], "o-", color="tab:red", label="attacked (upper bound)")
    ax.plot(eps, frame["certified"], "s-", color="tab:blue", label="certified (lower bound)")
    for _, row in frame[frame["eps"] > 0].iterrows():
        ax.annotate(f"{row['gap (points)']:g} pts", (row["eps"], row["attacked"]),
                    xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xlabel("ε (L∞, pixel units)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def certified_section(runs: list[RunData], safe: Callable[[str], str]
                      ) -> tuple[Section | None, dict[str, pd.DataFrame]]:
    """The section and its tables (``certified-<run>``) for the runs with certified bounds."""
    blocks: list[Block] = []
    tables: dict[str, pd.DataFrame] = {}
    for run in runs:
        certified = read_certified(run)
        if certified is None:
            continue
        frame = bracket(run.results, certified)
        if len(runs) > 1:
            blocks.append(Heading(run.name))
        blocks += _run_blocks(run.name, frame, certified, safe(run.name))
        tables[f"certified-{safe(run.name)}"] = frame
    if not blocks:
        return None, tables
    return Section("certified", "Certified bounds", [MEANING, *blocks]), tables


def _run_blocks(name: str, frame: pd.DataFrame, certified: pd.DataFrame, safe_name: str
                ) -> list[Block]:
    blocks: list[Block] = []
    attacked_eps = frame[frame["eps"] > 0]
    if not attacked_eps.empty and attacked_eps["certified"].max() < USEFUL:
        methods = ", ".join(sorted(set(certified["method"]) - {"best"}))
        blocks.append(Text(
            f"No useful certificate: {methods} certif{'ies' if ',' not in methods else 'y'} "
            f"below {USEFUL:.0%} of the samples at every ε above 0. Bound propagation is loose "
            "on networks not trained for it (a PGD-trained network is robust in fact but not "
            "provably); certified training (train.method = \"ibp\" or \"crown-ibp\") makes "
            "networks whose robustness the bounds can prove."))
    if "unreliable" in certified.columns and certified["unreliable"].fillna("").astype(bool).any():
        blocks.append(Text("Unreliable: a sample certified at some ε was broken by an attack "
                           "there (the check certified_not_broken failed): a bound or an attack "
                           "is wrong, and neither number can be trusted."))
    shown = frame.assign(certified=frame["certified"].map("{:.2%}".format),
                         attacked=frame["attacked"].map("{:.2%}".format))
    blocks.append(Table(shown, "Certified ≤ true robust accuracy ≤ attacked, per ε (gap: "
                               "attacked − certified, in percentage points)."))
    if len(frame) > 1:
        blocks.append(FigureBlock(f"certified-{safe_name}.png",
                                  bracket_figure(frame, f"{name}: the bracket"),
                                  "certified and attacked accuracy vs epsilon",
                                  "Shaded: where the true robust accuracy lies."))
    by_method = certified.pivot_table(index="eps", columns="method", values="accuracy",
                                      sort=False).reset_index()
    blocks.append(Table(by_method, "Certified accuracy by bound (best: per sample, any bound's "
                                   "certificate)."))
    return blocks
