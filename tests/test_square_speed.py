"""benchmarks/square_speed.py runs end to end (--quick) against a stand-in for the authors'
package, and says so when their package is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_thread")

#: A stand-in for ``autoattack/square.py``: the same constructor, ``n_queries`` forward passes
#: over the batch, the clean images returned (nothing broken).
STUB = '''
import torch


class SquareAttack:
    def __init__(self, predict, norm="Linf", n_queries=5000, eps=None, p_init=0.8,
                 n_restarts=1, seed=0, verbose=False, targeted=False, loss="margin",
                 resc_schedule=True, device=None):
        assert resc_schedule is False and norm == "Linf" and p_init == 0.8
        self.predict, self.n_queries = predict, n_queries

    def perturb(self, x, y):
        for _ in range(self.n_queries):
            self.predict(x)
        return x.clone()
'''


def test_square_speed_quick_writes_rows(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    (tmp_path / "autoattack").mkdir()
    (tmp_path / "autoattack" / "__init__.py").write_text("")
    (tmp_path / "autoattack" / "square.py").write_text(STUB)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import square_speed as bench

    out = tmp_path / "rows.json"
    assert bench.main(["--quick", "--authors-src", str(tmp_path), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio rk/auth" in printed and "unrescaled schedule" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [row["n"] for row in rows] == [2, 4]
    for row in rows:
        stub, ours = row["authors"], row["robustkit"]
        assert stub["forwards"] == 20 * row["n"]  # the stand-in's 20 passes over the batch
        assert stub["robust_accuracy"] == 1.0  # it returns the clean images
        # robustkit: the clean pass, then at most 20 queries per sample
        assert row["n"] < ours["forwards"] <= 21 * row["n"]
        assert row["ratio"] == pytest.approx(ours["s_per_query"] / stub["s_per_query"])


def test_square_speed_skips_without_the_authors_code(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import square_speed as bench

    assert bench.main(["--quick", "--authors-src", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("skipped: the authors' autoattack/ package")
