"""The report's sections, in report order; each returns a :class:`~robustkit.reporting.render.
Part` (the section, None when the runs have nothing for it, and the CSV tables it writes)."""

from __future__ import annotations

import pandas as pd

from robustkit.checks.verdicts import unreliable_attacks
from robustkit.records import Manifest
from robustkit.reporting import figures, tables
from robustkit.reporting.certified import certified_section, read_certified
from robustkit.reporting.examples import example_blocks, run_classes, safe_name
from robustkit.reporting.headline import headlines
from robustkit.reporting.load import RunData
from robustkit.reporting.physical import physical_section
from robustkit.reporting.render import (
    Block,
    Code,
    FigureBlock,
    Heading,
    Part,
    Section,
    Table,
    Text,
)
from robustkit.results import ANY


def summary(runs: list[RunData], results: pd.DataFrame) -> Part:
    """Robust accuracy with its intervals (table and figure), targets hit, unreliable
    numbers, the attacks' cost; tables ``accuracy``, ``cost``, ``results``."""
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
        FigureBlock(
            "accuracy.png",
            figures.accuracy_figure(results),
            "robust accuracy vs epsilon",
            "Robust accuracy vs ε, one line per model × attack; shaded: 95% intervals of "
            "test-set sampling around robust accuracy under these attacks (the true value can "
            "only be lower).",
        ),
        Table(accuracy),
    ]
    if accuracy["attack"].astype(str).str.startswith("certified (").any():
        blocks.append(Text("Rows “certified (bound)”: the fraction of samples that bound "
                           "propagation proves robust, a lower bound (“best”: per sample, any "
                           "bound's certificate); the true robust accuracy lies between them "
                           "and the attacks' (see Certified bounds)."))
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
    return Part(Section("summary", "Summary", blocks),
                {"accuracy": accuracy, "cost": cost, "results": results})


def certified(runs: list[RunData]) -> Part:
    """The bracket certified ≤ true ≤ attacked per ε, for runs with ``certified.csv``
    (:func:`~robustkit.reporting.certified.certified_section`)."""
    return Part(*certified_section(runs, safe_name))


def examples(runs: list[RunData]) -> Part:
    """Adversarial examples of each run (:func:`~robustkit.reporting.examples.example_blocks`)."""
    blocks: list[Block] = []
    for run in runs:
        found = example_blocks(run, run_classes(run), max_eps=3 if len(runs) == 1 else 2)
        if found and len(runs) > 1:
            blocks.append(Heading(run.name))
        blocks += [figure for _, figure in found]
    if not blocks:
        return Part(None)
    return Part(Section(
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
    ))


def physical(runs: list[RunData]) -> Part:
    """Physical-world robustness and preprocessing defences
    (:func:`~robustkit.reporting.physical.physical_section`)."""
    return physical_section(runs, safe_name)


