"""robustkit's L1 ensemble against the AutoAttack authors' ``version="standard"`` for L1.

On one model (default ``zoo:mnist_cnn_pgd_at``) and the first ``--n`` MNIST test images at one
L1 budget ε (default 10, pixel units: the sum of the absolute pixel changes of a [0, 1] image):

1. robustkit: ``autoattack`` with ``norm = "l1"`` through the sweep engine (ε ∈ {0, ε}):
   l1-APGD-CE with 5 restarts → l1-APGD-T with 5 targets, both with the 3ε/2ε/ε schedule →
   L1 FAB-T with 9 targets (``robustkit.attacks.fab``) → the L1 Square (5,000 queries);
2. the authors: ``AutoAttack(model, norm="L1", eps, version="standard")`` from their own code
   (https://github.com/fra31/auto-attack), imported from ``--authors-src`` (a folder that holds
   their ``autoattack/`` package: it is read, never installed, and no dependency of robustkit).
   Without it the comparison prints ``skipped: …`` and exits 0. Their standard L1 version runs
   APGD-CE (5 restarts), APGD-T (5 targets), FAB-T and Square (5000 queries); their log gives
   the robust accuracy after each stage, so what FAB-T and Square add shows.

Each side's adversarial images are checked to lie in the L1 ball and the [0, 1] box (a point
outside counts as not broken), and a sample counts as robust iff the model still classifies it
correctly. Printed and written (``--out``: JSON, text, PNG): clean and robust accuracy, the
authors' accuracy after each stage, the per-sample disagreements (the JSON also lists the
samples each side leaves robust), the wall times; the done-when of issue #37 is
``robustkit − authors ≤ 0.2`` points.

    python benchmarks/l1_compare.py --authors-src /tmp/aa --n 1000 --eps 10 \\
        --out benchmarks/results/cpu_l1_compare_mnist_cnn_pgd_at

``--recheck I,J,… --seeds S`` asks of each listed sample whether a disagreement is chance or a
systematic miss: each stage of each side runs on the sample again, ``S`` times, and the line
gives which runs broke it. APGD-CE and APGD-T: seed ``s`` draws the random starts (the sample
alone). FAB-T starts from the clean point and draws nothing, but its path is sensitive to float
rounding, which the batch changes: run ``s = 0`` has the sample alone, run ``s > 0`` beside
:data:`COMPANIONS` other test images drawn with seed ``s``. The authors' stages are their own,
from ``version="standard"``; each side's L1 Square runs as its ensemble runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import THREADS_HELP, default_data_dir, machine_line, set_threads
from torch import Tensor, nn

from robustkit.config import AttackConfig
from robustkit.data import Split, load_dataset
from robustkit.errors import RobustkitError
from robustkit.evaluation import evaluate
from robustkit.models import load_model

#: Relative slack on the L1 ball for either side's images (float32 sums of 784 values).
SLACK = 1e-5
#: What the done-when allows robustkit above the authors, in accuracy (0.2 points).
ALLOWED_GAP = 0.002
#: Other test images beside a rechecked sample in FAB-T's runs ``s > 0`` (``--recheck``).
COMPANIONS = 7
#: The stages of the authors' standard L1 version, in their order.
AUTHORS_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="zoo:mnist_cnn_pgd_at",
                        help="the model (any robustkit --model spec)")
    parser.add_argument("--n", type=int, default=1000, help="first N test images (default 1000)")
    parser.add_argument("--eps", type=float, default=10.0, help="L1 budget in pixel units (10)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--authors-src", type=Path,
                        default=Path(os.environ.get("AUTOATTACK_SRC", "/tmp/aa")),
                        help="folder holding the authors' autoattack/ package "
                             "(default $AUTOATTACK_SRC, else /tmp/aa)")
    parser.add_argument("--skip-robustkit", action="store_true")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--out", type=Path, default=None,
                        help="write OUT.json, OUT.txt and OUT.png")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--recheck", default=None, metavar="I,J,...",
                        help="rerun each stage of both sides on these test samples instead "
                             "(indices below --n), --seeds times: chance or systematic miss")
    parser.add_argument("--seeds", type=int, default=5, help="runs per stage for --recheck")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or not args.eps > 0 or args.seeds < 1:
        parser.error("--n, --batch-size and --seeds must be at least 1 and --eps above 0")
    if args.recheck is not None:
        try:
            args.recheck = [int(i) for i in args.recheck.split(",")]
        except ValueError:
            parser.error(f"--recheck takes test indices as I,J,..., got {args.recheck!r}")
        if not all(0 <= i < args.n for i in args.recheck):
            parser.error(f"--recheck indices must lie in [0, --n = {args.n})")
    return args


def robust_inside(model: nn.Module, x: Tensor, y: Tensor, adv: Tensor, eps: float
                  ) -> tuple[Tensor, int]:
    """Per-sample robustness under ``adv`` (a point outside ``B₁(x, ε) ∩ [0, 1]^d`` counts as
    not broken) and how many points were outside."""
    size = (adv - x).flatten(1).abs().sum(1)
    outside = (size > eps * (1 + SLACK)) | (adv.flatten(1).amin(1) < 0) | (
        adv.flatten(1).amax(1) > 1)
    with torch.no_grad():
        still = model(adv).argmax(1) == y
        clean = model(x).argmax(1) == y
    return torch.where(outside, clean, still), int(outside.sum())


def run_robustkit(model: nn.Module, split: Split, args: argparse.Namespace
                  ) -> tuple[Tensor, float, dict[str, Any]]:
    attack = AttackConfig(name="autoattack", norm="l1")
    started = time.perf_counter()
    result = evaluate(model, split, [attack], [0.0, args.eps], batch_size=args.batch_size,
                      seed=args.seed, n_examples=0)
    seconds = time.perf_counter() - started
    broken_eps = torch.tensor(result.per_sample[f"{attack.title}_eps"].to_numpy())
    timing = result.timings[result.timings["eps"] == args.eps].iloc[0]
    return broken_eps > args.eps, seconds, {"grad_evals": int(timing["grad_evals"])}


STAGE_LINE = re.compile(r"robust accuracy after ([A-Z\-]+): ([0-9.]+)%")


def run_authors(model: nn.Module, split: Split, args: argparse.Namespace
                ) -> tuple[Tensor, float, int, dict[str, float]]:
    """The authors' standard L1 AutoAttack: per-sample robustness, seconds, points outside the
    threat set, and their robust accuracy after each stage (from their log)."""
    sys.path.insert(0, str(args.authors_src))
    from autoattack import AutoAttack  # the authors' code, read from --authors-src

    attack = AutoAttack(model, norm="L1", eps=args.eps, version="standard", seed=args.seed,
                        device="cpu", verbose=True)
    log = io.StringIO()
    robust, outside = [], 0
    started = time.perf_counter()
    with contextlib.redirect_stdout(log):
        for i in range(0, len(split), args.batch_size):
            x, y = split.images[i:i + args.batch_size], split.labels[i:i + args.batch_size]
            adv = attack.run_standard_evaluation(x, y, bs=len(x)).detach()
            verdict, out = robust_inside(model, x, y, adv, args.eps)
            robust.append(verdict)
            outside += out
    seconds = time.perf_counter() - started
    stages: dict[str, list[float]] = {}
    for name, percent in STAGE_LINE.findall(log.getvalue()):
        stages.setdefault(name, []).append(float(percent) / 100)
    batches = -(-len(split) // args.batch_size)
    sizes = [min(args.batch_size, len(split) - b * args.batch_size) for b in range(batches)]
    per_stage = {name: sum(a * s for a, s in zip(values, sizes, strict=False)) / len(split)
                 for name, values in stages.items() if len(values) == batches}
    return torch.cat(robust), seconds, outside, per_stage


def breaks_first(model: nn.Module, x: Tensor, y: Tensor, adv: Tensor, eps: float) -> int:
    """1 when ``adv`` breaks the batch's first sample inside the threat set, else 0."""
    return int(~robust_inside(model, x, y, adv, eps)[0][0])


