"""What a certificate costs: seconds per 1,000 MNIST test images for IBP, CROWN-IBP and CROWN.

On the released MLP (``zoo:mnist_mlp``, 784-512-10), the released CNN (``zoo:mnist_cnn``, whose
max pooling only IBP covers: the other two are refused and listed as such) and Wong et al.'s
strided CNN (``strided-cnn``, no pooling, trained briefly here with plain SGD as in
``certify_lirpa.py``), each method bounds the margins of the first ``--n`` test images (the CNNs'
CROWN on ``--crown-n``, its cost scaled to 1,000) at each ``--eps``, in batches of 100 as
``robustkit certify`` does, one thread (``OMP_NUM_THREADS=1`` is set before torch loads). The
figure is the best of ``--repeats`` rounds, the methods interleaved within a round, so load from
other jobs hits all of them alike.

    python benchmarks/certify_cost.py --json benchmarks/results/cpu_certify_cost.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import default_data_dir, machine_line, print_table, set_threads
from certify_lirpa import trained_strided_cnn
from torch import nn

from robustkit.certify import METHODS, certified_accuracy
from robustkit.data import Split, load_dataset
from robustkit.errors import RobustkitError
from robustkit.models import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images per cell (default 1000)")
    parser.add_argument("--crown-n", type=int, default=100,
                        help="images for CROWN on a CNN, scaled to 1,000 (default 100)")
    parser.add_argument("--eps", default="0.01,0.1", help="L∞ budgets (default 0.01,0.1)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best counts")
    parser.add_argument("--train-batches", type=int, default=400,
                        help="SGD batches of 128 for the strided CNN (default 400)")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--json", type=Path, default=None, help="save the figures as JSON")
    return parser.parse_args(argv)


def timed(model: nn.Module, split: Split, eps: float, method: str) -> tuple[float, int] | str:
    """(seconds, certified count) of one method over ``split``, or the refusal's message."""
    started = time.perf_counter()
    try:
        certified = certified_accuracy(model, split.images, split.labels, eps, method)  # type: ignore[arg-type]
    except RobustkitError as error:
        return str(error)
    return time.perf_counter() - started, int(certified.sum())


def measure(models: dict[str, nn.Module], test: Split, eps: Sequence[float], n: int,
            crown_n: int, repeats: int) -> list[dict[str, Any]]:
    rows: dict[tuple[str, float, str], dict[str, Any]] = {}
    for _ in range(repeats):
        for name, model in models.items():
            for e in eps:
                for method in METHODS:
                    count = crown_n if method == "crown" and "cnn" in name else n
                    outcome = timed(model, test.take(count), e, method)
                    key = (name, e, method)
                    row = rows.setdefault(key, {"model": name, "eps": e, "method": method,
                                                "n": count})
                    if isinstance(outcome, str):
                        row["refused"] = outcome
                    elif outcome[0] < row.get("seconds", float("inf")):
                        row |= {"seconds": outcome[0], "certified": outcome[1],
                                "seconds_per_1000": outcome[0] * 1000 / count}
    return list(rows.values())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(argv) if argv is not None else None)
    set_threads(1)
    eps = [float(v) for v in args.eps.split(",") if v.strip()]
    data = load_dataset("mnist", args.data_dir, "cpu")
    models = {"zoo:mnist_mlp": load_model("zoo:mnist_mlp")[0],
              "zoo:mnist_cnn": load_model("zoo:mnist_cnn")[0],
              "strided-cnn (SGD)": trained_strided_cnn(data.train, args.train_batches)}
    rows = measure(models, data.test, eps, args.n, args.crown_n, args.repeats)
    print(machine_line())
    print_table(["model", "eps", "method", "n", "s per 1,000", "certified"],
                [[r["model"], f"{r['eps']:g}", r["method"], r["n"],
                  f"{r['seconds_per_1000']:.1f}" if "seconds_per_1000" in r else "refused",
                  f"{r['certified']}/{r['n']}" if "certified" in r else "-"] for r in rows])
    refusals = {r["refused"] for r in rows if "refused" in r}
    for message in sorted(refusals):
        print(f"refused: {message}")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=2)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
