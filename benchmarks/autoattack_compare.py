"""robustkit's `autoattack` ensemble against torchattacks' AutoAttack(version="standard").

On one model (a robustkit checkpoint, or anything ``robustkit attack --model`` loads) and the first
``--n`` MNIST test images (default 1000), at one ε:

1. robustkit: the ensemble APGD-CE → APGD-T (9 targets) → Square (5000 queries), run through
   the sweep engine (``robustkit.evaluation.evaluate`` with ``name = "autoattack"``, ε ∈ {0, ε}),
   exactly what ``robustkit attack --attack autoattack`` runs;
2. torchattacks: ``AutoAttack(model, norm, eps, version="standard", n_classes=K, seed)``
   (APGD-CE, APGD-T, FAB-T, Square 5000), batch by batch; its adversarial images are checked to
   lie in the ε-ball and the [0, 1] box, and a sample counts as robust iff the model still
   classifies its image correctly.

Printed: clean and robust accuracy of each, the per-sample disagreements (indices; which side
broke them), and the wall time of each with the ratio torchattacks / robustkit. ``--json OUT``
saves the same figures (with every disagreeing index) as JSON.

    python benchmarks/autoattack_compare.py --checkpoint runs/mlp_at/model-best.safetensors \\
        --eps 0.1 --n 1000
    python benchmarks/autoattack_compare.py \\
        --checkpoint runs/mnist_cnn_pgd_at/seed-0/model-best.safetensors \\
        --eps 0.3 --device cuda --json logs/aa_pgd_at.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import THREADS_HELP, default_data_dir, machine_line, print_table, set_threads
from torch import Tensor, nn

from robustkit.budgets import eps_bound
from robustkit.config import AttackConfig
from robustkit.data import Split, load_dataset
from robustkit.errors import RobustkitError
from robustkit.evaluation import evaluate
from robustkit.models import load_model
from robustkit.runtime import resolve_device

#: How many disagreeing indices the terminal shows per side (the JSON has all).
SHOW = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="the model: a robustkit checkpoint (or any robustkit --model spec)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="safetensors state dict for a package.module:factory --checkpoint")
    parser.add_argument("--n", type=int, default=1000, help="first N test images (default 1000)")
    parser.add_argument("--eps", type=float, default=0.3, help="budget in [0,1] pixel units")
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="batch size of both tools (default 1000)")
    parser.add_argument("--steps", type=int, default=100, help="robustkit's APGD steps (100)")
    parser.add_argument("--queries", type=int, default=5000, help="robustkit's Square budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder with the MNIST IDX files (default: $ROBUSTKIT_DATA)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write the figures and every disagreeing index to OUT")
    parser.add_argument("--skip-reference", action="store_true",
                        help="run robustkit only (no torchattacks)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be at least 1")
    if not 0 < args.eps <= eps_bound(args.norm):  # L2's √d: checked once the data is loaded
        parser.error(f"--eps {args.eps} is out of range for {args.norm}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_robustkit(model: nn.Module, split: Split, args: argparse.Namespace,
                  device: torch.device) -> tuple[Tensor, float, dict[str, Any]]:
    """Per-sample robustness at ε ``[n]`` (CPU bool), seconds, and the engine's cost figures."""
    attack = AttackConfig(name="autoattack", norm=args.norm, steps=args.steps,
                          queries=args.queries)
    _sync(device)
    started = time.perf_counter()
    result = evaluate(model, split, [attack], [0.0, args.eps], batch_size=args.batch_size,
                      seed=args.seed, n_examples=0)
    _sync(device)
    seconds = time.perf_counter() - started
    broken_eps = torch.tensor(result.per_sample[f"{attack.title}_eps"].to_numpy())
    robust = broken_eps > args.eps
    timing = result.timings[result.timings["eps"] == args.eps].iloc[0]
    return robust, seconds, {"grad_evals": int(timing["grad_evals"]),
                             "queries": int(timing["queries"])}


