"""What the CLI prints after a sweep, and the ``robustkit attack --json`` document.

The jobs (:mod:`robustkit.jobs`) hand each evaluated model's :class:`SweepOutcome` to a
``show`` callback; the CLI's is :func:`sweep_lines` printed to stdout."""

from __future__ import annotations

from typing import Any

import pandas as pd

from robustkit.checks import UNRELIABLE
from robustkit.config import config_from_dict
from robustkit.jobs.outcome import AttackOutcome, SweepOutcome
from robustkit.reporting.headline import headlines, verdict
from robustkit.results import UNRELIABLE_COLUMN, result_types
from robustkit.vocabulary import ChecksLevel

#: Where a check that did not pass is explained, with what to do.
CHECKS_DOC = "what each check means and what to do: docs/checks.md in robustkit's source"
#: What a run without checks says wherever a verdict would stand.
NO_CHECKS = ("checks: none ran (--checks off): nothing tested whether these numbers overstate "
             "robustness; run with --checks quick or full before relying on them")


def sweep_lines(outcome: SweepOutcome) -> list[str]:
    """The headline, the accuracy table with its caption, the sweep's notes and the checks'
    verdict of one evaluated model."""
    results = outcome.evaluation.results
    lines = [f"{h.model}: {h.text()}" for h in headlines(
        results, outcome.checks, outcome.level, outcome.unreliable, outcome.certified)]
    lines += [f"{outcome.caption}:", accuracy_table(results, outcome.unreliable)]
    if outcome.certified is not None:
        lines += ["certified accuracy (a lower bound: no attack within ε changes these):",
                  certified_table(outcome.certified)]
    lines += [f"note: {note}" for note in outcome.evaluation.notes]
    return lines + verdict_lines(outcome.checks, outcome.level)


def accuracy_table(results: pd.DataFrame, unreliable: dict[str, str] | None = None) -> str:
    """Accuracy vs ε, one column per attack, as text; the numbers at ε > 0 of the attacks in
    ``unreliable`` (title → reason, from :func:`robustkit.checks.unreliable_attacks`) carry a
    mark, explained below the table."""
    table = results.pivot_table(index="eps", columns="attack", values="accuracy", sort=False)
    if not unreliable:
        return str(table.to_string(float_format=lambda v: f"{v:.4f}"))
    text = table.apply(lambda column: [
        f"{v:.4f}" + (f" {UNRELIABLE}" if column.name in unreliable and eps > 0 else "")
        for eps, v in column.items()])
    reasons = sorted(set(unreliable.values()))
    return str(text.to_string()) + f"\n{UNRELIABLE}: {'; '.join(reasons)} (see checks.csv)"


def certified_table(certified: pd.DataFrame) -> str:
    """Certified accuracy vs ε, one column per bound (``best``: any bound's certificate)."""
    table = certified.pivot_table(index="eps", columns="method", values="accuracy", sort=False)
    return str(table.to_string(float_format=lambda v: f"{v:.4f}"))


def verdict_lines(checks: pd.DataFrame | None, level: ChecksLevel = "full") -> list[str]:
    """``checks: 8 pass, 1 warn, 0 fail`` (``checks (quick): …`` at the quick level) and one
    line per check that did not pass; :data:`NO_CHECKS` when the level is off."""
    if level == "off":
        return [NO_CHECKS]
    if checks is None or len(checks) == 0:
        return []
    lines = [verdict(checks, level)]
    for _, row in checks[checks["status"] != "pass"].iterrows():
        lines.append(f"  {row['status']}: {row['name']}: {row['detail']}")
    if len(lines) > 1:
        lines.append(f"  {CHECKS_DOC}")
    return lines


def seed_summary_lines(summary: pd.DataFrame) -> list[str]:
    """Mean ± sd over the seeds of a run, per attack and ε (``seed_summary.csv``, from
    :func:`robustkit.jobs.run.seed_summary`)."""
    return ["mean ± sd over seeds:"] + [
        f"  {r['attack']:>12}  ε={r['eps']:<5g} {r['mean']:.4f} ± {r['sd']:.4f}"
        for _, r in summary.iterrows()]


def attack_summary(outcome: AttackOutcome) -> dict[str, Any]:
    """The ``robustkit attack --json`` document (see ``ATTACK_JSON_FIELDS`` in the tests)."""
    results = outcome.evaluation.results
    columns = {c: kind for c, kind in result_types().items() if c != "model"}
    rows = [{**{c: kind(r[c]) for c, kind in columns.items()},
             UNRELIABLE_COLUMN: r.get(UNRELIABLE_COLUMN) or None} for _, r in results.iterrows()]
    checks = [] if outcome.checks is None else [
        {"name": str(c["name"]), "status": str(c["status"]),
         "value": None if c["value"] is None or c["value"] != c["value"] else float(c["value"]),
         "threshold": str(c["threshold"]), "detail": str(c["detail"])}
        for _, c in outcome.checks.iterrows()]
    counts = {status: sum(c["status"] == status for c in checks)
              for status in ("pass", "warn", "fail")}
    s = outcome.settings
    return {"model": outcome.model, "model_spec": s["model"], "dataset": s["dataset"],
            "split": s["split"], "n": s["n"], "eps": s["eps"],
            "attacks": [a.get("label") or _title(a) for a in s["attacks"]],
            "results": rows, "checks_level": outcome.checks_level, "checks": checks,
            "checks_summary": counts,
            "warnings": list(outcome.warnings), "outputs": dict(outcome.outputs)}


def _title(attack: dict[str, Any]) -> str:
    return config_from_dict({"attacks": [attack]}).attacks[0].title
