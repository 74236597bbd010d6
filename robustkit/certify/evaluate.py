"""Certified accuracy over an ε sweep: the lower end of the bracket certified ≤ true robust
accuracy ≤ attacked (the attacks give the upper end)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from robustkit.certify.bounds import Method, certified_accuracy
from robustkit.data import Split
from robustkit.evaluation import wilson_interval

#: The columns of a certification table, one row per (method, ε).
CERTIFY_COLUMNS = ["method", "eps", "n", "certified", "accuracy", "ci_low", "ci_high",
                   "seconds"]


def certify_sweep(model: nn.Module, split: Split, eps: Sequence[float],
                  methods: Sequence[Method], batch_size: int = 100) -> pd.DataFrame:
    """Certified accuracy of ``model`` on ``split`` at every ε and by every method, with its
    95% Wilson interval; ε = 0 is clean accuracy (a correct sample is certified there)."""
    rows = []
    x, y = split.images, split.labels
    for method in methods:
        for e in sorted({float(v) for v in eps}):
            started = time.perf_counter()
            if e == 0:
                with torch.no_grad():
                    certified = torch.cat([model(x[i:i + batch_size]).argmax(1).cpu()
                                           for i in range(0, len(x), batch_size)]) == y.cpu()
            else:
                certified = certified_accuracy(model, x, y, e, method, batch_size)
            count = int(certified.sum())
            low, high = wilson_interval(count, len(y))
            rows.append({"method": method, "eps": e, "n": len(y), "certified": count,
                         "accuracy": count / len(y), "ci_low": low, "ci_high": high,
                         "seconds": time.perf_counter() - started})
    return pd.DataFrame(rows, columns=CERTIFY_COLUMNS)