def run_torchattacks(model: nn.Module, split: Split, args: argparse.Namespace,
                     device: torch.device, num_classes: int) -> tuple[Tensor, float, int]:
    """Per-sample robustness ``[n]`` under torchattacks' AutoAttack, seconds, and the number of
    adversarial images outside the ε-ball or the box (they count as not broken)."""
    import torchattacks

    norm = "Linf" if args.norm == "linf" else "L2"
    attack = torchattacks.AutoAttack(model, norm=norm, eps=args.eps, version="standard",
                                     n_classes=num_classes, seed=args.seed)
    robust, invalid = [], 0
    _sync(device)
    started = time.perf_counter()
    for i in range(0, len(split), args.batch_size):
        x = split.images[i:i + args.batch_size]
        y = split.labels[i:i + args.batch_size]
        adv = attack(x, y).detach()
        with torch.no_grad():
            still = model(adv).argmax(1) == y
        diff = (adv - x).flatten(1)
        size = diff.abs().amax(1) if args.norm == "linf" else diff.norm(dim=1)
        outside = (size > args.eps + 1e-5) | (adv.flatten(1).amin(1) < -1e-6) | (
            adv.flatten(1).amax(1) > 1 + 1e-6)
        invalid += int(outside.sum())
        clean_ok = model(x).argmax(1) == y if outside.any() else still
        robust.append(torch.where(outside, clean_ok, still).cpu())
    _sync(device)
    return torch.cat(robust), time.perf_counter() - started, invalid


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    try:
        device = resolve_device(args.device)
        model, info = load_model(args.checkpoint, weights=args.weights, device=device)
        data = load_dataset("mnist", args.data_dir, device, val_size=0)
    except RobustkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model.eval()
    split = data.test.take(args.n)
    if args.eps > eps_bound(args.norm, split.images[0].numel()):
        print(f"error: --eps {args.eps} is out of range for {args.norm}", file=sys.stderr)
        return 2
    with torch.no_grad():
        logits = torch.cat([model(split.images[i:i + args.batch_size])
                            for i in range(0, len(split), args.batch_size)])
    clean = (logits.argmax(1) == split.labels).cpu()
    n = len(split)
    print(machine_line())
    print(f"model {args.checkpoint} ({info.get('kind', '?')}), device {device}, first {n} "
          f"MNIST test images, {args.norm} ε = {args.eps:g}; "
          f"clean accuracy {clean.float().mean():.4f}")

    rk_robust, rk_seconds, rk_cost = run_robustkit(model, split, args, device)
    figures: dict[str, Any] = {
        "model": args.checkpoint, "device": str(device), "n": n, "norm": args.norm,
        "eps": args.eps, "clean_accuracy": float(clean.float().mean()), "machine": machine_line(),
        "robustkit": {"accuracy": float(rk_robust.float().mean()), "seconds": rk_seconds,
                      "steps": args.steps, "queries_budget": args.queries, **rk_cost},
    }
    rows: list[list[object]] = [["robustkit autoattack", f"{rk_robust.float().mean():.4f}",
                                 f"{rk_seconds:.1f}", ""]]
    if not args.skip_reference:
        try:
            ta_robust, ta_seconds, invalid = run_torchattacks(model, split, args, device,
                                                              int(logits.shape[1]))
        except ImportError:
            print("torchattacks is not installed (pip install torchattacks): reference skipped")
        else:
            only_ta = ((rk_robust & ~ta_robust).nonzero().squeeze(1)).tolist()
            only_rk = ((~rk_robust & ta_robust).nonzero().squeeze(1)).tolist()
            ratio = ta_seconds / rk_seconds if rk_seconds > 0 else math.nan
            rows.append(["torchattacks AutoAttack standard", f"{ta_robust.float().mean():.4f}",
                         f"{ta_seconds:.1f}", f"{ratio:.2f}"])
            figures["torchattacks"] = {
                "accuracy": float(ta_robust.float().mean()), "seconds": ta_seconds,
                "invalid_adversarials": invalid}
            figures["time_ratio_torchattacks_over_robustkit"] = ratio
            figures["accuracy_gap_robustkit_minus_torchattacks"] = float(
                rk_robust.float().mean() - ta_robust.float().mean())
            figures["broken_only_by_torchattacks"] = only_ta
            figures["broken_only_by_robustkit"] = only_rk
    print_table(["attack", "robust accuracy", "seconds", "time / robustkit"], rows)
    if "torchattacks" in figures:
        gap = figures["accuracy_gap_robustkit_minus_torchattacks"]
        print(f"robustkit − torchattacks: {100 * gap:+.2f} points; "
              f"torchattacks took {figures['time_ratio_torchattacks_over_robustkit']:.2f}× "
              "robustkit's time")
        for side, key in (("torchattacks", "broken_only_by_torchattacks"),
                          ("robustkit", "broken_only_by_robustkit")):
            found = figures[key]
            shown = ", ".join(map(str, found[:SHOW])) + (" …" if len(found) > SHOW else "")
            print(f"broken only by {side}: {len(found)}" + (f" (indices {shown})" if found
                                                             else ""))
        if figures["torchattacks"]["invalid_adversarials"]:
            print(f"warning: {figures['torchattacks']['invalid_adversarials']} torchattacks "
                  "images left the ε-ball or the box; they were counted as not broken")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        tmp.replace(args.json)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
