"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state) and
returned as small PNG bytes (dpi 100, no timestamp metadata, so rebuilt reports diff cleanly)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from robustkit.results import ANY

DPI = 100
# ":" is kept for the worst case, ANY
LINESTYLES: list[Literal["-", "--", "-.", ":"]] = ["-", "--", "-.", ":"]
#: An attack's marker on a several-model chart (the worst case, ANY, keeps a hollow circle):
#: what tells the attacks apart where a series is only points.
MARKERS = ["o", "s", "^", "D", "v", "P"]
#: A series measured at fewer ε than this is drawn as points, not a line.
LINE_MIN_POINTS = 3


def to_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def accuracy_figure(results: pd.DataFrame) -> bytes:
    """Robust accuracy vs ε with 95% intervals (bands, or bars on isolated points), one
    series per model × attack.

    One model: a colour per attack. Several: a colour per model and a line style per attack,
    with a two-part legend (models, then attacks) beside the axes so it never hides a curve.
    The per-sample worst case ("any") is dotted, without a band. A series measured at fewer
    than three ε is drawn as points only: a straight line between two far-apart budgets would
    claim accuracies that were never measured.
    """
    models = list(results["model"].unique())
    attacks = _attack_order(results)
    several = len(models) > 1
    fig = Figure(figsize=(8.4, 4.2) if several else (6.4, 3.8))
    ax = fig.add_subplot()
    lines: set[str] = set()  # the attacks drawn as a line for at least one model
    for mi, model in enumerate(models):
        for ai, attack in enumerate(attacks):
            rows = results[(results["model"] == model) & (results["attack"] == attack)]
            if rows.empty:
                continue
            color, style = _series_style(mi, ai, attack, several)
            marker = _attack_marker(ai, attack) if several else "o"
            _plot_series(ax, rows.sort_values("eps"), attack, color, style,
                         _series_label(model, attack, several), marker)
            if len(rows) >= LINE_MIN_POINTS:
                lines.add(attack)
    _label_axes(ax)
    if several:
        ax.legend(handles=_legend_handles(models, attacks, lines), fontsize=7, frameon=False,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), handlelength=3)
    else:
        ax.legend(fontsize=8, loc="best", frameon=False)
    fig.tight_layout()
    return to_png(fig)


def _attack_order(results: pd.DataFrame) -> list[str]:
    """The attacks in order of first appearance, the worst case ("any") last."""
    attacks = list(dict.fromkeys(a for a in results["attack"] if a != ANY))
    if ANY in set(results["attack"]):
        attacks.append(ANY)
    return attacks


def _series_label(model: str, attack: str, several: bool) -> str:
    """Legend label of a series: ``model · attack`` with several models, else the attack."""
    if several:
        return f"{model} · {attack}"
    return "any (worst case)" if attack == ANY else attack


def _marker_size(attack: str, sparse: bool) -> int:
    """Points stand out more on a sparse series; the worst case ("any") has smaller ones."""
    if attack == ANY:
        return 4 if sparse else 2
    return 5 if sparse else 3


def _plot_series(ax: Axes, rows: pd.DataFrame, attack: str, color: str, style: str,
                 label: str, marker: str = "o") -> None:
    """One series (``rows`` sorted by ε): a line, or points only when measured at fewer than
    three ε; then its 95% interval (a band, or error bars on points), except for "any" or
    results without intervals."""
    eps = rows["eps"].to_numpy(float)
    sparse = len(rows) < LINE_MIN_POINTS
    ax.plot(
        eps,
        rows["accuracy"].to_numpy(float),
        linestyle="none" if sparse else style,
        color=color,
        marker=marker,
        markersize=_marker_size(attack, sparse),
        markerfacecolor="none" if attack == ANY else color,
        linewidth=1.2 if attack == ANY else 1.6,
        label=label,
    )
    if attack == ANY or not {"ci_low", "ci_high"} <= set(rows.columns):
        return
    acc, low, high = (rows[c].to_numpy(float) for c in ("accuracy", "ci_low", "ci_high"))
    if sparse:  # the interval as error bars on the points
        ax.errorbar(eps, acc, yerr=[acc - low, high - acc], fmt="none", ecolor=color,
                    capsize=3, linewidth=1)
    else:
        ax.fill_between(eps, low, high, color=color, alpha=0.15, linewidth=0)


