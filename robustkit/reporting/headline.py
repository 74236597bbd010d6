"""The headline a report and the terminal open with, one line per model: robust accuracy at the
largest evaluated ε with its 95% interval, the strongest attack, clean accuracy, the certified
accuracy when certified bounds were computed, and the checks' verdict.

The robust figure is the per-sample worst case over the attacks (the ``any`` row) when there
is one, else the single attack's row (else the lowest row); the strongest attack is the single
attack with the lowest accuracy at that ε. The verdict counts the checks (``checks (quick):
…`` at the quick level), says ``no checks ran`` for a run made with ``--checks off`` (or one
without checks.csv), and the figure is marked ``unreliable`` when a failed check discredits the
attack behind it (:func:`robustkit.checks.unreliable_attacks`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pandas as pd

from robustkit.results import ANY

#: The verdict of a run made with ``--checks off``.
NO_CHECKS = "no checks ran (--checks off)"


@dataclass(frozen=True)
class Headline:
    """One model's headline figures."""

    model: str
    n: int | None
    eps: float
    norm: str
    robust: float
    ci: tuple[float, float] | None
    attacks: tuple[str, ...]  # the attacks behind the robust figure (several: the worst case)
    strongest: str
    clean: float | None
    verdict: str
    unreliable: str | None = None
    certified: tuple[float, str] | None = None  # the certified accuracy at eps, and by what

    def text(self) -> str:
        """``robust accuracy 89.79% [89.18%, 90.37%] at ε = 0.3 (worst case of fgsm,
        autoattack; strongest autoattack) · clean 98.73% · checks: 11 pass, 0 warn, 0 fail``"""
        interval = f" [{self.ci[0]:.2%}, {self.ci[1]:.2%}]" if self.ci else ""
        norm = "" if self.norm in ("linf", "mixed") else f" ({self.norm})"
        how = (f"worst case of {', '.join(self.attacks)}; strongest {self.strongest}"
               if len(self.attacks) > 1 else f"under {self.strongest}")
        parts = [f"robust accuracy {self.robust:.2%}{interval} at ε = {self.eps:g}{norm} "
                 f"({how})"]
        if self.unreliable:
            parts[0] += f", unreliable: {self.unreliable}"
        if self.certified is not None:
            parts.append(f"certified {self.certified[0]:.2%} ({self.certified[1]})")
        if self.clean is not None:
            parts.append(f"clean {self.clean:.2%}")
        if self.n is not None:
            parts.append(f"{self.n} images")
        parts.append(self.verdict)
        return " · ".join(parts)


def verdict(checks: pd.DataFrame | None, level: str) -> str:
    """``checks: 8 pass, 1 warn, 0 fail`` (``checks (quick): …`` at the quick level); ``no
    checks ran`` when the level is off or no check was recorded."""
    if level == "off":
        return NO_CHECKS
    if checks is None or checks.empty or "status" not in checks:
        return "no checks ran"
    counts = {s: int((checks["status"] == s).sum()) for s in ("pass", "warn", "fail")}
    head = "checks" if level == "full" else f"checks ({level})"
    return f"{head}: {counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail"


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _interval(row: pd.Series) -> tuple[float, float] | None:
    low, high = _number(row.get("ci_low")), _number(row.get("ci_high"))
    return (low, high) if low is not None and high is not None else None


def model_headline(results: pd.DataFrame, verdict_text: str,
                   unreliable: dict[str, str] | None = None) -> Headline | None:
    """The headline of one model's results (``results.csv`` rows); None without rows at an
    ε above 0."""
    eps_all = results["eps"].astype(float)
    if results.empty or float(eps_all.max()) <= 0:
        return None
    top = float(eps_all.max())
    at_top = results[eps_all.sub(top).abs() < 1e-12]
    singles = at_top[at_top["attack"] != ANY]
    worst = at_top[at_top["attack"] == ANY]
    row = (worst if not worst.empty else at_top).sort_values("accuracy").iloc[0]
    strongest = str((singles if not singles.empty else at_top).sort_values(
        "accuracy", kind="stable").iloc[0]["attack"])
    clean_rows = results[eps_all == 0]
    clean_any = clean_rows[clean_rows["attack"] == ANY]
    clean = (clean_any if not clean_any.empty else clean_rows)["accuracy"]
    n = _number(row.get("n"))
    robust = float(row["accuracy"])
    reason = (unreliable or {}).get(str(row["attack"])) if robust > 0 else None  # 0 is exact
    return Headline(
        model=str(row["model"]), n=int(n) if n is not None else None, eps=top,
        norm=str(row.get("norm", "linf")), robust=robust, ci=_interval(row),
        attacks=tuple(str(a) for a in singles["attack"]) or (strongest,), strongest=strongest,
        clean=float(clean.min()) if not clean.empty else None, verdict=verdict_text,
        unreliable=reason)


def headlines(results: pd.DataFrame, checks: pd.DataFrame | None, level: str,
              unreliable: dict[str, str] | None = None,
              certified: pd.DataFrame | None = None) -> list[Headline]:
    """One headline per model in ``results`` (a run folder's results.csv), with the checks'
    verdict at ``level`` (``full``, ``quick`` or ``off``) and, given ``certified`` (the run's
    ``certified.csv``), the certified accuracy at the same ε."""
    text = verdict(checks, level)
    found = [model_headline(results[results["model"] == m], text, unreliable)
             for m in results["model"].unique()]
    return [dataclasses.replace(h, certified=certified_at(certified, h.eps))
            for h in found if h is not None]


def certified_at(certified: pd.DataFrame | None, eps: float) -> tuple[float, str] | None:
    """The best certified accuracy at ``eps`` in a ``certified.csv`` frame, and the method
    (``best`` of several: per sample, any method's certificate)."""
    if certified is None or certified.empty:
        return None
    rows = certified[(certified["eps"].astype(float) - eps).abs() < 1e-12]
    if rows.empty:
        return None
    top = rows.sort_values("accuracy", kind="stable").iloc[-1]
    return float(top["accuracy"]), str(top["method"])
