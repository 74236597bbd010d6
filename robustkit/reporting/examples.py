"""Which adversarial examples a report shows, and their figures.

For each run: the strongest attack with stored images (lowest mean accuracy), at most a few ε
(the first at which a sample flips, one half-way, the largest), and at each ε at most a few
samples whose picture was made there (broken ones first, then the largest perturbation), each
shown clean, as its perturbation and adversarial, with the predictions (from stored
probabilities, else ``per_sample.csv``, else labels only).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from robustkit.dataset_specs import DATASETS
from robustkit.reporting import figures
from robustkit.reporting.load import RunData
from robustkit.reporting.render import FigureBlock


def safe_name(name: str) -> str:
    """``name`` as a file-name part: runs of other characters than ``A-Za-z0-9._-`` as ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def run_classes(run: RunData) -> list[str]:
    """The class names of ``run``: the built-in data set's, else those its settings record,
    else ``0`` … ``9``."""
    spec = DATASETS.get(run.settings.dataset or "")
    if spec:
        return list(spec.classes)
    named = run.settings.classes
    return list(named) if named is not None else [str(i) for i in range(10)]


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
    name = f"examples-{safe_name(run_name)}-{safe_name(attack)}-eps{eps:g}.png"
    caption = _example_caption(run_name, attack, eps, ex)
    alt = f"{attack} examples at ε={eps:g}: " + "; ".join(
        f"{row.clean_text} → {row.adv_text}" for row in rows
    )
    return FigureBlock(name, png, alt, caption)


def example_blocks(
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
