"""robustkit's Square against the AutoAttack authors' Square: seconds per query.

One model (default ``zoo:mnist_cnn_pgd_at``), the first ``N`` MNIST test images for each batch
size ``N`` in ``--sizes`` (default 8 and 500, each one batch), L∞ ε (0.3), the same query budget
on both sides:

* robustkit: :func:`robustkit.attacks.square` with ``budget = --queries`` and a seeded generator;
* the authors: ``SquareAttack(model, norm="Linf", eps, n_queries, p_init=0.8,
  resc_schedule=False, seed)`` from their code (https://github.com/fra31/auto-attack), imported
  from ``--authors-src``: the configuration their ``AutoAttack`` builds, run through its own
  ``perturb``.

The two run alternately in one process (``--rounds`` times each, robustkit first in odd rounds,
the authors first in even ones), on one torch thread by default. A counting wrapper around the
model counts the images each side sends through it (the clean pass and the verdicts included),
so ``s/query`` is seconds per image forward pass on both sides alike. Printed per batch size:
seconds (the median over the rounds), forward passes, seconds per query, the ratio robustkit /
authors (below 1: robustkit is faster), and each side's robust accuracy (a sample counts as
robust iff its returned image, checked to lie in the ε-ball and the box, is still classified
correctly). ``--json OUT`` saves the same rows.

    OMP_NUM_THREADS=1 python benchmarks/square_speed.py --queries 1000 \\
        --json benchmarks/results/cpu_square_speed.json
    python benchmarks/square_speed.py --quick   # random images, 2 and 4 samples, 20 queries
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _common import THREADS_HELP, default_data_dir, machine_line, print_table, set_threads
from torch import Tensor, nn

from robustkit.attacks import square
from robustkit.data import load_dataset
from robustkit.errors import RobustkitError
from robustkit.models import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:mnist_cnn_pgd_at",
                        help="any robustkit --model spec (default zoo:mnist_cnn_pgd_at)")
    parser.add_argument("--eps", type=float, default=0.3, help="L∞ budget in [0, 1] (0.3)")
    parser.add_argument("--queries", type=int, default=1000,
                        help="Square's query budget per sample on both sides (1000)")
    parser.add_argument("--large-queries", type=int, default=None, metavar="Q",
                        help="a smaller budget for the batches above 100 images (default: "
                             "--queries); seconds per query is what is compared")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 500],
                        help="batch sizes: the first N test images, one batch each (8 500)")
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs of each side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--authors-src", type=Path,
                        default=Path(os.environ.get("AUTOATTACK_SRC", "/tmp/aa")),
                        help="folder holding the authors' autoattack/ package "
                             "(default $AUTOATTACK_SRC, else /tmp/aa)")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder with the MNIST IDX files (default: $ROBUSTKIT_DATA)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a small random CNN on random images, sizes 2 and 4, "
                             "20 queries, one round")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write the rows to OUT")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.rounds, args.large_queries = [2, 4], 20, 1, None
    if args.queries < 1 or args.rounds < 1 or min(args.sizes) < 1:
        parser.error("--queries, --rounds and --sizes must be at least 1")
    if not 0 < args.eps <= 1:
        parser.error(f"--eps {args.eps} is out of range for L∞: (0, 1]")
    return args


class Counting(nn.Module):
    """The model, counting the images sent through it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += len(x)
        logits: Tensor = self.inner(x)
        return logits


@dataclass(frozen=True)
class Run:
    """One side's run on one batch: seconds, images forwarded, robust samples."""

    seconds: float
    queries: int
    robust: int


def robust_count(model: nn.Module, x: Tensor, y: Tensor, adv: Tensor, eps: float) -> int:
    """Samples whose ``adv`` is still classified correctly; a point outside the ε-ball or the
    box counts as robust (it does not break the sample)."""
    inside = (((adv - x).abs().flatten(1).amax(1) <= eps + 1e-6)
              & (adv >= 0).flatten(1).all(1) & (adv <= 1).flatten(1).all(1))
    with torch.no_grad():
        correct = model(adv).argmax(1) == y
    return int((correct | ~inside).sum())