def confusion(runs: list[RunData]) -> Part:
    """What the strongest attack at the largest ε turns each class into; tables
    ``confusion-<run>``."""
    blocks: list[Block] = []
    out: dict[str, pd.DataFrame] = {}
    for run in runs:
        choice = tables.strongest_attack(run)
        if choice is None:
            continue
        attack, eps = choice
        table = tables.confusion_table(run, attack, eps, run_classes(run))
        out[f"confusion-{safe_name(run.name)}"] = table
        title = f"{run.name}: {attack} at ε = {eps:g}"
        if len(runs) > 1:
            blocks.append(Heading(run.name))
        png = figures.confusion_figure(table, title)
        blocks.append(
            FigureBlock(
                f"confusion-{safe_name(run.name)}.png",
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
        return Part(None, out)
    return Part(Section(
        "confusion",
        "What the digits turn into",
        [
            Text(
                "Which class each sample is pushed to by the strongest attack at the largest ε "
                "(from per_sample.csv)."
            ),
            *blocks,
        ],
    ), out)


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


def _checkpoint_text(manifest: Manifest) -> str | None:
    """Which training epoch the evaluated checkpoint is and why it was chosen."""
    epoch, selected = manifest.checkpoint_epoch, manifest.checkpoint_selected_by
    if epoch is None or selected is None:
        return None
    return f"Evaluated checkpoint: epoch {epoch}, {SELECTION_TEXT.get(selected, selected)}."


#: metrics.csv columns renamed in the report's last-epoch table: ``lr`` is the rate after the
#: epoch's last step (0 at the end of a cosine schedule), not the one it trained with.
LAST_EPOCH_LABELS = {"lr": "lr at end"}


def training(runs: list[RunData]) -> Part:
    """Training curves and the last epoch of each run that has ``metrics.csv``."""
    blocks: list[Block] = []
    for run in runs:
        metrics = run.metrics
        if metrics is None or metrics.empty:
            continue
        if len(runs) > 1:
            blocks.append(Heading(run.name))
        blocks.append(
            FigureBlock(
                f"training-{safe_name(run.name)}.png",
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
    return Part(Section("training", "Training", blocks) if blocks else None)


#: What a report says for a run made with ``--checks off``, where a verdict would stand.
UNCHECKED = ("No sanity check ran (--checks off): nothing tested whether these numbers "
             "overstate robustness (masked gradients, an attack that has not converged, a "
             "random or batch-dependent model). Run again with --checks quick or full before "
             "relying on them.")
#: What a report says for a run made with ``--checks quick``.
QUICK_NOTE = ("Quick checks: every check that can discredit a number, at budgets scaled to "
              "the evaluation and reusing its per-sample outcomes; --checks full runs each "
              "check at its own, larger budget.")


def checks_level(run: RunData) -> str:
    """The checks level a run was made with (runs from before levels existed: full)."""
    return run.manifest.checks or "full"


def checks(runs: list[RunData]) -> Part:
    """The sanity checks' verdicts (or why none ran); table ``checks``."""
    frame = tables.checks_table(runs)
    unchecked = [run.name for run in runs if checks_level(run) == "off"]
    blocks: list[Block] = []
    if unchecked:
        named = f" ({', '.join(unchecked)})" if len(runs) > 1 else ""
        blocks.append(Text(UNCHECKED.replace("(--checks off)", f"(--checks off){named}")))
    if not frame.empty:
        shown = frame if len(runs) > 1 else frame.drop(columns=["run"])
        counts = frame["status"].value_counts()
        counted = ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("pass", "warn", "fail"))
        blocks.append(Text(
            f"Checks for gradient masking and mis-configured attacks (Carlini et al. 2019, "
            f"“On Evaluating Adversarial Robustness”): {counted}."))
        if any(checks_level(run) == "quick" for run in runs):
            blocks.append(Text(QUICK_NOTE))
        blocks.append(Table(shown, status_column="status"))
    section = Section("checks", "Sanity checks", blocks) if blocks else None
    return Part(section, {"checks": frame})


def reference(runs: list[RunData]) -> Part:
    """The published number each run reproduces, beside ours; table ``reference``."""
    frame = tables.reference_table(runs)
    if frame.empty:
        return Part(None, {"reference": frame})
    shown = frame if len(runs) > 1 else frame.drop(columns=["run"])
    return Part(Section(
        "reference",
        "Published reference",
        [Text("The published number this run reproduces, next to ours."), Table(shown)],
    ), {"reference": frame})


def provenance(runs: list[RunData]) -> Part:
    """Where each run comes from: code, data, machine, config and settings; table
    ``provenance``."""
    blocks: list[Block] = []
    for run in runs:
        if len(runs) > 1:
            blocks.append(Heading(run.name))
        items = tables.provenance(run)
        blocks.append(Table(pd.DataFrame(items, columns=["field", "value"])))
        if run.config_text is not None:
            blocks.append(Code(run.config_text, "toml", "resolved config (config.toml)"))
        if run.settings.record:
            blocks.append(
                Code(tables.settings_text(run), "json", "evaluation settings (settings.json)")
            )
        blocks += [Text(f"Note: {note}") for note in run.manifest.notes]
    return Part(Section("provenance", "Provenance", blocks),
                {"provenance": tables.provenance_table(runs)})


def problems(runs: list[RunData]) -> Part:
    """The files skipped as unreadable, by run."""
    found = [f"{run.name}: {p}" for run in runs for p in run.problems]
    return Part(Section("problems", "Files skipped", [Text(p) for p in found]) if found else None)


def headline(runs: list[RunData]) -> list[tuple[str, str]]:
    """(model, headline) for every model of every run: robust accuracy at the largest ε with
    its interval, the strongest attack, clean accuracy, the checks' verdict."""
    lines = []
    for run in runs:
        unreliable = unreliable_attacks(run.checks, run.settings, run.results["attack"].unique())
        lines += [(h.model, h.text())
                  for h in headlines(run.results, run.checks, checks_level(run), unreliable,
                                     read_certified(run))]
    return lines


def intro(runs: list[RunData]) -> list[str]:
    """One line per run: its models, data, samples, attacks and ε."""
    lines = []
    for run in runs:
        s = run.settings
        parts = [", ".join(run.models)]
        if s.dataset:
            parts.append(f"{s.dataset} {s.split or 'test'} set")
        n = s.n or (int(run.results["n"].iloc[0]) if "n" in run.results else None)
        if n:
            parts.append(f"{n} samples")
        parts.append(f"attacks {tables.attack_titles(run)}")
        eps = sorted({float(e) for e in run.results["eps"]})
        parts.append("ε ∈ {" + ", ".join(f"{e:g}" for e in eps) + "}")
        lines.append(" · ".join(parts))
    return lines
