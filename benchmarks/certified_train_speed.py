"""Certified training's epoch time as a ratio to a PGD-AT epoch, same machine, one process.

Each method takes the same optimisation steps (Adam, batch 128, the same MNIST batches, the
same initial weights) through the loss functions ``robustkit train`` uses:

* ``standard``: CE(f(x), y);
* ``pgd-at``: PGD-10 (step 0.04, random start) at ε = 0.3, then CE on the examples, as in
  ``experiments/mnist_cnn_pgd_at.toml`` (the reference, ratio 1);
* ``ibp``: κ·CE(f(x), y) + (1 − κ)·CE(−m̲_IBP, y) at ε = 0.3, κ = 0.5;
* ``crown-ibp``: the same with β = 1 (CROWN-IBP bounds as well as IBP's: what a step early in
  the ramp costs; β = 0 later is the ``ibp`` cost).

Rounds are interleaved (every method once per round) and the table gives the median seconds
per step over rounds, the epoch time it implies (55,000 training images), and the ratio to
PGD-AT. Run it with OMP_NUM_THREADS=1 (``--threads 1``, the default) on a shared machine.

    python benchmarks/certified_train_speed.py --arch dm-small
    python benchmarks/certified_train_speed.py --arch dm-medium --steps 3 --json out.json
    python benchmarks/certified_train_speed.py --quick          # smoke run on random data
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import THREADS_HELP, default_data_dir, machine_line, print_table, set_threads
from torch import Tensor, nn

from robustkit.models import build_model
from robustkit.models.zoo import Shape
from robustkit.training.certified import CertifiedStep, certified_loss, ibp_initialise
from robustkit.training.objectives import pgd_examples

METHODS = ("standard", "pgd-at", "ibp", "crown-ibp")
REFERENCE = "pgd-at"
EPS, PGD_STEPS, PGD_STEP_SIZE, KAPPA = 0.3, 10, 0.04, 0.5
TRAIN_IMAGES = 55_000

Loss = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _standard(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def _pgd_at(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x_adv = pgd_examples(model, x, y, eps=EPS, steps=PGD_STEPS, step_size=PGD_STEP_SIZE)
    return F.cross_entropy(model(x_adv), y)


def _ibp(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return certified_loss(model, x, y, CertifiedStep(EPS, KAPPA, 0.0), "ibp")[0]


def _crown_ibp(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return certified_loss(model, x, y, CertifiedStep(EPS, KAPPA, 1.0), "crown-ibp")[0]


LOSSES: dict[str, Loss] = {"standard": _standard, "pgd-at": _pgd_at, "ibp": _ibp,
                           "crown-ibp": _crown_ibp}


@dataclass(frozen=True)
class Row:
    """One method's median seconds per step, the epoch it implies, and its ratio to PGD-AT."""

    method: str
    step_s: float
    epoch_s: float
    ratio: float


def time_steps(loss: Loss, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Seconds per optimisation step (forward, bound, backward, Adam) over ``batches``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    model.train()
    _sync(batches[0][0].device)
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss(model, x, y).backward()
        optimizer.step()
    _sync(batches[0][0].device)
    return (time.perf_counter() - start) / len(batches)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, images: Tensor, labels: Tensor, *, steps: int, rounds: int,
            batch: int, methods: tuple[str, ...] = METHODS, seed: int = 0,
            device: str = "cpu") -> list[Row]:
    """Median seconds per step of each method over ``rounds`` interleaved rounds of ``steps``
    steps, each from the same IBP-initialised weights; ratios to PGD-AT's epoch. One untimed
    step of each method first (CUDA kernels and cuDNN choices, allocator warm-up)."""
    torch.manual_seed(seed)
    initial = build_model(arch, in_shape=typing.cast(Shape, tuple(images.shape[1:])))
    ibp_initialise(initial)
    initial.to(device)
    batches = [(images[i * batch:(i + 1) * batch].to(device),
                labels[i * batch:(i + 1) * batch].to(device)) for i in range(steps)]
    for method in methods if device != "cpu" else ():
        time_steps(LOSSES[method], copy.deepcopy(initial), batches[:1])
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for method in methods:
            model = copy.deepcopy(initial)
            seconds[method].append(time_steps(LOSSES[method], model, batches))
    per_epoch = -(-TRAIN_IMAGES // batch)
    medians = {m: statistics.median(s) for m, s in seconds.items()}
    reference = medians.get(REFERENCE, float("nan"))
    return [Row(m, medians[m], medians[m] * per_epoch, medians[m] / reference) for m in methods]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder with the MNIST IDX files (default: $ROBUSTKIT_DATA)")
    parser.add_argument("--arch", default="dm-small",
                        choices=["dm-small", "dm-medium", "dm-large", "strided-cnn"])
    parser.add_argument("--steps", type=int, default=5, help="steps per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: random images, batch 16, 2 steps, 1 round")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.quick:
        args.batch, args.steps, args.rounds = 16, 2, 1
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(args.batch * args.steps, 1, 28, 28, generator=generator)
        labels = torch.randint(0, 10, (len(images),), generator=generator)
    else:
        from robustkit.data import load_dataset

        data = load_dataset("mnist", args.data_dir, "cpu")
        images, labels = data.train.images, data.train.labels
    rows = measure(args.arch, images, labels, steps=args.steps, rounds=args.rounds,
                   batch=args.batch, device=args.device)
    print(machine_line())
    print(f"{args.device}, {args.arch}, batch {args.batch}, {args.steps} steps × "
          f"{args.rounds} rounds (median), ε = {EPS}; epoch = {TRAIN_IMAGES:,} images")
    print_table(["method", "s/step", "s/epoch", "× PGD-AT epoch"],
                [(r.method, f"{r.step_s:.3f}", f"{r.epoch_s:.0f}", f"{r.ratio:.2f}")
                 for r in rows])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine_line(), "arch": args.arch, "batch": args.batch,
                       "steps": args.steps, "rounds": args.rounds,
                       "rows": [r.__dict__ for r in rows]}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