def authors_stage(model: nn.Module, stage: str, x: Tensor, y: Tensor, eps: float,
                  seed: int) -> Tensor:
    """One stage of the authors' standard L1 version (their settings, seed ``seed``)."""
    from autoattack import AutoAttack  # the authors' code, on sys.path from --authors-src

    attack = AutoAttack(model, norm="L1", eps=eps, version="standard", seed=seed, device="cpu",
                        verbose=False)
    attack.attacks_to_run = [stage]  # after set_version: the standard L1 settings stay
    with contextlib.redirect_stdout(io.StringIO()):
        adv: Tensor = attack.run_standard_evaluation(x, y, bs=len(x)).detach()
    return adv


def recheck(model: nn.Module, split: Split, args: argparse.Namespace) -> list[str]:
    """Per listed sample and stage, which of ``--seeds`` runs of each side break it (see the
    module docstring); one line each."""
    from robustkit.attacks.ensemble import autoattack

    sys.path.insert(0, str(args.authors_src))
    lines = []
    for i in args.recheck:
        for stage in AUTHORS_STAGES:
            broken: dict[str, list[int]] = {"robustkit": [], "authors": []}
            for s in range(args.seeds):
                rows = [i]
                if stage == "fab-t" and s > 0:
                    draw = torch.Generator().manual_seed(s)
                    others = [j for j in torch.randperm(len(split), generator=draw).tolist()
                              if j != i]
                    rows += others[:COMPANIONS]
                x, y = split.images[rows], split.labels[rows]
                ours = autoattack(model, x, y, eps=args.eps, norm="l1", stages=(stage,),
                                  generator=torch.Generator().manual_seed(s)).x_adv
                broken["robustkit"].append(breaks_first(model, x, y, ours, args.eps))
                theirs = authors_stage(model, stage, x, y, args.eps, s)
                broken["authors"].append(breaks_first(model, x, y, theirs, args.eps))
            lines.append(f"sample {i} {stage}: broken in runs 0..{args.seeds - 1}: robustkit "
                         f"{broken['robustkit']}, authors {broken['authors']}")
            print(lines[-1], flush=True)
    return lines