def timed(counting: Counting, attack: Callable[[], Tensor], x: Tensor, y: Tensor,
          eps: float) -> Run:
    counting.rows = 0
    started = time.perf_counter()
    adv = attack()
    seconds = time.perf_counter() - started
    return Run(seconds, counting.rows, robust_count(counting.inner, x, y, adv, eps))


def robustkit_side(model: nn.Module, x: Tensor, y: Tensor, eps: float, queries: int,
                   seed: int) -> Callable[[], Tensor]:
    def attack() -> Tensor:
        result = square(model, x, y, eps=eps, budget=queries,
                        generator=torch.Generator().manual_seed(seed))
        return result.x_adv

    return attack


def authors_side(model: nn.Module, x: Tensor, y: Tensor, eps: float, queries: int, seed: int,
                 src: Path) -> Callable[[], Tensor]:
    """The authors' Square as their ``AutoAttack`` builds it (``resc_schedule=False``)."""
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from autoattack.square import SquareAttack  # the authors' code, read from --authors-src

    attack = SquareAttack(model, p_init=0.8, n_queries=queries, eps=eps, norm="Linf",
                          n_restarts=1, seed=seed, verbose=False, resc_schedule=False,
                          device=x.device)

    def run() -> Tensor:
        with torch.no_grad():
            adv: Tensor = attack.perturb(x, y)
        return adv

    return run


def quick_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def load_images(args: argparse.Namespace, model: nn.Module, n: int) -> tuple[Tensor, Tensor]:
    if args.quick:
        x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            return x, model(x).argmax(1)
    data = load_dataset("mnist", args.data_dir, torch.device("cpu"), val_size=0)
    split = data.test.take(n)
    return split.images, split.labels


def compare(model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace,
            queries: int) -> dict[str, Any]:
    """Both sides on one batch, alternated ``--rounds`` times."""
    counting = Counting(model).eval()
    sides = {"robustkit": robustkit_side(counting, x, y, args.eps, queries, args.seed),
             "authors": authors_side(counting, x, y, args.eps, queries, args.seed,
                                     args.authors_src)}
    runs: dict[str, list[Run]] = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            runs[name].append(timed(counting, sides[name], x, y, args.eps))
    row: dict[str, Any] = {"n": len(x), "queries_per_sample": queries}
    for name, done in runs.items():
        seconds = statistics.median(run.seconds for run in done)
        forwards = done[0].queries
        row[name] = {"seconds": seconds, "forwards": forwards,
                     "s_per_query": seconds / max(forwards, 1),
                     "robust_accuracy": done[0].robust / len(x),
                     "runs": [asdict(run) for run in done]}
    row["ratio"] = row["robustkit"]["s_per_query"] / row["authors"]["s_per_query"]
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if not (args.authors_src / "autoattack" / "square.py").is_file():
        print(f"skipped: the authors' autoattack/ package is not in {args.authors_src} "
              "(fetch github:fra31/auto-attack and pass its folder as --authors-src)")
        return 0
    try:
        model = quick_model() if args.quick else load_model(args.model)[0]
        model.eval()
        batches = [load_images(args, model, n) for n in args.sizes]
    except RobustkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source = "a random CNN on random images" if args.quick else args.model
    print(machine_line())
    print(f"Square, L∞ ε = {args.eps:g}, p_init 0.8, unrescaled schedule, {source}, "
          f"seed {args.seed}, {args.rounds} alternated round(s) per side", flush=True)
    rows = []
    for x, y in batches:
        large = args.large_queries is not None and len(x) > 100
        rows.append(compare(model, x, y, args, args.large_queries if large else args.queries))
    print_table(
        ["N", "queries", "side", "seconds", "forwards", "ms/query", "robust acc", "ratio rk/auth"],
        [[row["n"], row["queries_per_sample"], side, f"{row[side]['seconds']:.2f}",
          row[side]["forwards"], f"{1000 * row[side]['s_per_query']:.4f}",
          f"{row[side]['robust_accuracy']:.4f}",
          f"{row['ratio']:.3f}" if side == "robustkit" else ""]
         for row in rows for side in ("robustkit", "authors")])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_line(), "model": source,
                                         "eps": args.eps, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
