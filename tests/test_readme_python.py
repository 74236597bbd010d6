"""The README's "From Python" example runs as written, up to the sizes a test can afford.

The block is read from README.md, so an API change that breaks the example fails here. Only
these edits are made, each asserted to apply (an edit that no longer matches fails the test
instead of silently testing something else): the model is the committed `mnist_cnn` report's
weights (a fresh clone has no `runs/`), CIFAR-10 is swapped for MNIST (no download in CI), and
the sweeps and the batch attacks run on a few dozen images instead of the whole test set.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustkit.data import DATA_ENV

REPO = Path(__file__).resolve().parent.parent

EDITS = [
    ('"runs/mnist_cnn/seed-0/model-best.safetensors"', '"reports/mnist_cnn/model.safetensors"'),
    ('rk.load_data("cifar10")', 'rk.load_data("mnist")'),
    ("rk.evaluate(model, data.test,", "rk.evaluate(model, data.test.take(64),"),
    ("data.test.images[:256], data.test.labels[:256]",
     "data.test.images[:16], data.test.labels[:16]"),
]


def readme_python_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README's 'From Python' section has no python block"
    return match.group(1)


@pytest.mark.slow
def test_readme_python_example_runs(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_python_block()
    for old, new in EDITS:
        assert old in code, f"README's Python example changed: {old!r} is gone; update EDITS"
        code = code.replace(old, new)
    monkeypatch.setenv(DATA_ENV, str(mnist_root))
    monkeypatch.chdir(REPO)
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md (From Python)", "exec"), namespace)

    ev = namespace["ev"]
    results: pd.DataFrame = ev.results  # type: ignore[attr-defined]
    # the last sweep in the block: the ensemble at ε ∈ {0, 0.1, 0.3} on 64 images
    assert set(results["attack"]) >= {"autoattack"}
    assert sorted(set(results["eps"])) == [0.0, 0.1, 0.3]
    assert (results["n"] == 64).all()
    named = ["model", "attack", "norm", "eps", "n", "correct", "accuracy", "ci_low", "ci_high",
             "grad_evals"]
    assert list(results.columns[: len(named)]) == named
    assert {"index", "label", "clean_pred"} <= set(ev.per_sample.columns)  # type: ignore[attr-defined]

    x = namespace["x"]
    x_adv = namespace["x_adv"]
    assert isinstance(x, torch.Tensor) and isinstance(x_adv, torch.Tensor)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    res = namespace["res"]  # the Square call, the block's last batch attack
    assert res.success.shape == (16,)  # type: ignore[attr-defined]
    assert res.queries > 0  # type: ignore[attr-defined]
