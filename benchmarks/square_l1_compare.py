"""robustkit's L1 Square against the AutoAttack authors' L1 Square: robust samples per seed.

One model (default ``zoo:mnist_cnn_pgd_at``), the first ``--n`` MNIST test images, L1 ε
(default 10, the MNIST L1 budget of AutoAttack's L1 evaluations), the same search on both
sides: robustkit's :func:`robustkit.attacks.square` with ``norm="l1"`` and ``budget =
--queries + 1`` (robustkit's budget counts the start, the authors' ``n_queries`` the iterations
after it), and the authors' ``SquareAttack(norm="L1", p_init=0.8, resc_schedule=False)`` (the
configuration of their standard L1 ensemble), imported from ``--authors-src``. For each seed
the line gives the robust count of each side (a sample is robust iff its returned image,
checked to lie in the ball and the box, is classified correctly) and how many are robust
under both; the two searches draw different random numbers, so equal strength shows as counts
that differ from seed to seed in both directions, not as equal counts.

    OMP_NUM_THREADS=1 python benchmarks/square_l1_compare.py --seeds 1 2 3 \\
        > benchmarks/results/cpu_square_l1_compare.txt
    python benchmarks/square_l1_compare.py --quick   # random images, 4 samples, 20 queries
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import THREADS_HELP, default_data_dir, machine_line, set_threads
from torch import Tensor, nn

from robustkit.attacks import square
from robustkit.data import load_dataset
from robustkit.models import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:mnist_cnn_pgd_at",
                        help="any robustkit --model spec (default zoo:mnist_cnn_pgd_at)")
    parser.add_argument("--eps", type=float, default=10.0, help="L1 budget (10)")
    parser.add_argument("--n", type=int, default=200, help="first N test images (200)")
    parser.add_argument("--queries", type=int, default=1000,
                        help="search iterations after the start on both sides (1000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--authors-src", type=Path, default=Path("/tmp/aa"),
                        help="folder holding the authors' autoattack/ package (/tmp/aa)")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder with the MNIST IDX files (default: $ROBUSTKIT_DATA)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--quick", action="store_true",
                        help="random images and a random CNN, 4 samples, 20 queries")
    return parser.parse_args(argv)


def robust(model: nn.Module, x: Tensor, y: Tensor, adv: Tensor, eps: float) -> Tensor:
    """Per sample: classified correctly at an image inside the L1 ball and the box."""
    size = (adv - x).flatten(1).abs().sum(1)
    if bool((size > eps * (1 + 1e-5)).any()) or bool(((adv < 0) | (adv > 1)).any()):
        raise SystemExit("an example left the L1 ball or the box")
    with torch.no_grad():
        correct: Tensor = model(adv).argmax(1) == y
    return correct


def authors_square(model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace,
                   seed: int) -> Tensor:
    if str(args.authors_src) not in sys.path:
        sys.path.insert(0, str(args.authors_src))
    from autoattack.square import SquareAttack  # the authors' code, read from --authors-src

    attack = SquareAttack(model, p_init=0.8, n_queries=args.queries, eps=args.eps, norm="L1",
                          n_restarts=1, seed=seed, verbose=False, resc_schedule=False,
                          device=x.device)
    with torch.no_grad():
        adv: Tensor = attack.perturb(x, y)
    return adv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if not (args.authors_src / "autoattack" / "square.py").is_file():
        print(f"skipped: the authors' autoattack/ package is not in {args.authors_src}")
        return 0
    if args.quick:
        torch.manual_seed(0)
        model: nn.Module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(4 * 26 * 26, 10)).eval()
        x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y = model(x).argmax(1)
        args.queries = 20
    else:
        model, _ = load_model(args.model)
        model.eval()
        split = load_dataset("mnist", args.data_dir, torch.device("cpu"), val_size=0
                             ).test.take(args.n)
        x, y = split.images, split.labels
    print(machine_line())
    what = "a random CNN on random images" if args.quick else f"model {args.model}"
    print(f"{what}, first {len(x)} images, L1 ε = {args.eps:g}, "
          f"{args.queries} iterations after the start on both sides")
    for seed in args.seeds:
        theirs = robust(model, x, y, authors_square(model, x, y, args, seed), args.eps)
        result = square(model, x, y, eps=args.eps, norm="l1", budget=args.queries + 1,
                        generator=torch.Generator().manual_seed(seed))
        ours = robust(model, x, y, result.x_adv, args.eps)
        print(f"seed {seed}: robust under the authors' L1 Square {int(theirs.sum())}, "
              f"under robustkit's {int(ours.sum())}, under both {int((theirs & ours).sum())}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
