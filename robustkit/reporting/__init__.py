"""Reports of evaluation runs: one self-contained HTML file, Markdown with PNG figures, and CSV
tables, built from run folders alone (no model needed).

    from robustkit.reporting import build_report
    build_report([Path("runs/attack-mnist_cnn")], Path("reports/mnist_cnn"))
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

#: Public name → its module, imported on first use (PEP 562): building a report loads no
#: torch; storing probabilities (:func:`add_probabilities`, which runs the model) does.
_EXPORTS = {
    "RunData": "robustkit.reporting.load",
    "add_probabilities": "robustkit.reporting.probabilities",
    "build_report": "robustkit.reporting.build",
    "load_run": "robustkit.reporting.load",
}

__all__ = ["RunData", "add_probabilities", "build_report", "load_run"]

if TYPE_CHECKING:
    from robustkit.reporting.build import build_report
    from robustkit.reporting.load import RunData, load_run
    from robustkit.reporting.probabilities import add_probabilities


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'robustkit.reporting' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