def _label_axes(ax: Axes) -> None:
    """Axis labels, the accuracy range [0, 1] with a margin, grid and title."""
    ax.set_xlabel("ε (pixel units)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title("Robust accuracy vs ε (95% Wilson intervals)", fontsize=10)


def _series_style(model_index: int, attack_index: int, attack: str, several: bool
                  ) -> tuple[str, str]:
    """(colour, line style) of one model × attack series."""
    if not several:
        return ("black", ":") if attack == ANY else (f"C{attack_index % 10}", "-")
    return f"C{model_index % 10}", _attack_linestyle(attack_index, attack)


def _attack_linestyle(attack_index: int, attack: str) -> Literal["-", "--", "-.", ":"]:
    """Line style of an attack on a several-model chart; dotted is kept for "any"."""
    return ":" if attack == ANY else LINESTYLES[attack_index % (len(LINESTYLES) - 1)]


def _attack_marker(attack_index: int, attack: str) -> str:
    """Marker of an attack on a several-model chart; the worst case ("any") keeps the circle
    (drawn hollow)."""
    return "o" if attack == ANY else MARKERS[attack_index % len(MARKERS)]


def _legend_handles(models: Sequence[str], attacks: Sequence[str],
                    lines: set[str] | None = None) -> list[Line2D]:
    """Colour = model, line style and marker = attack: one entry per model and per attack,
    not per pair. An attack drawn as points only (``lines``, the attacks drawn as a line
    somewhere: all when None, none on a chart of two ε) shows its marker without a line."""
    points_only = lines is not None and not lines  # models as colour squares, not lines
    handles = [Line2D([], [], color=f"C{i % 10}", label=model,
                      **({"linestyle": "none", "marker": "s", "markersize": 7} if points_only
                         else {"linewidth": 2.5}))
               for i, model in enumerate(models)]
    handles += [Line2D([], [], color="0.35", marker=_attack_marker(i, attack), markersize=4,
                       markerfacecolor="none" if attack == ANY else "0.35",
                       linestyle=_attack_linestyle(i, attack)
                       if lines is None or attack in lines else "none",
                       label="any (worst case)" if attack == ANY else attack)
                for i, attack in enumerate(attacks)]
    return handles


@dataclass(frozen=True)
class Panel:
    """One row of an adversarial-example figure."""

    clean: np.ndarray  # [H, W] (grey) or [H, W, 3] (colour) in [0, 1]
    adv: np.ndarray
    clean_text: str
    adv_text: str
    flipped: bool


def perturbation_size(delta: np.ndarray, norm: str) -> float:
    """``‖δ‖`` in ``norm`` (L∞, L1, else L2)."""
    flat = np.abs(delta.astype(np.float64)).ravel()
    if norm == "linf":
        return float(flat.max())
    return float(flat.sum()) if norm == "l1" else float(np.sqrt((flat**2).sum()))


def example_figure(rows: Sequence[Panel], eps: float, norm: str, attack: str) -> bytes:
    """Rows of  clean  +  k·δ  =  adversarial, after Goodfellow et al.'s panda figure.

    The perturbation ``δ = x_adv − x`` is drawn as ``δ/ε`` on a diverging map over [−1, 1], that
    is magnified ``×(1/ε)``; red pixels were brightened, blue ones darkened. Colour images show
    the perturbation per channel as ``0.5 + δ/(2ε)``: grey is unchanged, a tint is the channel
    pushed up.
    """
    n = len(rows)
    fig = Figure(figsize=(5.6, 1.95 * n + 0.35))
    grid = fig.add_gridspec(n, 5, width_ratios=[1, 0.22, 1, 0.22, 1], wspace=0.05, hspace=0.45)
    # δ/ε on [−1, 1]; an L1 perturbation's pixels move by up to 1 whatever ε, so δ itself
    scale = 1.0 / eps if eps > 0 and norm != "l1" else 1.0
    for r, row in enumerate(rows):
        delta = row.adv - row.clean
        size = perturbation_size(delta, norm)
        axes = {c: fig.add_subplot(grid[r, c]) for c in (0, 2, 4)}
        colour = row.clean.ndim == 3
        pixels = {"interpolation": "nearest"} if colour else {
            "cmap": "gray", "vmin": 0, "vmax": 1, "interpolation": "nearest"}
        axes[0].imshow(np.clip(row.clean, 0, 1), **pixels)
        axes[0].set_title(row.clean_text, fontsize=9)
        if colour:  # each channel's δ/ε on [−1, 1] shown as 0.5 + δ/(2ε): grey = unchanged
            axes[2].imshow(0.5 + 0.5 * np.clip(delta * scale, -1, 1), interpolation="nearest")
        else:
            axes[2].imshow(np.clip(delta * scale, -1, 1), cmap="RdBu_r", vmin=-1, vmax=1,
                           interpolation="nearest")
        symbol = {"linf": "∞", "l1": "₁"}.get(norm, "₂")
        axes[2].set_title(f"δ ×{scale:.3g}  (‖δ‖{symbol}={size:.3f})", fontsize=9)
        axes[4].imshow(np.clip(row.adv, 0, 1), **pixels)
        axes[4].set_title(row.adv_text, fontsize=9, color="#b2182b" if row.flipped else "black")
        for ax in axes.values():
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{attack} at ε = {eps:g}", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.55 / fig.get_figheight(), bottom=0.02)
    for r in range(n):  # the "+" and "=" between the panels, placed once the layout is final
        for c, text in ((1, "+"), (3, "=")):
            box = grid[r, c].get_position(fig)
            fig.text(
                (box.x0 + box.x1) / 2,
                (box.y0 + box.y1) / 2,
                text,
                fontsize=18,
                ha="center",
                va="center",
            )
    return to_png(fig)


def confusion_figure(table: pd.DataFrame, title: str) -> bytes:
    """Heatmap of label (rows) → prediction under attack (columns), counts annotated; the
    diagonal holds the samples that kept their label."""
    matrix = table.to_numpy()
    k = matrix.shape[0]
    side = 3.2 + 0.2 * k
    fig = Figure(figsize=(side, side * 0.9))
    ax = fig.add_subplot()
    shown = np.log1p(matrix)
    image = ax.imshow(shown, cmap="Blues", interpolation="nearest")
    top = shown.max() if shown.size else 0
    for i in range(k):
        for j in range(k):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if shown[i, j] > 0.6 * top else "black",
                )
    labels = [str(c) for c in table.columns]
    ax.set_xticks(
        range(k),
        labels,
        fontsize=8,
        rotation=45 if max(map(len, labels)) > 2 else 0,
        ha="right" if max(map(len, labels)) > 2 else "center",
    )
    ax.set_yticks(range(k), [str(c) for c in table.index], fontsize=8)
    ax.set_xlabel("prediction under attack")
    ax.set_ylabel("true label")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="log(1 + count)")
    fig.tight_layout()
    return to_png(fig)


