"""Is a per-sample disagreement with the AutoAttack authors' code chance or a systematic miss?

For the listed test images (the disagreements ``autoattack_compare.py --authors`` printed), each
side runs again ``--seeds`` times on those images as one batch, L∞:

* robustkit's ``autoattack`` (APGD-CE → APGD-T → Square, its default), seed ``s`` drawing the
  starts and Square's squares;
* robustkit's ``autoattack`` with every stage, FAB-T included (``stages=STAGES``): the
  authors' standard runs FAB-T, robustkit's default does not;
* the authors' ``AutoAttack(version="standard", seed=s)`` from ``--authors-src``.

One line per image: how many of the runs of each broke it (an example inside the ball and the
box, misclassified). A sample one side breaks in most runs and the other in none is a
systematic difference; one both break now and then is start noise.

    python benchmarks/aa_recheck.py --model zoo:mnist_cnn_fast_at_ema --eps 0.3 \\
        --indices 21,25,255 --seeds 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch
from _common import THREADS_HELP, default_data_dir, machine_line, set_threads
from torch import Tensor, nn

from robustkit.attacks.ensemble import STAGES, autoattack
from robustkit.data import load_dataset
from robustkit.models import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:mnist_cnn_pgd_at")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--indices", required=True, help="test indices I,J,…")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--authors-src", type=Path, default=Path("/tmp/aa"))
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    return parser.parse_args(argv)


def broken(model: nn.Module, x: Tensor, y: Tensor, adv: Tensor, eps: float) -> Tensor:
    inside = ((adv - x).abs().flatten(1).amax(1) <= eps + 1e-6) & (
        adv.flatten(1).amin(1) >= 0) & (adv.flatten(1).amax(1) <= 1)
    with torch.no_grad():
        wrong: Tensor = model(adv).argmax(1) != y
    return wrong & inside


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if not (args.authors_src / "autoattack" / "autoattack.py").is_file():
        print(f"skipped: the authors' autoattack/ package is not in {args.authors_src}")
        return 0
    sys.path.insert(0, str(args.authors_src))
    from autoattack import AutoAttack  # the authors' code, read from --authors-src

    model, _ = load_model(args.model)
    model.eval()
    indices = [int(i) for i in args.indices.split(",")]
    split = load_dataset("mnist", args.data_dir, torch.device("cpu"), val_size=0).test
    x, y = split.images[indices], split.labels[indices]
    print(machine_line())
    print(f"model {args.model}, L∞ ε = {args.eps:g}, test images {indices} as one batch, "
          f"seeds 0..{args.seeds - 1}", flush=True)
    counts = {side: torch.zeros(len(indices), dtype=torch.long)
              for side in ("robustkit", "robustkit+FAB-T", "authors")}
    for s in range(args.seeds):
        ours = autoattack(model, x, y, eps=args.eps, generator=torch.Generator().manual_seed(s))
        counts["robustkit"] += broken(model, x, y, ours.x_adv, args.eps).long()
        every = autoattack(model, x, y, eps=args.eps, stages=STAGES,
                           generator=torch.Generator().manual_seed(s))
        counts["robustkit+FAB-T"] += broken(model, x, y, every.x_adv, args.eps).long()
        attack = AutoAttack(model, norm="Linf", eps=args.eps, version="standard", seed=s,
                            device="cpu", verbose=False)
        with contextlib.redirect_stdout(io.StringIO()):
            theirs = attack.run_standard_evaluation(x, y, bs=len(x)).detach()
        counts["authors"] += broken(model, x, y, theirs, args.eps).long()
        print(f"seed {s} done", flush=True)
    for k, i in enumerate(indices):
        print(f"sample {i}: broken in {args.seeds} runs: robustkit "
              f"{int(counts['robustkit'][k])}, robustkit+FAB-T "
              f"{int(counts['robustkit+FAB-T'][k])}, authors {int(counts['authors'][k])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
