"""Reports of evaluation runs: one self-contained HTML file, Markdown with PNG figures, and CSV
tables, built from run folders alone (no model needed).

    from robustkit.reporting import build_report
    build_report([Path("runs/attack-mnist_cnn")], Path("reports/mnist_cnn"))
"""

from __future__ import annotations

from robustkit.reporting.build import build_report
from robustkit.reporting.load import RunData, load_run
from robustkit.reporting.probabilities import add_probabilities

__all__ = ["RunData", "add_probabilities", "build_report", "load_run"]