def training_figure(metrics: pd.DataFrame) -> bytes:
    """Loss and accuracies per epoch from metrics.csv (whichever columns it has), as PNG."""
    return to_png(training_axes(metrics))


def _epoch_axis(ax: Axes, epoch: np.ndarray) -> None:
    """Whole epochs on the x axis: each epoch a tick when there are few (one epoch: its
    tick alone, centred), else integer ticks; never fractions of an epoch."""
    ax.set_xlabel("epoch")
    if len(epoch) == 0:
        return
    if len(epoch) <= 12:
        ax.set_xticks(epoch)
        ax.set_xticklabels([f"{e:g}" for e in epoch])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epoch) == 1:
        ax.set_xlim(epoch[0] - 0.5, epoch[0] + 0.5)


def training_axes(metrics: pd.DataFrame) -> Figure:
    """The training figure: loss (left) and accuracies (right) per epoch."""
    fig = Figure(figsize=(7.2, 2.9))
    loss_ax, acc_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    epoch = metrics["epoch"].to_numpy(float) if "epoch" in metrics else np.arange(len(metrics))
    for column in [c for c in metrics.columns if c.endswith("loss")]:
        loss_ax.plot(epoch, metrics[column].to_numpy(float), marker="o", markersize=3, label=column)
    accuracies = [
        c for c in ("train_acc", "val_acc", "test_acc", "val_robust_acc") if c in metrics.columns
    ]
    accuracies += [c for c in metrics.columns if c.endswith("_acc") and c not in accuracies]
    for column in accuracies:
        values = metrics[column].to_numpy(float)
        if np.isfinite(values).any():
            acc_ax.plot(epoch, values, marker="o", markersize=3, label=column)
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        _epoch_axis(ax, epoch)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