def figure(path: Path, clean: float, figures: dict[str, Any]) -> None:
    """Robust accuracy after each stage: the authors' stages and robustkit's final figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot()
    authors = figures.get("authors", {}).get("after_stage", {})
    names = ["clean", *authors]
    ax.plot(range(len(names)), [clean, *authors.values()], "o-",
            label=f"authors' standard L1 ({figures.get('authors', {}).get('accuracy', 0):.1%})")
    if "robustkit" in figures:
        ax.axhline(figures["robustkit"]["accuracy"], color="C1", ls="--",
                   label=f"robustkit autoattack l1 ({figures['robustkit']['accuracy']:.1%})")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{figures['model']}, L1 ε = {figures['eps']:g}, first {figures['n']} test "
                 "images", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if not (args.authors_src / "autoattack" / "autoattack.py").is_file():
        print(f"skipped: the authors' autoattack/ package is not in {args.authors_src} "
              "(fetch github:fra31/auto-attack and pass its folder as --authors-src)")
        return 0
    try:
        model, _ = load_model(args.checkpoint)
        data = load_dataset("mnist", args.data_dir, torch.device("cpu"), val_size=0)
    except RobustkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model.eval()
    split = data.test.take(args.n)
    with torch.no_grad():
        clean = float((model(split.images).argmax(1) == split.labels).float().mean())
    lines = [machine_line(),
             f"model {args.checkpoint}, first {len(split)} MNIST test images, L1 ε = "
             f"{args.eps:g}, seed {args.seed}; clean accuracy {clean:.4f}"]
    print(*lines, sep="\n", flush=True)
    if args.recheck is not None:
        lines += recheck(model, split, args)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
            print(f"written {args.out}.txt")
        return 0
    figures: dict[str, Any] = {"model": args.checkpoint, "n": len(split), "eps": args.eps,
                               "clean_accuracy": clean, "machine": lines[0]}
    rk: Tensor | None = None
    if not args.skip_robustkit:
        rk, seconds, cost = run_robustkit(model, split, args)
        figures["robustkit"] = {"accuracy": float(rk.float().mean()), "seconds": seconds, **cost}
        lines.append(f"robustkit autoattack l1 (APGD-CE×5 → APGD-T×5 → FAB-T×9): "
                     f"{rk.float().mean():.4f} in {seconds:.0f} s")
        print(lines[-1], flush=True)
    ref, seconds, outside, stages = run_authors(model, split, args)
    figures["authors"] = {"accuracy": float(ref.float().mean()), "seconds": seconds,
                          "outside_threat_set": outside, "after_stage": stages}
    figures["robust_authors"] = ref.nonzero().squeeze(1).tolist()
    lines.append(f"authors' AutoAttack standard L1: {ref.float().mean():.4f} in {seconds:.0f} s"
                 f"; after each stage {', '.join(f'{k} {v:.4f}' for k, v in stages.items())}"
                 + (f"; {outside} points outside the threat set" if outside else ""))
    if rk is not None:
        gap = float(rk.float().mean() - ref.float().mean())
        only_ref = (rk & ~ref).nonzero().squeeze(1).tolist()
        only_rk = (~rk & ref).nonzero().squeeze(1).tolist()
        figures["gap_robustkit_minus_authors"] = gap
        figures["broken_only_by_authors"], figures["broken_only_by_robustkit"] = only_ref, only_rk
        figures["robust_robustkit"] = rk.nonzero().squeeze(1).tolist()
        lines.append(f"robustkit − authors: {100 * gap:+.2f} points (done-when: ≤ "
                     f"{100 * ALLOWED_GAP:.1f}) — {'met' if gap <= ALLOWED_GAP else 'NOT met'}; "
                     f"broken only by the authors {len(only_ref)} {only_ref[:20]}, only by "
                     f"robustkit {len(only_rk)} {only_rk[:20]}")
    print(*lines[2 + (rk is not None):], sep="\n")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
        args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        figure(args.out.with_suffix(".png"), clean, figures)
        print(f"written {args.out}.json, .txt, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
