"""Why robustkit's raw PGD step was slower than torchattacks' on the CPU, with figures.

On one model and batch it times, in interleaved rounds (best kept):

1. the whole raw step, as ``attack_speed.py`` does: ``robustkit.attacks.pgd(..., early_stop=False)``
   and ``torchattacks.PGD`` (when installed), as image-steps/s;
2. the pieces of one robustkit step on the same batch, each in its earlier and its current
   form: the forward/backward pass (the part both libraries share), the per-sample worst-case
   record (``torch.where`` over gathered rows and a scatter back, against copying only the rows
   that changed), the box clamp (bounds recomputed from ``x`` every step, against a scalar
   clamp into [0, 1] when every pixel of ``x`` lies in [+0, 1]), the L∞ projection (a clamp
   against a per-sample ε tensor, against a scalar clamp when every row has the same ε) and the
   step ``α·sign(g)`` (a per-sample α tensor, against one number). Both forms of each piece give
   the same values.

    python benchmarks/raw_step.py [--checkpoint runs/mnist_mlp/seed-0/model-best.safetensors]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import THREADS_HELP, default_data_dir, machine_line, print_table, set_threads
from attack_speed import get_model, others_available, raw_other_seconds, raw_pgd_seconds

from robustkit.budgets import default_step_size
from robustkit.data import load_dataset


def best_ms(fn: Callable[[], object], repeats: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    data = load_dataset("mnist", args.data_dir, "cpu")
    model, described = get_model(args, data)
    x, y = data.test.images[:args.n].contiguous(), data.test.labels[:args.n].contiguous()
    n, steps, eps = len(x), args.steps, args.eps
    others = {k: v for k, v in others_available().items() if k == "torchattacks"}

    whole: dict[str, list[float]] = {"robustkit": [], **{k: [] for k in others}}
    raw_pgd_seconds(model, x[:8], y[:8], eps, 2)
    for name, lib in others.items():
        raw_other_seconds(name, lib, model, x[:8], y[:8], eps, 2)
    for _ in range(args.rounds):
        whole["robustkit"].append(raw_pgd_seconds(model, x, y, eps, steps))
        for name, lib in others.items():
            whole[name].append(raw_other_seconds(name, lib, model, x, y, eps, steps))

    # the pieces of one step, on this batch
    generator = torch.Generator().manual_seed(0)
    x_cur = (x + eps * (2 * torch.rand(x.shape, generator=generator) - 1)).clamp(0, 1)
    eps_rows = torch.full((n, 1, 1, 1), eps)
    alpha_rows = default_step_size(eps_rows, steps)
    alpha = float(alpha_rows[0])
    direction = torch.sign(x_cur - x)
    record = x.clone()
    idx = torch.arange(n)
    take = torch.rand(n, generator=generator) < 0.5
    rows = take.view(-1, 1, 1, 1)
    for p in model.parameters():
        p.requires_grad_(False)

    def forward_backward() -> None:
        x_in = x_cur.detach().requires_grad_(True)
        value = F.cross_entropy(model(x_in), y, reduction="none")
        torch.autograd.grad(value.sum(), x_in)

    def record_where() -> None:
        record[idx] = torch.where(rows, x_cur, record[idx])

    def record_rows() -> None:
        record[idx[take]] = x_cur[take]

    r = 20
    pieces = [
        ("forward + input gradient (shared)", best_ms(forward_backward, 3, args.rounds), None),
        ("worst-case record", best_ms(record_where, r, args.rounds),
         best_ms(record_rows, r, args.rounds)),
        ("box clamp", best_ms(lambda: torch.clamp(x_cur, min=x.clamp(max=0.0),
                                                  max=x.clamp(min=1.0)), r, args.rounds),
         best_ms(lambda: torch.clamp(x_cur, 0.0, 1.0), r, args.rounds)),
        ("L∞ projection", best_ms(lambda: torch.clamp(x_cur - x, min=-eps_rows, max=eps_rows),
                                  r, args.rounds),
         best_ms(lambda: torch.clamp(x_cur - x, min=-eps, max=eps), r, args.rounds)),
        ("step α·sign(g)", best_ms(lambda: alpha_rows * direction, r, args.rounds),
         best_ms(lambda: alpha * direction, r, args.rounds)),
    ]
    for model_param in model.parameters():
        model_param.requires_grad_(True)

    print(f"raw_step: {described}; {n} test images, ε={eps:g}, {steps} steps, "
          f"best of {args.rounds} interleaved rounds")
    print(machine_line())
    print()
    print("1. Whole raw step (no early stop)")
    rk = n * steps / min(whole["robustkit"])
    print_table(["tool", "image-steps/s", "robustkit / tool"],
                [[k, f"{n * steps / min(v):,.0f}", f"{rk / (n * steps / min(v)):.2f}x"]
                 for k, v in whole.items()])
    if not others:
        print("torchattacks not installed: robustkit measured alone")
    print()
    print(f"2. Pieces of one robustkit step, ms per step on {n} images (earlier form -> now)")
    table = []
    for name, before, now in pieces:
        table.append([name, f"{before:.2f}", "-" if now is None else f"{now:.2f}",
                      "-" if now is None else f"{before - now:.2f} saved"])
    print_table(["piece", "earlier ms", "now ms", "difference"], table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
